"""Temporal attention over more queries than one pass takes (a catalog's candidates) runs in
chunks: the same embeddings as one pass over all of them, and each query's embedding the same
as when it is asked alone."""

from __future__ import annotations

import torch

from tgnstream.core import modules
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep


def _engine() -> MemoryEngine:
    torch.manual_seed(0)
    engine = MemoryEngine(ModelConfig.preset("recommended", width=16, edge_dim=3), 64).eval()
    g = torch.Generator().manual_seed(1)
    n = 600
    src, dst = torch.randint(40, (n,), generator=g), torch.randint(40, 60, (n,), generator=g)
    t = torch.cumsum(torch.rand(n, generator=g, dtype=torch.float64), 0)
    for i in range(0, n, 100):
        TemporalStep(engine).apply(
            EventBatch(src[i : i + 100], dst[i : i + 100], t[i : i + 100], torch.randn(100, 3, generator=g))
        )
    return engine


def test_chunked_attention_equals_one_pass_and_queries_alone(monkeypatch):
    engine = _engine()
    nodes = torch.arange(60).flip(0)  # 60 queries (a call embeds each node once), some without neighbours
    t = torch.linspace(300.0, 400.0, 60, dtype=torch.float64)
    with torch.no_grad():
        whole = engine.embed(nodes, t)
        monkeypatch.setattr(modules, "ATTENTION_CHUNK", 7)
        chunked = engine.embed(nodes, t)
        alone = torch.cat([engine.embed(nodes[i : i + 1], t[i : i + 1]) for i in range(0, 60, 7)])
    assert torch.allclose(chunked, whole, atol=1e-6, rtol=0)
    assert torch.allclose(alone, whole[::7], atol=1e-6, rtol=0)
    assert whole.abs().sum() > 0
