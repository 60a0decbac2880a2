"""state_dtype: memories and pending messages stored in 16 bits, computed in float32."""

from __future__ import annotations

import copy

import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.step import TemporalStep
from tgnstream.core.synthetic import generate_stream


def _engines():
    torch.manual_seed(0)
    cfg = ModelConfig(memory_dim=16, time_dim=8, embedding_dim=16, num_neighbors=4, pair_features=True)
    full = MemoryEngine(cfg, capacity=64).eval()
    half = MemoryEngine(cfg.model_copy(update={"state_dtype": "bfloat16"}), capacity=64).eval()
    half.model.load_state_dict(full.model.state_dict())
    return full, half


def test_the_first_batch_stores_the_float32_result_rounded():
    full, half = _engines()
    batch = generate_stream(40, num_src=10, num_dst=10, seed=1).events
    with torch.no_grad():
        TemporalStep(full).apply(batch)
        TemporalStep(half).apply(batch)
    assert half.memory.memory.dtype == torch.bfloat16 and half.memory.mail.dtype == torch.bfloat16
    # From an empty state the computation is the same; only the stored values are rounded.
    assert torch.equal(half.memory.memory, full.memory.memory.to(torch.bfloat16))
    assert torch.equal(half.memory.mail, full.memory.mail.to(torch.bfloat16))
    assert half.memory.memory.element_size() * 2 == full.memory.memory.element_size()


def test_scores_stay_close_and_a_float32_checkpoint_loads_rounded():
    full, half = _engines()
    stream = generate_stream(2000, num_src=30, num_dst=20, seed=2).events
    with torch.no_grad():
        for i in range(0, 2000, 100):
            TemporalStep(full).apply(stream.slice(i, i + 100))
            TemporalStep(half).apply(stream.slice(i, i + 100))
    src, dst = stream.src[-50:], stream.dst[-50:]
    t = torch.full((50,), float(stream.t[-1]), dtype=torch.float64)
    p_full, p_half = full.score(src, dst, t), half.score(src, dst, t)
    assert p_half.dtype == torch.float32 and float((p_full - p_half).abs().max()) < 0.05
    loaded = copy.deepcopy(half)
    loaded.load_state_dict(full.state_dict())  # float32 state into bfloat16 storage
    assert torch.equal(loaded.memory.memory, full.memory.memory.to(torch.bfloat16))
