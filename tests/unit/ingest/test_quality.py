"""Prequential quality against a naive per-event reference (pairwise scoring, Python ranks)."""

from __future__ import annotations

import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep
from tgnstream.ingest.config import QualityConfig
from tgnstream.ingest.quality import PrequentialQuality
from tgnstream.runtime.live import LiveEngine


def _bipartite(n: int, seed: int) -> EventBatch:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 10, (n,), generator=g)
    dst = torch.randint(10, 20, (n,), generator=g)
    t = torch.sort(torch.rand(n, generator=g, dtype=torch.float64) * 50).values
    return EventBatch(src, dst, t, torch.zeros(n, 0))


def test_online_ap_and_mrr_match_a_naive_reference():
    torch.manual_seed(0)
    cfg = ModelConfig.preset(
        "tgn", memory_dim=8, time_dim=4, embedding_dim=8, num_neighbors=3, pair_features=True
    )
    engine = MemoryEngine(cfg, capacity=32).eval()
    stream = _bipartite(160, seed=2)
    TemporalStep(engine).apply(stream.slice(0, 120))
    live = LiveEngine(engine, "v")
    # One shared time: ranking embeds candidates at the batch's earliest time, the pairwise
    # reference at each event's own time; equal times make the two definitions coincide.
    tail = stream.slice(120, 160)
    batch = EventBatch(tail.src, tail.dst, torch.full((40,), 60.0, dtype=torch.float64), tail.feats)
    quality = PrequentialQuality(QualityConfig(window=100, min_interval_ms=0))
    pick = torch.tensor([0, 3, 7, 20, 39])
    negs = torch.tensor([10, 11, 12, 13, 14, 15])
    assert quality.observe(live, batch, pick=pick, negatives=negs) == 5

    # Reference: every score on its own through the pairwise path, ranks counted in Python.
    def score(i: int, d: int) -> float:
        inputs = engine.gather_pairs(
            batch.src[i : i + 1], torch.tensor([d]), batch.t[i : i + 1], batch, torch.tensor([i])
        )
        logit, _ = engine.pair_forward(inputs, engine.fetch_memory(inputs.embedding.nodes))
        return float(logit.detach())

    rrs, pos_scores, neg_scores = [], [], []
    for j, i in enumerate(pick.tolist()):
        true = int(batch.dst[i])
        p = score(i, true)
        negatives = [score(i, d) for d in negs.tolist() if d != true]
        rank = 1 + sum(n > p + 1e-6 for n in negatives) + 0.5 * sum(abs(n - p) <= 1e-6 for n in negatives)
        rrs.append(1 / rank)
        pos_scores.append(p)
        if int(negs[j % 6]) != true:
            neg_scores.append(score(i, int(negs[j % 6])))
    assert abs(quality.mrr() - sum(rrs) / len(rrs)) < 1e-9
    # AP by hand: mean precision at each positive, scores sorted descending (no ties here).
    ranked = sorted([(s, 1) for s in pos_scores] + [(s, 0) for s in neg_scores], reverse=True)
    hits, precisions = 0, []
    for k, (_, label) in enumerate(ranked, 1):
        if label:
            hits += 1
            precisions.append(hits / k)
    assert abs(quality.ap() - sum(precisions) / len(precisions)) < 1e-6


def test_window_is_rolling_and_disabled_quality_scores_nothing():
    torch.manual_seed(0)
    engine = MemoryEngine(
        ModelConfig(memory_dim=8, time_dim=4, embedding_dim=8, num_neighbors=3), capacity=32
    ).eval()
    stream = _bipartite(200, seed=5)
    TemporalStep(engine).apply(stream.slice(0, 100))
    live = LiveEngine(engine, "v")
    quality = PrequentialQuality(QualityConfig(window=10, events_per_batch=8, negatives=5, min_interval_ms=0))
    assert quality.observe(live, stream.slice(100, 150)) == 8
    assert quality.observe(live, stream.slice(150, 200)) == 8
    assert len(quality) == 10 and 0 < quality.mrr() <= 1 and 0 < quality.ap() <= 1
    throttled = PrequentialQuality(QualityConfig(min_interval_ms=60_000))
    assert throttled.observe(live, stream.slice(100, 150)) > 0
    assert throttled.observe(live, stream.slice(150, 200)) == 0, "a second scoring within the interval"
    off = PrequentialQuality(QualityConfig(enabled=False))
    assert off.observe(live, stream.slice(100, 150)) == 0 and off.mrr() is None and off.ap() is None
