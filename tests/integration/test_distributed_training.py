"""Two CPU ranks (gloo, torch.distributed on loopback) against one rank on the same batches: the
same gradients at every step and the same final state (weights, memory, mailbox, neighbours,
pair history, PRES statistics), each rank scoring half of every batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.negatives import NegativeSampler
from tgnstream.core.step import TemporalStep
from tgnstream.core.synthetic import generate_stream
from tgnstream.trainer.offline import make_optimizer
from tgnstream.trainer.pipeline import SequentialBatches

BATCH, STOP = 200, 1_000
MODEL = dict(width=16, pair_features=True, activity_features=True, num_neighbors=5, pres=True, dropout=0.0)


def _setup():
    torch.manual_seed(0)
    data = generate_stream(STOP, num_src=50, num_dst=30, seed=2)
    engine = MemoryEngine(ModelConfig.preset("tgn", **MODEL), data.num_nodes)
    sampler = NegativeSampler(data.dst_nodes, seed=5, sampling_correction=True)
    # beta = 0: PRES's coherence term is a mean over nodes that overlap across shards (see
    # trainer/distributed.py); the prediction-correction itself is on.
    step = TemporalStep(engine, coherence_weight=0.0)
    return data, engine, sampler, step


def _grads(engine) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in engine.model.parameters() if p.grad is not None])


def _single_rank():
    data, engine, sampler, step = _setup()
    optimizer = make_optimizer(engine.model.parameters(), 1e-3)
    engine.train()
    grads = []
    for gathered in SequentialBatches(step, data, STOP, BATCH, sampler, 0.5):
        scored = step.score(gathered)
        loss = step.loss(scored)
        step.apply(scored, learn=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads.append(_grads(engine).clone())
        optimizer.step()
    return grads, {k: v.clone() for k, v in engine.state_dict().items()}


def _rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from tgnstream.trainer.distributed import ShardedBatches, wrap

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        data, engine, sampler, step = _setup()
        ddp = wrap(step)
        optimizer = make_optimizer(engine.model.parameters(), 1e-3)
        engine.train()
        grads = []
        batches = ShardedBatches(step, data, STOP, BATCH, sampler, 0.5, rank=rank, world=world)
        for gathered in batches:
            loss = ddp(gathered)
            batches.apply(ddp.module.last)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads.append(_grads(engine).clone())
            optimizer.step()
        torch.save({"grads": grads, "state": engine.state_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_gloo_ranks_match_one_rank(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = str(tmp_path / "rank")
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    want_grads, want_state = _single_rank()
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    for got in ranks:
        assert len(got["grads"]) == len(want_grads) == STOP // BATCH
        for i, (g, w) in enumerate(zip(got["grads"], want_grads)):
            torch.testing.assert_close(
                g, w, rtol=1e-4, atol=1e-6, msg=lambda m, i=i: f"gradient of step {i}: {m}"
            )
        assert got["state"].keys() == want_state.keys()
        for k, v in want_state.items():
            torch.testing.assert_close(
                got["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}"
            )
    # The two ranks hold the same state bit for bit (they applied the same batches the same way).
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k
