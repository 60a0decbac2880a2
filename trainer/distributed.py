"""Data-parallel training over ranks: ``torchrun`` + DistributedDataParallel (gloo on CPU, nccl on
CUDA).

A large temporal batch is split across ranks: every rank samples the whole batch's negatives
(same seed, same draws), scores only its shard of the events (contiguous rows; the whole batch
stays their context, so each prediction sees exactly what it sees on one rank), and DDP averages
the gradients. Every rank then applies the *whole* batch to its own state, with the folds of the
union of all shards' nodes (gathered from every rank), so the states stay identical to each
other and to a single rank's, step after step. With equal shards (the batch size a multiple of
the world size) the averaged gradient is the single-rank gradient of the batch-mean loss; PRES's
coherence term is then the mean of per-shard means (its nodes overlap across shards).

When it helps: the step's forward and backward shrink by the world size, the apply (memory
folds, table inserts) does not; so data parallelism pays for large batches of an expensive model
(attention embeddings, many neighbours, wide memory), on GPUs or on several CPU sockets. On a
single 2-core machine it does not.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tgnstream.core.step import GatheredBatch, ScoredBatch, TemporalStep
from tgnstream.trainer.offline import run_epoch
from tgnstream.trainer.pipeline import EpochBatches

__all__ = ["ShardedBatches", "StepModule", "init_distributed", "run_epoch_distributed", "shard_rows"]


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment;
    gloo on CPU, nccl on CUDA); returns ``(rank, world_size)`` (``(0, 1)`` without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard_rows(batch_size: int, rank: int, world: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The rows ``[R]`` of a batch that ``rank`` scores: contiguous, sizes differ by at most 1."""
    return torch.tensor_split(torch.arange(batch_size, device=device), world)[rank]


class StepModule(nn.Module):
    """What DDP wraps: the step's forward (score + loss) over the engine's model parameters. The
    engine's state is not a parameter or buffer of this module (DDP never broadcasts it: every
    rank keeps its own, identical by construction)."""

    def __init__(self, step: TemporalStep):
        super().__init__()
        self.model = step.engine.model
        self._step = step
        self.last: ScoredBatch | None = None

    def forward(self, gathered: GatheredBatch) -> torch.Tensor:
        scored = self._step.score(gathered)
        self.last = scored
        return self._step.loss(scored)


class ShardedBatches(EpochBatches):
    """An epoch's batches over events ``[0, stop)`` as this rank's shards (sequential step; see
    the module docstring). ``apply`` applies the whole batch."""

    def __init__(self, *args, rank: int, world: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[GatheredBatch]:
        step, engine, sampler = self.step, self.step.engine, self.sampler
        for start in range(0, self.stop, self.batch_size):
            batch = self.data.events.slice(start, min(start + self.batch_size, self.stop)).to(engine.device)
            neg = sampler.sample(
                batch.src, self.negatives, self.historical_ratio, engine.neighbors, exclude=batch.dst
            )
            rows = shard_rows(len(batch), self.rank, self.world, engine.device)
            gathered = step.gather(batch, neg, rows)
            if sampler.sampling_correction:
                cands = torch.cat([batch.dst.unsqueeze(1), neg.view(len(batch), -1)], 1)
                ratio = sampler.log_sampling_ratio(
                    batch.src, cands, self.negatives, self.historical_ratio, engine.neighbors, batch.dst
                )
                gathered = replace(gathered, logit_offset=-ratio[rows].t().reshape(-1))
            gathered = step.fetch(gathered)
            self.staleness.add(0, 0, 0, gathered.memory.nodes.numel())
            yield gathered

    @torch.no_grad()
    def apply(self, scored: ScoredBatch) -> None:
        """The whole batch, with the folds of every rank's nodes (the union a single rank's
        full-batch forward folds), so every rank persists the same state."""
        engine = self.step.engine
        mine = scored.fresh.nodes.cpu().tolist()
        if self.world > 1:
            every: list[list[int]] = [[] for _ in range(self.world)]
            dist.all_gather_object(every, mine)
            nodes = torch.tensor(
                sorted({n for part in every for n in part}), dtype=torch.long, device=engine.device
            )
        else:
            nodes = scored.fresh.nodes
        fresh = engine.fold(engine.fetch_memory(nodes))
        self.step.apply(replace(scored, fresh=fresh), learn=True)


def run_epoch_distributed(
    ddp: DistributedDataParallel,
    batches: ShardedBatches,
    optimizer: torch.optim.Optimizer,
    reset: bool = True,
) -> float:
    """``run_epoch`` (the one epoch loop) for ranks: per batch, this rank's shard through the
    DDP-wrapped step (score -> loss), the whole batch applied, backward (DDP averages the
    gradients), optimizer step. Returns this rank's mean loss."""

    def forward(gathered: GatheredBatch) -> tuple[ScoredBatch, torch.Tensor]:
        loss = ddp(gathered)
        return ddp.module.last, loss

    return run_epoch(batches.step, batches, optimizer, reset=reset, forward=forward)


def wrap(step: TemporalStep) -> DistributedDataParallel:
    """The step's model in DDP (parameters broadcast from rank 0 at construction)."""
    device_ids = [step.engine.device.index] if step.engine.device.type == "cuda" else None
    # The model's buffers are the same on every rank; never re-broadcast them per step.
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    buffers = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    )
    # Which parameters a step uses depends on its events (a first batch folds no message), so
    # DDP must look for unused ones at every step.
    return DistributedDataParallel(
        StepModule(step), device_ids=device_ids, find_unused_parameters=True, **buffers
    )
