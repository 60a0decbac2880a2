"""Score / TopK / Embed / GetModelInfo replies equal direct engine calls on the same state."""

from __future__ import annotations

import copy

import pytest
import torch

from tgnstream.model_server import queries
from tgnstream.model_server.convert import TopKQuery
from tgnstream.rpc.v1 import link_prediction_pb2 as pb

from .conftest import NUM_DST, NUM_SRC, node_name

USERS = [node_name(i) for i in range(0, NUM_SRC, 3)]
PAGES = [node_name(NUM_SRC + j) for j in range(NUM_DST)]


def _idx(engine, names: list[str]) -> torch.Tensor:
    idx, new = engine.ids.lookup(names, create=False)
    assert not new.any()
    return idx


def _wm(engine) -> float:
    return float(engine.watermark)


def test_score_matches_engine(served):
    e = served.engine
    pairs = [(u, PAGES[(7 * i) % NUM_DST]) for i, u in enumerate(USERS)] + [(USERS[0], PAGES[0])] * 2
    reply = served.stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src=s, dst=d) for s, d in pairs]))
    src, dst = _idx(e, [p[0] for p in pairs]), _idx(e, [p[1] for p in pairs])
    ref = e.score(src, dst, torch.full((len(pairs),), _wm(e), dtype=torch.float64))
    assert torch.allclose(torch.tensor(reply.probabilities), ref, atol=1e-6)
    assert not any(reply.src_unknown) and not any(reply.dst_unknown)
    assert len(reply.src_unknown) == len(pairs)
    st = reply.state
    assert (st.model_version, st.events_applied, st.watermark) == ("v-test", 600, _wm(e))


def test_score_at_explicit_time(served):
    e, t = served.engine, _wm(served.engine) + 1234.5
    reply = served.stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src=USERS[1], dst=PAGES[2])], time=t))
    ref = e.score(_idx(e, [USERS[1]]), _idx(e, [PAGES[2]]), torch.tensor([t], dtype=torch.float64))
    assert reply.probabilities[0] == pytest.approx(float(ref[0]), abs=1e-6)
    at_wm = served.stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src=USERS[1], dst=PAGES[2])]))
    assert at_wm.probabilities[0] != pytest.approx(reply.probabilities[0], abs=1e-7), "time must matter"


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_topk_default_candidates_matches_engine_top_k(served, exclude_seen):
    e = served.engine
    for user in USERS[:6]:
        reply = served.stub.TopK(pb.TopKRequest(src=user, k=7, exclude_seen=exclude_seen))
        ids, probs = e.top_k(int(_idx(e, [user])[0]), _wm(e), 7, exclude_seen=exclude_seen)
        assert [r.id for r in reply.results] == [node_name(i) for i in ids.tolist()]
        assert torch.allclose(torch.tensor([r.probability for r in reply.results]), probs, atol=1e-6)
        assert not reply.src_unknown and not any(r.unknown for r in reply.results)
        assert reply.state.events_applied == 600


def test_topk_k_larger_than_candidates(served):
    reply = served.stub.TopK(pb.TopKRequest(src=USERS[0], k=10, candidates=PAGES[:6]))
    assert sorted(r.id for r in reply.results) == sorted(PAGES[:6])
    probs = [r.probability for r in reply.results]
    assert probs == sorted(probs, reverse=True)


def test_topk_explicit_candidates_at_default_time_match_engine(served):
    e = served.engine
    cands = PAGES[::2] + [USERS[2]]
    reply = served.stub.TopK(pb.TopKRequest(src=USERS[4], k=5, candidates=cands))
    ids, probs = e.top_k(int(_idx(e, [USERS[4]])[0]), _wm(e), 5, candidates=_idx(e, cands))
    assert [r.id for r in reply.results] == [node_name(i) for i in ids.tolist()]
    assert torch.allclose(torch.tensor([r.probability for r in reply.results]), probs, atol=1e-6)


def test_topk_other_time_uses_candidates_at_watermark(served):
    """Documented semantics: source (and pair features) at t, candidates at the watermark."""
    e = served.engine
    t = _wm(e) + 5000.0
    cands = PAGES[:12]
    reply = served.stub.TopK(pb.TopKRequest(src=USERS[3], k=12, candidates=cands, time=t))
    src = _idx(e, [USERS[3]])
    logits = e.rank_logits(src, torch.tensor([t], dtype=torch.float64), _idx(e, cands), t_candidates=_wm(e))[
        0
    ]
    ref = dict(zip(cands, torch.sigmoid(logits).tolist()))
    got = {r.id: r.probability for r in reply.results}
    assert set(got) == set(cands)
    for c in cands:
        assert got[c] == pytest.approx(ref[c], abs=1e-6)


def test_explicit_candidates_same_with_cold_or_warm_cache(served):
    q = TopKQuery(src=USERS[5], k=10, candidates=PAGES[3:15], exclude_seen=False, time=None, strict=False)
    cold = queries.top_k(served.live, q, queries.CandidateCache())
    cache = queries.CandidateCache()
    cache.warm(served.live)
    warm = queries.top_k(served.live, q, cache)
    assert cold.ids == warm.ids
    assert cold.probabilities == pytest.approx(warm.probabilities, abs=1e-6)


