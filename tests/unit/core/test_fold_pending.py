"""Eager folding (what a server does after each batch) never changes a score."""

from __future__ import annotations

import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep


def _stream(n: int, nodes: int, seed: int) -> EventBatch:
    g = torch.Generator().manual_seed(seed)
    return EventBatch(
        torch.randint(nodes, (n,), generator=g),
        torch.randint(nodes, (n,), generator=g),
        torch.sort(torch.rand(n, generator=g, dtype=torch.float64) * 100).values,
        torch.zeros(n, 0),
    )


@pytest.mark.parametrize("preset", ["tgn", "jodie"])
def test_folding_after_every_batch_gives_the_same_scores_as_lazy_folding(preset):
    cfg = ModelConfig.preset(
        preset, memory_dim=8, time_dim=4, embedding_dim=8, num_neighbors=3, pair_features=True
    )
    torch.manual_seed(0)
    lazy = MemoryEngine(cfg, capacity=30).eval()
    eager = MemoryEngine(cfg, capacity=30).eval()
    eager.load_state_dict(lazy.state_dict())
    stream = _stream(300, 25, seed=1)
    probe_src, probe_dst = torch.arange(25), torch.arange(25).flip(0)
    for start in range(0, 300, 40):
        batch = stream.slice(start, start + 40)
        TemporalStep(lazy).apply(batch)
        TemporalStep(eager).apply(batch)
        folded = eager.fold_pending()
        assert folded == int(torch.unique(torch.cat([batch.src, batch.dst])).numel())
        assert not eager.memory.has_mail.any()
        t = torch.full((25,), float(batch.t[-1]) + 1.0, dtype=torch.float64)
        torch.testing.assert_close(eager.score(probe_src, probe_dst, t), lazy.score(probe_src, probe_dst, t))
        torch.testing.assert_close(eager.embed(probe_src, t), lazy.embed(probe_src, t), atol=1e-6, rtol=1e-5)
    assert eager.fold_pending() == 0


@pytest.mark.parametrize("aggregator", ["last", "mean"])
def test_prepare_then_commit_equals_apply_then_fold(aggregator):
    cfg = ModelConfig.preset(
        "tgn",
        memory_dim=8,
        time_dim=4,
        embedding_dim=8,
        num_neighbors=3,
        pair_features=True,
        aggregator=aggregator,
    )
    torch.manual_seed(0)
    reference = MemoryEngine(cfg, capacity=30).eval()
    two_phase = MemoryEngine(cfg, capacity=30).eval()
    two_phase.load_state_dict(reference.state_dict())
    stream = _stream(300, 25, seed=4)
    for start in range(0, 300, 37):
        batch = stream.slice(start, start + 37)
        TemporalStep(reference).apply(batch)
        reference.fold_pending()
        before = {k: v.clone() for k, v in two_phase.state_dict().items()}
        prepared = two_phase.prepare_events(batch)
        for k, v in two_phase.state_dict().items():
            assert torch.equal(v, before[k]), f"prepare_events changed {k}"
        two_phase.commit_events(prepared)
        for k, v in reference.state_dict().items():
            torch.testing.assert_close(two_phase.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    with pytest.raises(RuntimeError, match="prepared at"):
        stale = two_phase.prepare_events(stream.slice(0, 5))
        TemporalStep(two_phase).apply(stream.slice(5, 10))
        two_phase.commit_events(stale)


@pytest.mark.parametrize("pair_features", [False, True])
def test_fold_once_persists_neighbour_folds_without_changing_scores(pair_features):
    """Training's apply path (scores first, then apply with the fresh memories): persisting the
    neighbours' folds must leave every score identical to refolding them each batch."""
    base = dict(memory_dim=8, time_dim=4, embedding_dim=8, num_neighbors=3, pair_features=pair_features)
    torch.manual_seed(0)
    refold = MemoryEngine(ModelConfig.preset("tgn", fold_once=False, **base), capacity=30).eval()
    once = MemoryEngine(ModelConfig.preset("tgn", fold_once=True, **base), capacity=30).eval()
    once.load_state_dict(refold.state_dict())
    stream = _stream(400, 25, seed=2)
    neg = torch.randint(25, (400,), generator=torch.Generator().manual_seed(3))
    persisted_any = False
    for start in range(0, 400, 25):
        batch = stream.slice(start, start + 25)
        with torch.no_grad():
            scored_r = TemporalStep(refold).score_batch(batch, neg[start : start + 25])
            scored_o = TemporalStep(once).score_batch(batch, neg[start : start + 25])
        pos_r, neg_r = scored_r.pos, scored_r.neg
        pos_o, neg_o, fresh_o = scored_o.pos, scored_o.neg, scored_o.fresh
        torch.testing.assert_close(pos_o, pos_r, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(neg_o, neg_r, atol=1e-6, rtol=1e-5)
        batch_nodes = torch.unique(torch.cat([batch.src, batch.dst]))
        neighbours_pending = once.memory.has_mail[fresh_o.nodes] & ~torch.isin(fresh_o.nodes, batch_nodes)
        persisted_any |= bool(neighbours_pending.any())
        TemporalStep(refold).apply(scored_r)
        TemporalStep(once).apply(scored_o)
        # Only the batch's own nodes keep a pending message: every other fold was persisted.
        others = fresh_o.nodes[~torch.isin(fresh_o.nodes, batch_nodes)]
        assert not once.memory.has_mail[others].any()
    assert persisted_any, "the stream never exercised a neighbour-only fold"
    refold.fold_pending()
    once.fold_pending()
    torch.testing.assert_close(once.memory.memory, refold.memory.memory, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(once.memory.last_update, refold.memory.last_update)
