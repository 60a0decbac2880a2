"""``batch_neighbors``: attention at batch position k sees the K most recent interactions among
everything before it (table and the batch's events 0..k-1), never its own or later events."""

from __future__ import annotations

import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep

SMALL = dict(memory_dim=8, time_dim=8, embedding_dim=8, decoder_hidden=8, num_neighbors=3)


def _stream(n: int, nodes: int, seed: int, edge_dim: int = 0) -> EventBatch:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(nodes, (n,), generator=g)
    dst = (src + 1 + torch.randint(nodes - 1, (n,), generator=g)) % nodes
    t = torch.cumsum(torch.rand(n, generator=g, dtype=torch.float64) + 0.01, 0)  # strictly increasing
    return EventBatch(src, dst, t, torch.randn(n, edge_dim, generator=g))


def _naive_neighbors(past: list[tuple[int, int, float]], node: int, k: int) -> list[tuple[int, float]]:
    mine = [(d if s == node else s, t) for s, d, t in past if node in (s, d)]
    return mine[-k:]


@pytest.mark.parametrize("batch_size", [1, 7, 30])
def test_neighbour_sets_equal_a_naive_scan(batch_size):
    stream = _stream(150, 9, seed=batch_size)
    engine = MemoryEngine(ModelConfig.preset("tgn", **SMALL, batch_neighbors=True), capacity=9)
    events = list(zip(stream.src.tolist(), stream.dst.tolist(), stream.t.tolist()))
    for i in range(0, len(stream), batch_size):
        batch = stream.slice(i, i + batch_size)
        b = len(batch)
        nodes = torch.cat([batch.src, batch.dst])
        visible = torch.arange(b).repeat(2)
        inp = engine.gather_embedding(nodes, batch.t.repeat(2), batch, visible)
        for j in range(2 * b):
            row = int(inp.inv[j])
            assert int(inp.query_nodes[row]) == int(nodes[j])
            got_ids = sorted(int(inp.nodes[inp.nb_idx[row, s]]) for s in range(3) if inp.mask[row, s])
            want = _naive_neighbors(events[: i + int(visible[j])], int(nodes[j]), 3)
            assert got_ids == sorted(x for x, _ in want), f"event {i + j % b}"
            # Times: the query's (earliest) time minus the gap recovers each neighbour's time.
            times = sorted(float(inp.t_query[row] - inp.nb_dt[row, s]) for s in range(3) if inp.mask[row, s])
            assert times == pytest.approx(sorted(t for _, t in want))
        TemporalStep(engine).apply(batch)


@torch.no_grad()
def _scores(engine: MemoryEngine, stream: EventBatch, batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(stream), batch_size):
        b = stream.slice(i, i + batch_size)
        inputs = engine.gather_pairs(b.src, b.dst, b.t, b, torch.arange(len(b)))
        out.append(torch.sigmoid(engine.pair_forward(inputs, engine.fetch_memory(inputs.embedding.nodes))[0]))
        TemporalStep(engine).apply(b)
    return torch.cat(out)


def test_no_leakage_with_batch_neighbours():
    cfg = ModelConfig.preset("tgn", **{**SMALL, "num_neighbors": 4}, edge_dim=2, batch_neighbors=True)
    torch.manual_seed(0)
    base_engine = MemoryEngine(cfg, capacity=10)
    base_engine.eval()
    weights = {k: v.clone() for k, v in base_engine.state_dict().items()}
    stream = _stream(120, 10, seed=1, edge_dim=2)
    base = _scores(base_engine, stream, 16)
    for j in (0, 37, 64, 100):
        feats, src, dst = stream.feats.clone(), stream.src.clone(), stream.dst.clone()
        feats[j:] = torch.randn_like(feats[j:]) * 5
        src[j + 1 :] = torch.randint(10, (len(stream) - j - 1,))
        dst[j + 1 :] = (src[j + 1 :] + 1) % 10
        engine = MemoryEngine(cfg, capacity=10)
        engine.load_state_dict(weights)
        engine.eval()
        got = _scores(engine, EventBatch(src, dst, stream.t, feats), 16)
        assert torch.equal(got[: j + 1], base[: j + 1]), f"changing events >= {j} moved an earlier score"
    # ... and the batch's earlier events do reach later queries (otherwise nothing was tested).
    plain = MemoryEngine(cfg.model_copy(update={"batch_neighbors": False}), capacity=10)
    plain.load_state_dict(weights)
    plain.eval()
    assert not torch.equal(_scores(plain, stream, 16), base)
