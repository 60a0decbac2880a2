"""Where a training epoch's batches come from: gathered inline (the sequential step) or by a
producer thread running ahead of the trainer (MSPipe, docs/architecture.md §6).

The pipelined source splits the state in two (``MemoryEngine.record`` / ``apply_memory``):
- **structure** (neighbour table, pair history) does not depend on the weights, so the producer
  gathers batch i's structure exactly (negatives, neighbour rows, pair statistics), records
  batch i's events, and goes on to batch i+1 while the trainer is still on batch i;
- **memory** is written back by the trainer after each forward. The producer fetches batch i's
  memory rows as late as possible: as soon as batch i-1's write-back is done, or, when the
  trainer is already waiting for batch i, with at most ``depth`` write-backs missing (never
  more). ``depth = 0`` is therefore exactly the sequential step. Write-backs happen in batch
  order under a lock (no torn rows) and never move a node's times backwards.
- **mitigation** (MSPipe): a query node whose fetched memory misses a write-back that touched it
  is mixed with its more recently updated neighbours: ``lam * s_v + (1 - lam) * mean(s_u)``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from tgnstream.core.events import TemporalDataset
from tgnstream.core.inputs import EmbeddingInputs, MemoryRows
from tgnstream.core.negatives import NegativeSampler
from tgnstream.core.step import GatheredBatch, ScoredBatch, TemporalStep

__all__ = ["EpochBatches", "SequentialBatches", "PipelinedBatches", "StalenessStats", "mitigate_staleness"]


@dataclass
class StalenessStats:
    """How stale the memory reads of an epoch were.

    batches: histogram, ``batches[s]`` = batches whose memory missed ``s`` earlier write-backs;
    stale_nodes: memory rows read before a write-back that touched them; mitigated: query nodes
    corrected with their neighbours; rows: memory rows read in all.
    """

    batches: list[int] = field(default_factory=list)
    stale_nodes: int = 0
    mitigated: int = 0
    rows: int = 0

    def add(self, staleness: int, stale_nodes: int, mitigated: int, rows: int) -> None:
        while len(self.batches) <= staleness:
            self.batches.append(0)
        self.batches[staleness] += 1
        self.stale_nodes += stale_nodes
        self.mitigated += mitigated
        self.rows += rows

    def merge(self, other: StalenessStats) -> None:
        for s, n in enumerate(other.batches):
            while len(self.batches) <= s:
                self.batches.append(0)
            self.batches[s] += n
        self.stale_nodes += other.stale_nodes
        self.mitigated += other.mitigated
        self.rows += other.rows

    @property
    def max_staleness(self) -> int:
        return max((s for s, n in enumerate(self.batches) if n), default=0)

    def as_dict(self) -> dict:
        return {
            "batches_by_staleness": list(self.batches),
            "max_staleness": self.max_staleness,
            "stale_node_rows": self.stale_nodes,
            "mitigated_nodes": self.mitigated,
            "memory_rows_read": self.rows,
        }


def mitigate_staleness(
    rows: MemoryRows, inputs: EmbeddingInputs, stale: torch.Tensor, lam: float
) -> tuple[MemoryRows, int]:
    """MSPipe's staleness mitigation on fetched rows (returns the new rows and how many nodes
    changed): each stale query node ``v`` (``stale [U]`` over ``rows.nodes``) that has neighbours
    updated more recently than itself gets ``lam * s_v + (1 - lam) * mean(s_u)`` over those
    neighbours. Similarity is the neighbour table's (the nodes it recently interacted with).
    Needs attention inputs (neighbour rows); others are returned unchanged."""
    if inputs.nb_idx is None:
        return rows, 0
    q = inputs.q_idx
    which = stale[q].nonzero().squeeze(1)
    if which.numel() == 0:
        return rows, 0
    q_rows, nb, ok = q[which], inputs.nb_idx[which], inputs.mask[which]
    newer = ok & (rows.last_update[nb] > rows.last_update[q_rows].unsqueeze(1))
    count = newer.sum(1)
    has = count > 0
    if not bool(has.any()):
        return rows, 0
    mean = (rows.memory[nb] * newer.unsqueeze(-1)).sum(1) / count.clamp(min=1).unsqueeze(1)
    target = q_rows[has]
    memory = rows.memory.clone()
    memory[target] = lam * rows.memory[target] + (1 - lam) * mean[has]
    return replace(rows, memory=memory), int(target.numel())


class EpochBatches:
    """An epoch's batches over events ``[0, stop)``: what both sources share."""

    def __init__(
        self,
        step: TemporalStep,
        data: TemporalDataset,
        stop: int,
        batch_size: int,
        sampler: NegativeSampler,
        historical_ratio: float,
        negatives: int = 1,
    ):
        if negatives < 1:
            raise ValueError(f"negatives per event must be >= 1, got {negatives}")
        self.step, self.data, self.stop, self.batch_size = step, data, stop, batch_size
        self.sampler, self.historical_ratio, self.negatives = sampler, historical_ratio, negatives
        self.staleness = StalenessStats()

    def __len__(self) -> int:
        return -(-self.stop // self.batch_size)

    def _gather(self, start: int) -> GatheredBatch:
        """The batch starting at event ``start`` with its negatives and structure (no memory):
        negatives and structure read the state before the batch."""
        engine = self.step.engine
        batch = self.data.events.slice(start, min(start + self.batch_size, self.stop)).to(engine.device)
        neg = self.sampler.sample(
            batch.src, self.negatives, self.historical_ratio, engine.neighbors, exclude=batch.dst
        )  # [B] for one negative per event, else [B, negatives]
        gathered = self.step.gather(batch, neg)
        if self.sampler.sampling_correction:
            cands = torch.cat([batch.dst.unsqueeze(1), neg.view(len(batch), -1)], 1)  # [B, 1 + N]
            ratio = self.sampler.log_sampling_ratio(
                batch.src, cands, self.negatives, self.historical_ratio, engine.neighbors, batch.dst
            )
            # logits - log(q/p) (the order of inputs)
            gathered = replace(gathered, logit_offset=-ratio.t().reshape(-1))
        return gathered


class SequentialBatches(EpochBatches):
    """The sequential step's batches: negatives, gather and fetch inline, just before each
    forward; ``apply`` right after it."""

    def __iter__(self) -> Iterator[GatheredBatch]:
        for start in range(0, self.stop, self.batch_size):
            gathered = self.step.fetch(self._gather(start))
            self.staleness.add(0, 0, 0, gathered.memory.nodes.numel())
            yield gathered

    def apply(self, scored: ScoredBatch) -> None:
        self.step.apply(scored, learn=True)


class PipelinedBatches(EpochBatches):
    """Batches prepared by a producer thread, up to ``depth`` write-backs ahead (see module doc).

    Args:
        depth: k, the most write-backs a memory read may miss (0: exact sequential semantics).
        mitigation: lambda of the staleness mitigation (None: off).
        eager_fetch: fetch as soon as the bound allows instead of as late as possible (shows
            the worst case of a given depth; tests and ablations).
        threads: torch intra-op threads while the epoch runs (default: one fewer than set, so
            the producer has a core: two threads each running multi-threaded ops on the same
            cores slow each other down). torch's setting is process-wide, so it is set here,
            once, and restored when the epoch ends.

    The producer gathers batch i+1's structure while the trainer runs batch i, and hands over
    one fetched batch at a time (a fetch waits for the trainer to take the previous batch, so
    that it happens as late as it can).
    """

    def __init__(
        self,
        step: TemporalStep,
        data: TemporalDataset,
        stop: int,
        batch_size: int,
        sampler: NegativeSampler,
        historical_ratio: float,
        depth: int,
        mitigation: float | None = 0.9,
        eager_fetch: bool = False,
        threads: int | None = None,
        negatives: int = 1,
    ):
        if depth < 0:
            raise ValueError(f"pipeline depth must be >= 0, got {depth}")
        engine = step.engine
        if int(data.events.src.max()) >= engine.capacity or int(data.events.dst.max()) >= engine.capacity:
            raise ValueError("the pipeline needs the engine's capacity reserved for every node up front")
        super().__init__(step, data, stop, batch_size, sampler, historical_ratio, negatives)
        self.depth, self.mitigation, self.eager_fetch = depth, mitigation, eager_fetch
        self.threads = threads
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._cond = threading.Condition()
        self._memory_lock = threading.Lock()
        self._written = 0  # batches whose memory write-back is done
        self._taken = 0  # batches the trainer has taken
        self._waiting = False  # the trainer waits for its next batch
        self._touched: dict[int, torch.Tensor] = {}  # batch -> its endpoints, until written back
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------- producer
    def _produce(self) -> None:
        engine = self.step.engine
        try:
            with torch.no_grad():
                for idx, start in enumerate(range(0, self.stop, self.batch_size)):
                    gathered = self._gather(start)
                    batch = gathered.batch
                    engine.record(batch)  # structure stays exact: later gathers see this batch
                    with self._cond:
                        self._touched[idx] = torch.unique(torch.cat([batch.src, batch.dst]))
                    gathered = self._fetch(idx, gathered)
                    if gathered is None:
                        return
                    while not self._stop.is_set():
                        try:
                            self._queue.put(gathered, timeout=0.1)
                            break
                        except queue.Full:
                            continue
            self._queue.put(None)
        except BaseException as e:  # surfaced to the trainer by __iter__
            self._error = e
            self._queue.put(None)

    def _ready(self, idx: int) -> bool:
        if self._written >= idx:
            return True  # nothing missing: as fresh as the sequential step
        allowed = self._written >= idx - self.depth and self._taken >= idx
        return allowed and (self.eager_fetch or self._waiting)

    def _fetch(self, idx: int, gathered: GatheredBatch) -> GatheredBatch | None:
        with self._cond:
            while not self._ready(idx):
                if self._stop.is_set():
                    return None
                self._cond.wait(0.1)
            with self._memory_lock:
                written = self._written
                gathered = self.step.fetch(gathered, staleness=idx - written)
                missing = [self._touched[j] for j in range(written, idx)]
        rows = gathered.memory
        stale_count = mitigated = 0
        if missing:
            stale = torch.isin(rows.nodes, torch.cat(missing))
            stale_count = int(stale.sum())
            if self.mitigation is not None and stale_count:
                fixed, mitigated = mitigate_staleness(rows, gathered.inputs.embedding, stale, self.mitigation)
                gathered = replace(gathered, memory=fixed)
        self.staleness.add(idx - written, stale_count, mitigated, rows.nodes.numel())
        return gathered

    # --------------------------------------------------------------------------- trainer
    def __iter__(self) -> Iterator[GatheredBatch]:
        configured = torch.get_num_threads()
        torch.set_num_threads(self.threads or max(1, configured - 1))
        self._thread = threading.Thread(target=self._produce, name="batch-producer", daemon=True)
        self._thread.start()
        try:
            while True:
                with self._cond:
                    self._waiting = True
                    self._cond.notify_all()
                item = self._queue.get()
                with self._cond:
                    self._waiting = False
                    if item is not None:
                        self._taken += 1
                    self._cond.notify_all()
                if item is None:
                    if self._error is not None:
                        raise RuntimeError("the batch producer failed") from self._error
                    return
                yield item
        finally:
            self.close()
            torch.set_num_threads(configured)

    def apply(self, scored: ScoredBatch) -> None:
        """Write the batch's memory back (in order; times never move backwards)."""
        with self._memory_lock:
            self.step.apply(scored, learn=True, record=False, in_order_only=self.depth > 0)
        with self._cond:
            self._touched.pop(self._written, None)
            self._written += 1
            self._cond.notify_all()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            while self._thread.is_alive():
                try:  # unblock a producer waiting on a full queue
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
            self._thread = None
