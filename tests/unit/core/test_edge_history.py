"""The pair-history hash table against a plain dict: counts, last times, growth, layout
determinism and the state-dict format."""

from __future__ import annotations

import torch

from tgnstream.core.edge_history import EdgeHistory, pair_keys


def _batches(n_batches: int, size: int, nodes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for i in range(n_batches):
        u = torch.randint(nodes, (size,), generator=g)
        v = torch.randint(nodes, (size,), generator=g)
        t = torch.arange(i * size, (i + 1) * size, dtype=torch.float64)
        yield u, v, t


def test_counts_and_last_times_match_a_dict_through_many_reallocations():
    h, ref = EdgeHistory(), {}
    for u, v, t in _batches(60, 1500, 3000, seed=0):  # ~90k events, tens of thousands of pairs
        h.insert(u, v, t)
        for a, b, tt in zip(u.tolist(), v.tolist(), t.tolist()):
            key = (min(a, b), max(a, b))
            c, last = ref.get(key, (0, float("-inf")))
            ref[key] = (c + 1, max(last, tt))
    assert len(h) == len(ref) and h.keys.numel() >= 2 * len(ref)
    keys = list(ref)
    u = torch.tensor([a for a, _ in keys] + [5, 7])
    v = torch.tensor([b for _, b in keys] + [3000, 3001])  # two pairs never seen
    counts, last = h.lookup(v, u)  # order-free
    assert counts[:-2].tolist() == [ref[k][0] for k in keys] and counts[-2:].tolist() == [0, 0]
    assert last[:-2].tolist() == [ref[k][1] for k in keys] and torch.isnan(last[-2:]).all()


def test_the_layout_is_a_function_of_the_log_and_state_dicts_hold_sorted_entries():
    a, b = EdgeHistory(), EdgeHistory(capacity=50_000)  # same log, different starting sizes
    for u, v, t in _batches(20, 1000, 2000, seed=1):
        a.insert(u, v, t)
    for u, v, t in _batches(20, 1000, 2000, seed=1):
        b.insert(u, v, t)
    c = EdgeHistory()
    for u, v, t in _batches(20, 1000, 2000, seed=1):
        c.insert(u, v, t)
    assert torch.equal(a.keys, c.keys) and torch.equal(a.counts, c.counts)  # same log, same table
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the saved form does not depend on the layout
    assert torch.all(sa["keys"][1:] > sa["keys"][:-1]) and sa["keys"].numel() == len(a)
    restored = EdgeHistory()
    restored.load_state_dict(sa)
    u, v = torch.randint(2000, (5000,)), torch.randint(2000, (5000,))
    assert all(
        torch.equal(x, y) for x, y in zip(restored.lookup(u, v), a.lookup(u, v)) if x.dtype != torch.float64
    )
    la, lr = a.lookup(u, v)[1], restored.lookup(u, v)[1]
    assert torch.equal(torch.nan_to_num(la, -1), torch.nan_to_num(lr, -1))


def test_keys_that_share_a_home_slot_are_placed_and_found():
    h = EdgeHistory()
    mask = h.keys.numel() - 1
    from tgnstream.core.edge_history import _home

    # Pairs whose keys hash to the same first slot (found by search): linear probing places
    # them in key order, and a lookup of each walks to it.
    u = torch.arange(200_000) // 1000
    v = torch.arange(200_000) % 1000 + 1000
    homes = _home(pair_keys(u, v), mask)
    same = (homes == homes[0]).nonzero().squeeze(1)[:6]
    assert same.numel() >= 3
    h.insert(u[same], v[same], torch.arange(same.numel(), dtype=torch.float64))
    counts, last = h.lookup(u[same], v[same])
    assert counts.tolist() == [1] * same.numel() and last.tolist() == list(map(float, range(same.numel())))
