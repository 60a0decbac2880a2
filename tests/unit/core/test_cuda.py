"""CUDA runs give the CPU results (run on a GPU machine: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
]


@pytest.mark.parametrize("pair_features", [False, True])
def test_cuda_matches_cpu(pair_features):
    cfg = ModelConfig(memory_dim=16, time_dim=8, embedding_dim=16, edge_dim=2, pair_features=pair_features)
    torch.manual_seed(0)
    cpu = MemoryEngine(cfg, capacity=8)
    cpu.eval()
    gpu = MemoryEngine(cfg, capacity=8, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    gpu.eval()
    g = torch.Generator().manual_seed(1)
    n = 400
    stream = EventBatch(
        torch.randint(30, (n,), generator=g),
        torch.randint(30, (n,), generator=g),
        torch.cumsum(torch.rand(n, generator=g), 0).double(),
        torch.randn(n, 2, generator=g),
    )
    for i in range(0, n, 50):
        b = stream.slice(i, i + 50)
        s_cpu = cpu.score(b.src, b.dst, b.t)
        s_gpu = gpu.score(*(x.cuda() for x in (b.src, b.dst, b.t)))
        torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-4, rtol=1e-4)
        TemporalStep(cpu).apply(b)
        TemporalStep(gpu).apply(b.to("cuda"))
    torch.testing.assert_close(gpu.memory.memory.cpu(), cpu.memory.memory, atol=1e-4, rtol=1e-4)
    ids, scores = gpu.top_k(3, float(stream.t[-1]), 5)
    ids_c, scores_c = cpu.top_k(3, float(stream.t[-1]), 5)
    torch.testing.assert_close(scores.cpu(), scores_c, atol=1e-4, rtol=1e-4)
