"""Heuristic baselines and the shared evaluation protocol against naive Python references: every
heuristic's scores and MRR from a plain scan of the past stream, the lexicographic combination,
identical negatives and candidates for a model and a baseline, and no event seeing itself or
the future."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.heuristics import DEFAULT_BASELINES, HeuristicScorer, parse_heuristic
from tgnstream.core.negatives import NegativeSampler
from tgnstream.core.stream_eval import EvalSettings, ModelScorer, candidate_pool, evaluate_stream, summarise
from tgnstream.core.synthetic import dataset_from_arrays

NODES, EVENTS, START, BATCH, WINDOW = 14, 260, 120, 25, 40.0


def _random_stream(seed: int = 3, bipartite: bool = False):
    """Few nodes (pairs repeat), repeated timestamps (ties in time), self-loops when general."""
    rng = random.Random(seed)
    src, dst, t, now = [], [], [], 0.0
    for _ in range(EVENTS):
        if bipartite:
            s, d = rng.randrange(6), 6 + rng.randrange(NODES - 6)
        else:
            s, d = rng.randrange(NODES), rng.randrange(NODES)
        now += rng.choice([0.0, 0.0, 1.0, 3.5])
        src.append(s)
        dst.append(d)
        t.append(now)
    return dataset_from_arrays(src, dst, t, num_nodes=NODES)


def _naive_value(name: str, past: list[tuple[int, int, float]], u: int, v: int, t: float) -> float:
    pair = [w for s, d, w in past if {s, d} == {u, v}]
    node = [w for s, d, w in past for end in (s, d) if end == v]
    return {
        "recency": max(pair, default=-math.inf),
        "popularity": float(len(pair)),
        "global_recency": max(node, default=-math.inf),
        "global_popularity": float(len(node)),
        "edgebank": float(bool(pair)),
        "edgebank_tw": float(any(w >= t - WINDOW for w in pair)),
    }[name]


def _naive_key(spec: str, past, u, v, t) -> tuple[float, ...]:
    return tuple(_naive_value(k, past, u, v, t) for k in parse_heuristic(spec))


def _naive_rr(pos: tuple, negs: list[tuple]) -> float:
    rank = 1.0 + sum(n > pos for n in negs) + 0.5 * sum(n == pos for n in negs)
    return 1.0 / rank


def _as_tuples(x: torch.Tensor) -> list[tuple[float, ...]]:
    x = x.double()
    return [tuple(r) for r in (x.unsqueeze(-1) if x.dim() == 1 else x).tolist()]


@pytest.mark.parametrize("history", ["event", "batch"])
@pytest.mark.parametrize("spec", DEFAULT_BASELINES)
def test_every_heuristic_matches_a_naive_scan_of_the_past(spec, history):
    data = _random_stream()
    ev = data.events
    events = list(zip(ev.src.tolist(), ev.dst.tolist(), ev.t.tolist()))
    scorer = HeuristicScorer(spec, NODES, window=WINDOW, history=history)
    scorer.observe_all(ev.slice(0, START))
    settings = EvalSettings(batch_size=BATCH)
    got = evaluate_stream(scorer, data, START, EVENTS, settings)

    # The same negatives the protocol draws (seeded sampler, one draw per batch, in order).
    sampler = NegativeSampler(candidate_pool(data), settings.seed)
    pool = candidate_pool(data).tolist()
    want_pos, want_neg, want_rr = [], [], []
    for b0 in range(START, EVENTS, BATCH):
        batch = ev.slice(b0, min(b0 + BATCH, EVENTS))
        negs = sampler.sample(batch.src).tolist()
        for j in range(len(batch)):
            i = b0 + j
            past = events[:i] if history == "event" else events[:b0]
            u, v, t = events[i]
            want_pos.append(_naive_key(spec, past, u, v, t))
            want_neg.append(_naive_key(spec, past, u, negs[j], t))
            others = [_naive_key(spec, past, u, c, t) for c in pool if c != v]
            want_rr.append(_naive_rr(want_pos[-1], others))
    assert _as_tuples(got["pos"]) == want_pos
    assert _as_tuples(got["neg"]) == want_neg
    assert got["rr"].tolist() == pytest.approx(want_rr, abs=1e-12)
    assert summarise(got)["mrr"] == pytest.approx(sum(want_rr) / len(want_rr), abs=1e-12)


def test_sampled_candidates_match_the_ranking_against_everyone():
    """The sampled protocol's per-event candidates score like the same nodes in a full ranking."""
    data = _random_stream(bipartite=True)
    ev = data.events
    scorer = HeuristicScorer("recency>global_popularity", NODES, history="event")
    scorer.observe_all(ev.slice(0, START))
    batch = ev.slice(START, START + BATCH)
    pool = candidate_pool(data)
    full = scorer.rank(batch, pool)  # [B, Q, 2]
    cands = pool[torch.randint(pool.numel(), (len(batch), 5), generator=torch.Generator().manual_seed(0))]
    own = scorer.score_candidates(batch, cands)
    cols = torch.searchsorted(pool, cands)
    assert torch.equal(own, full.gather(1, cols.unsqueeze(-1).expand(-1, -1, 2)))


