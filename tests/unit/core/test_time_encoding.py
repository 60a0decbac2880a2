"""Fixed vs learned time encoding: what trains, what is saved."""

from __future__ import annotations

import math

import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.modules import TimeEncoder
from tgnstream.core.step import ScoredBatch, TemporalStep


def test_encoding_is_cos_of_the_log_spaced_frequencies():
    enc = TimeEncoder(4, learnable=False)
    got = enc(torch.tensor([0.0, 2.0], dtype=torch.float64))
    want = [[math.cos(10.0 ** -(9 * i / 3) * dt) for i in range(4)] for dt in (0.0, 2.0)]
    torch.testing.assert_close(got, torch.tensor(want))


@pytest.mark.parametrize("mode", ["fixed", "learned"])
def test_fixed_encoding_never_changes_and_learned_one_trains(mode):
    cfg = ModelConfig.preset("tgn", memory_dim=8, time_dim=4, embedding_dim=8, time_encoding=mode)
    torch.manual_seed(0)
    engine = MemoryEngine(cfg, capacity=10)
    enc = engine.model.time_encoder
    names = {n for n, _ in engine.model.named_parameters()}
    assert ("time_encoder.w" in names) == (mode == "learned")
    assert "model.time_encoder.w" in engine.state_dict(), "checkpoints keep the same keys"
    before = enc.w.detach().clone()
    opt = torch.optim.SGD(engine.model.parameters(), lr=1.0)
    src, dst = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    t = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for _ in range(3):  # the second pass sees neighbours, so phi(dt) of real gaps enters the loss
        inputs = engine.gather_pairs(src, dst, t + 10)
        logits, fresh = engine.pair_forward(inputs, engine.fetch_memory(inputs.embedding.nodes))
        logits.sum().backward()
        opt.step()
        opt.zero_grad()
        batch = EventBatch(src, dst, t + 10, torch.zeros(3, 0))
        TemporalStep(engine).apply(ScoredBatch(batch, logits, logits[:0], fresh))
        t = t + 10
    changed = not torch.equal(enc.w.detach(), before)
    assert changed == (mode == "learned")
