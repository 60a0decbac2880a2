"""Several negatives per event and the listwise loss: each negative column scores as it would
alone, the loss is the hand-written formula, and activity features encode what they say."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.modules import encode_pair_features, pair_feature_dim
from tgnstream.core.pair_stats import PairStats
from tgnstream.core.step import TemporalStep
from tgnstream.core.synthetic import generate_stream

SMALL = dict(memory_dim=8, time_dim=4, embedding_dim=8, num_neighbors=4, decoder_hidden=8)


def _engine(**kw) -> MemoryEngine:
    torch.manual_seed(0)
    return MemoryEngine(ModelConfig.preset("tgn", pair_features=True, **SMALL, **kw), 64).eval()


@pytest.mark.parametrize("activity", [False, True])
def test_each_negative_column_scores_as_it_would_alone(activity):
    """A call embeds each node once, at the earliest time it is queried in the call; with every
    negative a distinct node that is no endpoint of the batch, columns cannot share one."""
    data = generate_stream(400, num_src=20, num_dst=300, bipartite=True, seed=2)
    engine = _engine(activity_features=activity)
    engine.ensure_capacity(data.num_nodes)
    step = TemporalStep(engine)
    with torch.no_grad():
        for i in range(0, 300, 100):
            step.apply(step.score_batch(data.events.slice(i, i + 100), data.events.dst[i : i + 100]))
        batch = data.events.slice(300, 312)
        free = data.dst_nodes[~torch.isin(data.dst_nodes, batch.dst)]
        g = torch.Generator().manual_seed(1)
        negs = free[torch.randperm(free.numel(), generator=g)[:36]].view(12, 3)
        many = step.score_batch(batch, negs)
        assert many.neg.shape == (12, 3)
        for j in range(3):
            one = step.score_batch(batch, negs[:, j])
            assert torch.allclose(one.pos, many.pos, atol=1e-5)
            assert torch.allclose(one.neg, many.neg[:, j], atol=1e-5)


def test_the_listwise_term_is_softmax_cross_entropy_of_the_positive():
    engine = _engine()
    pos = torch.tensor([2.0, -1.0])
    neg = torch.tensor([[0.5, 1.5, -3.0], [0.0, 2.0, 1.0]])

    class Scored:
        fresh = type("F", (), {"raw_memory": None})()

    Scored.pos, Scored.neg = pos, neg
    bce = F.binary_cross_entropy_with_logits(pos, torch.ones(2)) + F.binary_cross_entropy_with_logits(
        neg, torch.zeros(2, 3)
    )
    listwise = 0.0
    for p, row in zip(pos.tolist(), neg.tolist()):
        listwise += -(p - math.log(math.exp(p) + sum(math.exp(x) for x in row)))
    listwise /= 2
    assert float(TemporalStep(engine).loss(Scored)) == pytest.approx(float(bce), rel=1e-6)
    assert float(TemporalStep(engine, ranking_weight=0.5).loss(Scored)) == pytest.approx(
        float(bce) + 0.5 * listwise, rel=1e-6
    )


def test_activity_features_encode_recency_and_popularity_of_each_endpoint():
    t = torch.tensor([100.0, 100.0], dtype=torch.float64)
    never = torch.tensor([float("-inf")] * 2, dtype=torch.float64)
    stats = PairStats(
        count=torch.tensor([0, 0]),
        last=never.clone(),
        latest_u=torch.tensor([90.0, float("-inf")], dtype=torch.float64),
        latest_v=torch.tensor([100.0 - math.expm1(4.0), float("-inf")], dtype=torch.float64),
        common=torch.tensor([0, 0]),
        count_u=torch.tensor([3, 0]),
        count_v=torch.tensor([7, 0]),
    )
    base = encode_pair_features(stats, t)
    full = encode_pair_features(stats, t, activity=True)
    assert full.shape == (2, pair_feature_dim(True)) and torch.equal(full[:, : base.shape[1]], base)
    extra = full[:, base.shape[1] : -1].view(2, 2, -1)  # [pair, endpoint (u, v), 1 + RBF + 1 + 1]
    assert torch.equal(full[:, -1], torch.zeros(2))  # the pairs never met: no pair log-time
    # v of pair 0: active, log-time since its latest is 4.0 -> the RBF centred at 4 is 1.
    assert extra[0, 1, 0] == 1.0 and extra[0, 1, 1 + 2] == pytest.approx(1.0)
    assert extra[0, 1, -2] == pytest.approx(math.log1p(7))
    assert extra[0, 0, -2] == pytest.approx(math.log1p(3))
    assert extra[0, 1, -1] == pytest.approx(4.0 / 18) and extra[0, 0, -1] == pytest.approx(
        math.log1p(10) / 18
    )
    # Pair 1: both endpoints never active -> all activity features 0.
    assert torch.count_nonzero(extra[1]) == 0
