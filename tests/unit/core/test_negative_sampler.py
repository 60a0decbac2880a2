"""Negative samplers: where each kind of negative comes from, against a per-event reference."""

from __future__ import annotations

import pytest
import torch

from tgnstream.core.negatives import NegativeSampler
from tgnstream.core.neighbors import RecentNeighbors

POOL = torch.arange(100, 200)


def _batch(b: int = 64):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(0, 50, (b,), generator=g)
    dst = torch.randint(100, 110, (b,), generator=g)  # few destinations: repeats in the batch
    return src, dst


def test_recent_negatives_are_earlier_destinations_of_the_batch_never_the_positive():
    src, dst = _batch()
    uniform_pool = torch.arange(500, 600)  # disjoint from the batch: tells the kinds apart
    out = NegativeSampler(uniform_pool, seed=3, recent_ratio=1.0).sample(src, 6, exclude=dst)
    assert out.shape == (64, 6)
    recent_draws = 0
    for k in range(64):
        earlier = set(dst[:k].tolist()) - {int(dst[k])}
        for neg in out[k].tolist():
            assert neg != int(dst[k])
            if neg < 500:
                assert neg in earlier, f"event {k}: {neg} is not an earlier destination"
                recent_draws += 1
    assert not (out[0] < 500).any(), "event 0 has no earlier event: uniform"
    assert recent_draws > 0.7 * 63 * 6  # the uniform fallback is the exception


def test_shares_split_the_slots_historical_then_recent_then_uniform():
    src, dst = _batch()
    neighbors = RecentNeighbors(50, 4, 0)
    # every source's recent partners are 300..303 (outside the pool and the batch)
    neighbors.ids[:] = torch.arange(300, 304)
    neighbors.ts[:] = 1.0
    out = NegativeSampler(POOL, seed=0, recent_ratio=0.25).sample(src, 8, 0.5, neighbors, exclude=dst)
    assert bool(((out[:, :4] >= 300) & (out[:, :4] < 304)).all()), "4 historical slots"
    recent = out[1:, 4:6]
    assert bool((recent < 110).float().mean() > 0.8), "2 recent slots: earlier destinations (100..109)"
    assert bool(((out[:, 6:] >= 100) & (out[:, 6:] < 200)).all()), "2 uniform slots"


def test_one_negative_per_event_draws_its_kind_with_the_given_shares():
    src, dst = _batch(4000)
    neighbors = RecentNeighbors(50, 4, 0)
    neighbors.ids[:] = torch.arange(300, 304)
    out = NegativeSampler(POOL, seed=0, recent_ratio=0.3).sample(src, 1, 0.4, neighbors, exclude=dst)
    hist = ((out >= 300) & (out < 304)).float().mean().item()
    assert abs(hist - 0.4) < 0.03
    in_pool_recent = ((out >= 100) & (out < 110)).float().mean().item()
    # recent draws (~0.3, minus the few that hit their own positive) + uniform ones that land on 100..109
    assert 0.25 < in_pool_recent < 0.37


def test_without_recent_negatives_the_draws_are_unchanged():
    """Adding the recent kind must not move the random stream of existing configurations."""
    src, dst = _batch()
    neighbors = RecentNeighbors(50, 4, 0)
    neighbors.ids[:] = torch.arange(300, 304)
    a = NegativeSampler(POOL, seed=7).sample(src, 1, 0.5, neighbors, exclude=dst)
    g = torch.Generator().manual_seed(7)
    uniform = POOL[torch.randint(POOL.numel(), (64, 1), generator=g)]
    use = torch.rand(64, generator=g) < 0.5
    pick = torch.randint(4, (64, 1), generator=g)
    hist = neighbors.ids[src].gather(1, pick)
    ok = (hist >= 0) & use.unsqueeze(1) & (hist != dst.unsqueeze(1))
    assert torch.equal(a, torch.where(ok, hist, uniform).squeeze(1))


def test_shares_that_exceed_one_are_refused():
    src, dst = _batch()
    with pytest.raises(ValueError, match="exceed 1"):
        NegativeSampler(POOL, recent_ratio=0.6).sample(src, 2, 0.6, None, exclude=dst)


def _naive_q(src, dst, cand, k, pool_size, h, r, table):
    """q(cand | event k) of the mixture, written out per event."""
    u = int(src[k])
    row = [int(x) for x in table[u]]
    uniform = (1 - h - r) + h * sum(x < 0 for x in row) / len(row) + (r if k == 0 else 0.0)
    q = uniform / pool_size
    q += h * sum(x == cand for x in row) / len(row)
    if k > 0:
        q += r * sum(int(d) == cand for d in dst[:k]) / k
    return q


@pytest.mark.parametrize("num", [1, 4])
def test_log_sampling_ratio_is_log_q_over_uniform_per_event(num):
    src, dst = _batch(32)
    neighbors = RecentNeighbors(50, 4, 0)
    g = torch.Generator().manual_seed(5)
    neighbors.ids[:] = torch.randint(98, 112, (50, 4), generator=g)  # some slots empty (-1 below)
    neighbors.ids[neighbors.ids < 100] = -1
    sampler = NegativeSampler(POOL, seed=0, recent_ratio=0.25, sampling_correction=True)
    cands = torch.cat([dst.unsqueeze(1), torch.randint(100, 115, (32, 3), generator=g)], 1)
    got = sampler.log_sampling_ratio(src, cands, num, 0.5, neighbors, dst)
    h, r = (0.5, 0.25) if num == 1 else (2 / 4, 1 / 4)
    for k in range(32):
        for c in range(4):
            q = _naive_q(src, dst, int(cands[k, c]), k, POOL.numel(), h, r, neighbors.ids)
            assert got[k, c].item() == pytest.approx(
                torch.log(torch.tensor(q * POOL.numel())).item(), abs=1e-5
            )


def test_the_correction_is_a_training_offset_only():
    """Scores used by evaluation and serving carry no offset: GatheredBatch without one."""
    from tgnstream.core.config import ModelConfig
    from tgnstream.core.engine import MemoryEngine
    from tgnstream.core.events import EventBatch
    from tgnstream.core.step import TemporalStep

    torch.manual_seed(0)
    engine = MemoryEngine(ModelConfig.preset("tgn", width=8, num_neighbors=3), 16).eval()
    step = TemporalStep(engine)
    batch = EventBatch(
        torch.tensor([0, 1]),
        torch.tensor([2, 3]),
        torch.tensor([1.0, 2.0], dtype=torch.float64),
        torch.zeros(2, 0),
    )
    neg = torch.tensor([4, 5])
    plain = step.score(step.gather(batch, neg))
    from dataclasses import replace

    offset = torch.tensor([0.5, -1.0, 2.0, 0.25])
    shifted = step.score(replace(step.gather(batch, neg), logit_offset=offset))
    assert torch.allclose(shifted.pos, plain.pos + offset[:2]) and torch.allclose(
        shifted.neg, plain.neg + offset[2:]
    )
