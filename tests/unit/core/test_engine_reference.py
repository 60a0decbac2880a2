"""The vectorised engine against a naive per-event Python loop (independent reference)."""

from __future__ import annotations

import random

import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep


def random_stream(num_events: int, num_nodes: int, edge_dim: int, seed: int) -> EventBatch:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(num_nodes, (num_events,), generator=g)
    dst = torch.randint(num_nodes, (num_events,), generator=g)
    # Integer-valued gaps with zeros so equal timestamps inside a batch occur too.
    t = torch.cumsum(torch.randint(0, 3, (num_events,), generator=g), 0).double()
    feats = torch.randn(num_events, edge_dim, generator=g)
    return EventBatch(src, dst, t, feats)


class NaiveState:
    """Per-event, per-node Python re-implementation of the engine's state semantics."""

    def __init__(self, engine: MemoryEngine, num_nodes: int):
        d = engine.config.memory_dim
        self.model = engine.model
        self.agg = engine.config.aggregator
        self.mem = {n: torch.zeros(d) for n in range(num_nodes)}
        self.last = {n: 0.0 for n in range(num_nodes)}
        self.mail: dict[int, tuple[torch.Tensor, float, int]] = {}  # node -> (sum/last, ts, count)
        self.nbrs: dict[int, list[tuple[int, float]]] = {n: [] for n in range(num_nodes)}

    def fold(self, n: int) -> None:
        if n not in self.mail:
            return
        vec, ts, count = self.mail.pop(n)
        mail = vec / count if self.agg == "mean" else vec
        dt = torch.tensor([max(ts - self.last[n], 0.0)], dtype=torch.float64)
        self.mem[n] = self.model.update_memory(mail.unsqueeze(0), dt, self.mem[n].unsqueeze(0))[0]
        self.last[n] = ts

    def apply(self, batch: EventBatch) -> None:
        nodes = sorted(set(batch.src.tolist()) | set(batch.dst.tolist()))
        for n in nodes:
            self.fold(n)
        for i in range(len(batch)):
            s, d, t = int(batch.src[i]), int(batch.dst[i]), float(batch.t[i])
            e = batch.feats[i]
            for me, other in ((s, d), (d, s)):
                raw = torch.cat([self.mem[me], self.mem[other], e])
                if self.agg == "last" or me not in self.mail:
                    self.mail[me] = (raw, t, 1)
                else:
                    acc, _, c = self.mail[me]
                    self.mail[me] = (acc + raw, t, c + 1)
                self.nbrs[me].append((other, t))


@pytest.mark.parametrize("aggregator", ["last", "mean"])
@pytest.mark.parametrize("batch_size", [1, 7, 50])
def test_apply_matches_naive_loop(aggregator, batch_size):
    torch.manual_seed(0)
    num_nodes, edge_dim = 12, 3  # few nodes: many repeats inside one batch
    cfg = ModelConfig(
        memory_dim=8, time_dim=4, embedding_dim=8, edge_dim=edge_dim, aggregator=aggregator, num_neighbors=4
    )
    engine = MemoryEngine(cfg, capacity=num_nodes)
    engine.eval()
    naive = NaiveState(engine, num_nodes)
    stream = random_stream(150, num_nodes, edge_dim, seed=batch_size)
    with torch.no_grad():
        for i in range(0, len(stream), batch_size):
            batch = stream.slice(i, i + batch_size)
            TemporalStep(engine).apply(batch)
            naive.apply(batch)
        for n in range(num_nodes):
            torch.testing.assert_close(engine.memory.memory[n], naive.mem[n], atol=1e-6, rtol=1e-5)
            assert float(engine.memory.last_update[n]) == naive.last[n]
            assert bool(engine.memory.has_mail[n]) == (n in naive.mail)
            if n in naive.mail:
                vec, ts, count = naive.mail[n]
                expect = vec / count if aggregator == "mean" else vec
                torch.testing.assert_close(engine.memory.mail[n], expect, atol=1e-6, rtol=1e-5)
                assert float(engine.memory.mail_ts[n]) == ts
        # Fresh memories (pending mail folded) also agree.
        fresh = engine.fresh_memory(torch.arange(num_nodes))
        for n in range(num_nodes):
            naive.fold(n)
            torch.testing.assert_close(fresh.memory[n], naive.mem[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_neighbor_table_matches_naive(k):
    num_nodes = 9
    cfg = ModelConfig(memory_dim=4, time_dim=4, embedding_dim=4, num_neighbors=k)
    engine = MemoryEngine(cfg, capacity=num_nodes)
    naive = NaiveState(engine, num_nodes)
    stream = random_stream(120, num_nodes, 0, seed=k)
    for i in range(0, len(stream), 13):
        batch = stream.slice(i, i + 13)
        TemporalStep(engine).apply(batch)
        naive.apply(batch)
        for n in range(num_nodes):
            ids, ts, _, mask = engine.neighbors.gather(torch.tensor([n]))
            got = sorted(zip(ids[0][mask[0]].tolist(), ts[0][mask[0]].tolist()))
            want = sorted(naive.nbrs[n][-k:])
            assert got == want, f"node {n} after {i + 13} events"


def test_edge_history_matches_naive():
    engine = MemoryEngine(ModelConfig(memory_dim=4, time_dim=4, embedding_dim=4), capacity=20)
    stream = random_stream(300, 20, 0, seed=3)
    counts: dict[tuple[int, int], int] = {}
    last: dict[tuple[int, int], float] = {}
    rng = random.Random(0)
    for i in range(0, len(stream), 37):
        batch = stream.slice(i, i + 37)
        TemporalStep(engine).apply(batch)
        for s, d, t in zip(batch.src.tolist(), batch.dst.tolist(), batch.t.tolist()):
            key = (min(s, d), max(s, d))
            counts[key] = counts.get(key, 0) + 1
            last[key] = max(last.get(key, float("-inf")), t)
        u = torch.tensor([rng.randrange(20) for _ in range(50)])
        v = torch.tensor([rng.randrange(20) for _ in range(50)])
        c, lt = engine.history.lookup(u, v)
        for j in range(50):
            key = (min(int(u[j]), int(v[j])), max(int(u[j]), int(v[j])))
            assert int(c[j]) == counts.get(key, 0)
            if key in last:
                assert float(lt[j]) == last[key]
            else:
                assert torch.isnan(lt[j])
    keys, n, _ = engine.history.entries()
    assert len(engine.history) == len(counts) == keys.numel()
    assert torch.all(keys[1:] > keys[:-1]), "entries are sorted and unique"
    assert dict(zip(keys.tolist(), n.tolist())) == {(a << 32) | b: c for (a, b), c in counts.items()}


def test_capacity_grows_and_keeps_state():
    cfg = ModelConfig(memory_dim=4, time_dim=4, embedding_dim=4, num_neighbors=2)
    engine = MemoryEngine(cfg, capacity=2)
    TemporalStep(engine).apply(EventBatch.from_lists([0, 1], [1, 0], [1.0, 2.0]))
    TemporalStep(engine).apply(EventBatch.from_lists([0], [1], [3.0]))
    before = engine.memory.memory[:2].clone()
    TemporalStep(engine).apply(EventBatch.from_lists([5], [40], [4.0]))
    assert engine.capacity >= 41
    torch.testing.assert_close(engine.memory.memory[:2], before)
    assert engine.neighbors.ids[40].tolist().count(5) == 1