def test_a_model_and_a_baseline_see_the_same_negatives_and_candidates():
    data = _random_stream(bipartite=True)
    seen: dict[str, list] = {"model": [], "baseline": []}

    def spy(name, scorer):
        score, rank = scorer.score, scorer.rank

        def score_spy(batch, neg):
            seen[name].append(("score", batch.src.tolist(), batch.dst.tolist(), neg.tolist()))
            return score(batch, neg)

        def rank_spy(batch, candidates):
            seen[name].append(("rank", batch.src.tolist(), candidates.tolist()))
            return rank(batch, candidates)

        scorer.score, scorer.rank = score_spy, rank_spy
        return scorer

    torch.manual_seed(0)
    engine = MemoryEngine(
        ModelConfig.preset(
            "tgn", memory_dim=8, time_dim=4, embedding_dim=8, num_neighbors=3, decoder_hidden=8
        ),
        NODES,
    )
    settings = EvalSettings(batch_size=BATCH)
    evaluate_stream(spy("model", ModelScorer(engine)), data, START, EVENTS, settings)
    baseline = HeuristicScorer("recency", NODES)
    baseline.observe_all(data.events.slice(0, START))
    evaluate_stream(spy("baseline", baseline), data, START, EVENTS, settings)
    assert seen["model"] == seen["baseline"] and len(seen["model"]) > 0


@pytest.mark.parametrize("spec", ["recency>global_recency", "popularity>global_popularity", "edgebank_tw"])
def test_an_event_never_sees_itself_or_later_events(spec):
    """Changing a test event and everything after it leaves every earlier score unchanged, and
    that event's own score too (it is scored before it is applied)."""
    data = _random_stream()
    ev = data.events
    k = START + 37  # inside a batch, not at its start
    changed = dataset_from_arrays(
        torch.cat([ev.src[:k], (ev.src[k:] + 1) % NODES]),
        torch.cat([ev.dst[:k], (ev.dst[k:] + 5) % NODES]),
        ev.t,
        num_nodes=NODES,
    )
    outs = []
    for d in (data, changed):
        scorer = HeuristicScorer(spec, NODES, window=WINDOW)
        scorer.observe_all(d.events.slice(0, START))
        outs.append(evaluate_stream(scorer, d, START, EVENTS, EvalSettings(batch_size=BATCH, rank=False)))
    n = k - START
    assert torch.equal(outs[0]["pos"][:n], outs[1]["pos"][:n])
    # Event k itself is different (other endpoints) but is scored against the same past: its
    # score equals the naive value on the unchanged prefix.
    events = list(zip(ev.src.tolist(), ev.dst.tolist(), ev.t.tolist()))
    u, v, t = int(changed.events.src[k]), int(changed.events.dst[k]), float(ev.t[k])
    assert _as_tuples(outs[1]["pos"][n : n + 1]) == [_naive_key(spec, events[:k], u, v, t)]


def test_bad_specs_and_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown heuristic"):
        HeuristicScorer("recency>freshness", NODES)
    with pytest.raises(ValueError, match="window"):
        HeuristicScorer("edgebank_tw", NODES)
    with pytest.raises(ValueError, match="history"):
        HeuristicScorer("recency", NODES, history="daily")