def test_embed_matches_engine(served):
    e, t = served.engine, _wm(served.engine) + 10.0
    nodes = [USERS[0], PAGES[4], USERS[0], USERS[7]]
    reply = served.stub.Embed(pb.EmbedRequest(nodes=nodes, time=t))
    ref = e.embed(_idx(e, nodes), torch.full((4,), t, dtype=torch.float64))
    got = torch.tensor([list(x.values) for x in reply.embeddings])
    assert [x.id for x in reply.embeddings] == nodes
    assert reply.dim == ref.shape[1] == 16
    assert torch.allclose(got, ref, atol=1e-6)


def test_unknown_ids_are_cold_start(served):
    """Unknown ids answer exactly like brand-new id slots of a copy of the state, and are flagged;
    the served state does not grow."""
    e = served.engine
    n_ids, cap = len(e.ids), e.capacity
    ref = copy.deepcopy(e)
    fresh, _ = ref.ids.lookup(["fresh-a", "fresh-b"], create=True)
    fa, fb = fresh.tolist()
    ref.ensure_capacity(fb + 1)
    wm = _wm(e)
    tt = torch.full((3,), wm, dtype=torch.float64)
    user, page = int(_idx(e, [USERS[1]])[0]), int(_idx(e, [PAGES[1]])[0])

    reply = served.stub.Score(
        pb.ScoreRequest(
            pairs=[
                pb.Pair(src="nobody", dst=PAGES[1]),
                pb.Pair(src=USERS[1], dst="nothing"),
                pb.Pair(src="nobody", dst="nothing"),
            ]
        )
    )
    expect = ref.score(torch.tensor([fa, user, fa]), torch.tensor([page, fb, fb]), tt)
    assert torch.allclose(torch.tensor(reply.probabilities), expect, atol=1e-6)
    assert list(reply.src_unknown) == [True, False, True]
    assert list(reply.dst_unknown) == [False, True, True]

    top = served.stub.TopK(pb.TopKRequest(src="nobody", k=5))
    ids, probs = ref.top_k(fb, wm, 5)
    assert top.src_unknown
    assert [r.id for r in top.results] == [node_name(i) for i in ids.tolist()]
    assert torch.allclose(torch.tensor([r.probability for r in top.results]), probs, atol=1e-6)

    # Unknown candidates are ranked (not mistaken for an unknown src sharing the cold slot).
    top = served.stub.TopK(pb.TopKRequest(src="nobody", k=5, candidates=["nothing", PAGES[1], "nobody"]))
    got = {r.id: (r.probability, r.unknown) for r in top.results}
    assert set(got) == {"nothing", PAGES[1]}, "only the src itself is dropped"
    cold_pair = ref.score(torch.tensor([fa]), torch.tensor([fb]), tt[:1])
    assert got["nothing"][0] == pytest.approx(float(cold_pair), abs=1e-6) and got["nothing"][1]
    assert not got[PAGES[1]][1]

    emb = served.stub.Embed(pb.EmbedRequest(nodes=["nobody", USERS[1]]))
    assert [x.unknown for x in emb.embeddings] == [True, False]
    z = ref.embed(torch.tensor([fa]), tt[:1])[0]
    assert torch.allclose(torch.tensor(list(emb.embeddings[0].values)), z, atol=1e-6)
    assert (len(e.ids), e.capacity) == (n_ids, cap), "reads must not grow the served state"


def test_get_model_info(served):
    info = served.stub.GetModelInfo(pb.GetModelInfoRequest())
    e = served.engine
    assert info.model_version == "v-test" and info.events_applied == 600
    assert info.watermark == _wm(e) and info.num_nodes == NUM_SRC + NUM_DST
    assert info.model == "tgn+pair" and info.embedding_dim == 16 and info.device == "cpu"
    assert dict(info.next_offsets) == {0: 600}


def test_model_name_and_dim_of_other_presets():
    from tgnstream.core.config import ModelConfig
    from tgnstream.core.engine import MemoryEngine

    jodie = MemoryEngine(ModelConfig.preset("jodie", memory_dim=12), capacity=4)
    assert (queries.model_name(jodie), queries.embedding_dim(jodie)) == ("jodie", 12)
    other = MemoryEngine(ModelConfig(updater="rnn", embedding="identity", memory_dim=6), capacity=4)
    assert queries.model_name(other) == "rnn+identity"


def test_training_mode_engine_is_served_in_eval_mode(served):
    """A freshly loaded engine is in training mode (dropout on): replies must still be
    deterministic."""
    served.engine.train()
    try:
        a = served.stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src=USERS[2], dst=PAGES[5])]))
        b = served.stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src=USERS[2], dst=PAGES[5])]))
        assert not served.engine.training
        assert a.probabilities == b.probabilities
    finally:
        served.engine.eval()


def test_topk_candidate_cache_staleness_is_bounded_by_its_max_age():
    """With max_age_s > 0 an older version's candidate embeddings are reused until they age out;
    with 0 (the default) every version gets its own."""
    import time as _time

    from tgnstream.model_server.queries import CandidateCache, CandidateEmbeddings

    class _Live:
        model_version = "v"

    class _Engine:
        def __init__(self, n):
            self.events_applied = n

    engine = _Engine(10)
    key_old = CandidateCache.key(_Live(), engine)
    stale = CandidateCache(max_age_s=0.2)
    exact = CandidateCache()
    for cache in (stale, exact):
        cache._entry = CandidateEmbeddings(key_old, 1.0, None, None, _time.monotonic())
    engine.events_applied = 20
    key_new = CandidateCache.key(_Live(), engine)
    assert stale.peek(key_new) is not None and stale.peek(key_new, exact=True) is None
    assert exact.peek(key_new) is None and exact.peek(key_old) is not None
    _time.sleep(0.25)
    assert stale.peek(key_new) is None, "aged out"
