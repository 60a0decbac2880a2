"""Pair-history retention (by age, by count) against a plain dict that applies the documented
rule by hand, batch by batch; forgotten pairs read as never seen and come back fresh."""

from __future__ import annotations

import pytest
import torch

from tgnstream.core.edge_history import SWEEP_FRACTION, EdgeHistory


def _batches(n_batches: int, size: int, nodes: int, seed: int, tick: int = 1):
    """Events at times ``0, 1, 2 ...``, or with ``tick`` events sharing each time (ties)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n_batches):
        u = torch.randint(nodes, (size,), generator=g)
        v = torch.randint(nodes, (size,), generator=g)
        t = torch.div(torch.arange(i * size, (i + 1) * size), tick, rounding_mode="floor").double()
        yield u, v, t


class _Reference:
    """The retention rule of the docs, one pair at a time."""

    def __init__(self, max_age, max_pairs):
        self.max_age, self.max_pairs = max_age, max_pairs
        self.pairs: dict[tuple[int, int], tuple[int, float]] = {}
        self.swept_at, self.sweeps, self.by_age, self.by_count = 0.0, 0, 0, 0

    def insert(self, u, v, t):
        for a, b, tt in zip(u.tolist(), v.tolist(), t.tolist()):
            key = (min(a, b), max(a, b))
            c, last = self.pairs.get(key, (0, float("-inf")))
            self.pairs[key] = (c + 1, max(last, tt))
        watermark = max(t.tolist())
        if self.max_age is not None and (
            self.sweeps == 0 or watermark - self.swept_at >= SWEEP_FRACTION * self.max_age
        ):
            old = [k for k, (_, last) in self.pairs.items() if last < watermark - self.max_age]
            for k in old:
                del self.pairs[k]
            self.by_age += len(old)
            self.swept_at, self.sweeps = watermark, self.sweeps + 1
        if self.max_pairs is not None and len(self.pairs) > self.max_pairs + int(
            SWEEP_FRACTION * self.max_pairs
        ):
            excess = len(self.pairs) - self.max_pairs
            # Oldest first; ties by smaller key (the pair key orders by the smaller id, then the larger).
            doomed = sorted(self.pairs, key=lambda k: (self.pairs[k][1], k))[:excess]
            for k in doomed:
                del self.pairs[k]
            self.by_count += len(doomed)
            self.sweeps += 1


def _check_equal(h: EdgeHistory, ref: _Reference, nodes: int):
    assert len(h) == len(ref.pairs)
    keys = list(ref.pairs)
    u = torch.tensor([a for a, _ in keys], dtype=torch.long)
    v = torch.tensor([b for _, b in keys], dtype=torch.long)
    counts, last = h.lookup(v, u)
    assert counts.tolist() == [ref.pairs[k][0] for k in keys]
    assert last.tolist() == [ref.pairs[k][1] for k in keys]
    # Every other pair reads as never seen.
    g = torch.Generator().manual_seed(7)
    qu, qv = torch.randint(nodes, (4000,), generator=g), torch.randint(nodes, (4000,), generator=g)
    qc, ql = h.lookup(qu, qv)
    for a, b, c, tt in zip(qu.tolist(), qv.tolist(), qc.tolist(), ql.tolist()):
        held = ref.pairs.get((min(a, b), max(a, b)))
        assert (c, tt) == held if held else c == 0 and tt != tt  # NaN when unseen
    assert h.evicted.tolist() == [ref.by_age, ref.by_count, ref.sweeps]


@pytest.mark.parametrize(
    "max_age,max_pairs,tick",
    [(3000.0, None, 1), (None, 900, 1), (None, 900, 50), (5000.0, 1500, 1), (600.0, 1200, 25)],
    ids=["age", "count", "count-ties", "age+count", "age+count-ties"],
)
def test_retention_matches_the_rule_applied_pair_by_pair(max_age, max_pairs, tick):
    nodes = 120  # few nodes: pairs recur, so forgotten pairs come back and must restart at count 1
    h, ref = EdgeHistory(), _Reference(max_age, max_pairs)
    for u, v, t in _batches(60, 250, nodes, seed=3, tick=tick):
        h.insert(u, v, t)
        h.retain(float(t.max()), max_age, max_pairs)
        ref.insert(u, v, t)
    assert ref.by_age + ref.by_count > 1000  # the rule did forget, many times over
    _check_equal(h, ref, nodes)


def test_forgotten_slots_are_reclaimed_and_the_table_stays_bounded():
    # Many distinct pairs over time, few alive at once: without retention the table would grow
    # to hold every pair; with it, the slots of forgotten pairs are reused or reclaimed.
    h, ref = EdgeHistory(), _Reference(2000.0, None)
    for u, v, t in _batches(200, 500, 100_000, seed=5):  # ~100k distinct pairs, ~2.5k alive
        h.insert(u, v, t)
        h.retain(float(t.max()), 2000.0, None)
        ref.insert(u, v, t)
    _check_equal(h, ref, 100_000)
    assert h.keys.numel() <= 16 * 1024  # at most a few times the pairs alive, not 100k
    # The saved form holds the live pairs only, compact; a reload reads the same.
    state = h.state_dict()
    assert state["keys"].numel() == len(ref.pairs) and int(state["gone"]) == 0
    back = EdgeHistory()
    back.load_state_dict(state)
    _check_equal(back, ref, 100_000)


def test_a_state_saved_before_retention_existed_loads_with_zero_counters():
    h = EdgeHistory()
    for u, v, t in _batches(3, 100, 50, seed=1):
        h.insert(u, v, t)
    old = {k: v for k, v in h.state_dict().items() if k not in ("gone", "evicted", "swept_at")}
    back = EdgeHistory()
    back.load_state_dict(old)
    assert len(back) == len(h) and back.evicted.tolist() == [0, 0, 0]


def test_rehashed_tables_are_built_aside_and_adopted_whole():
    h = EdgeHistory()
    for u, v, t in _batches(4, 500, 300, seed=2):
        h.insert(u, v, t)
    before = h.keys
    more = h.capacity  # enough new pairs to force a reallocation
    assert h.needs_rehash(more)
    table = h.rehashed(2 * h.keys.numel())
    assert h.keys is before  # building it aside leaves the served table alone
    u, v = torch.randint(300, (2000,)), torch.randint(300, (2000,))
    expect = h.lookup(u, v)
    h.adopt(table)
    assert not h.needs_rehash(more)
    got = h.lookup(u, v)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1].nan_to_num(-1), expect[1].nan_to_num(-1))
