"""Exact causal pair statistics against a naive per-event scan of the whole past stream."""

from __future__ import annotations

import math

import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.pair_stats import pairwise_stats, ranking_stats
from tgnstream.core.step import TemporalStep


def naive(past: list[tuple[int, int, float]], u: int, v: int) -> tuple[int, float, float, float, int, int]:
    """count, last u-v time, latest time of u, latest time of v over ``past`` (-inf = never),
    events of u and of v (a self-loop is two)."""
    count, last, lu, lv, nu, nv = 0, -math.inf, -math.inf, -math.inf, 0, 0
    for s, d, t in past:
        if {s, d} == {u, v}:
            count, last = count + 1, max(last, t)
        if u in (s, d):
            lu = max(lu, t)
        if v in (s, d):
            lv = max(lv, t)
        nu += (s == u) + (d == u)
        nv += (s == v) + (d == v)
    return count, last, lu, lv, nu, nv


@pytest.mark.parametrize("sees", ["earlier", "whole"])  # training's prefix / serving's open batch
@pytest.mark.parametrize("batch_size", [1, 9, 40])
def test_stats_include_exactly_the_earlier_events(batch_size, sees):
    g = torch.Generator().manual_seed(batch_size)
    n, nodes = 160, 8
    stream = EventBatch(
        torch.randint(nodes, (n,), generator=g),
        torch.randint(nodes, (n,), generator=g),
        torch.cumsum(torch.randint(0, 3, (n,), generator=g), 0).double(),
        torch.zeros(n, 0),
    )
    # K larger than any node's degree, so the tables hold every past interaction.
    engine = MemoryEngine(ModelConfig(memory_dim=4, time_dim=4, embedding_dim=4, num_neighbors=64), nodes)
    events = list(zip(stream.src.tolist(), stream.dst.tolist(), stream.t.tolist()))
    cands = torch.tensor([5, 0, 3, 7, 1])  # unsorted on purpose
    for i in range(0, n, batch_size):
        batch = stream.slice(i, i + batch_size)
        b = len(batch)
        visible = torch.arange(b) if sees == "earlier" else torch.full((b,), b)
        neg = torch.randint(nodes, (b,), generator=g)
        pw = pairwise_stats(engine.history, engine.neighbors, batch.src, neg, batch, visible)
        rk = ranking_stats(engine.history, engine.neighbors, batch.src, cands, batch, visible)
        for k in range(b):
            past = events[: i + int(visible[k])]
            u = int(batch.src[k])
            want = naive(past, u, int(neg[k]))
            got = (
                int(pw.count[k]),
                float(pw.last[k]),
                float(pw.latest_u[k]),
                float(pw.latest_v[k]),
                int(pw.count_u[k]),
                int(pw.count_v[k]),
            )
            assert got == want, f"pairwise event {i + k}"
            for q, c in enumerate(cands.tolist()):
                want = naive(past, u, c)
                got = (
                    int(rk.count[k, q]),
                    float(rk.last[k, q]),
                    float(rk.latest_u[k, q]),
                    float(rk.latest_v[k, q]),
                    int(rk.count_u[k, q]),
                    int(rk.count_v[k, q]),
                )
                assert got == want, f"ranking event {i + k} candidate {c}"
        TemporalStep(engine).apply(batch)


def test_common_neighbours_dense_and_looped_paths_match_a_naive_count(monkeypatch):
    import tgnstream.core.pair_stats as ps
    from tgnstream.core.neighbors import RecentNeighbors

    g = torch.Generator().manual_seed(11)
    table = RecentNeighbors(30, 4, 0)
    n = 400
    src, dst = torch.randint(30, (n,), generator=g), torch.randint(30, (n,), generator=g)
    t = torch.sort(torch.rand(n, generator=g, dtype=torch.float64)).values
    table.insert(src, dst, t, torch.zeros(n, 0))
    u = torch.randint(30, (7, 1), generator=g)
    v = torch.randint(30, (1, 9), generator=g)  # broadcast: a [7, 9] ranking grid
    dense = ps._common(table.ids[u], table.ids[v])
    monkeypatch.setattr(ps, "_COMMON_DENSE_CELLS", 0)
    looped = ps._common(table.ids[u], table.ids[v])
    naive = torch.zeros(7, 9, dtype=torch.long)
    for i in range(7):
        for j in range(9):
            nu = [x for x in table.ids[u[i, 0]].tolist() if x >= 0]
            nv = table.ids[v[0, j]].tolist()
            naive[i, j] = sum(x in nv for x in nu)
    assert torch.equal(dense, naive) and torch.equal(looped, naive)
