"""Fixed-size batches from a stream of fetched chunks: the batch boundaries are a function of
the log alone (every ``size`` records, counted from where the state's offsets start), never of
arrival timing, so the state after a prefix of the log is the same however it was delivered.

The batch being filled is *open*: its valid events are kept (dense ids registered, time
screened) and shown to queries as batch context until the batch closes and is applied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from tgnstream.core.events import EventBatch
from tgnstream.stream.prefetch import FetchedBatch
from tgnstream.stream.source import SourceRecord

__all__ = ["ClosedBatch", "OpenBatchBuilder"]


@dataclass(frozen=True)
class ClosedBatch:
    """A full batch, ready to apply. ``events``: its valid events in time order (``[B]``);
    ``records``: the log records it counts (valid or not); ``next_offsets``: per partition, the
    next offset once it is applied; ``source(i)``: the Kafka record of ``events`` row ``i``."""

    events: EventBatch
    records: int
    next_offsets: dict[int, int]
    source: Callable[[int], SourceRecord]


@dataclass
class OpenBatchBuilder:
    """Accumulates the open batch. ``records``: log records counted into it (valid or not);
    per valid event (in log order): ``src``/``dst`` dense ids, ``ts``, ``feats``, and where its
    Kafka record is (chunk and position: ``source(i)`` rebuilds it, for dead letters at apply
    time, without a Python object per event on the way)."""

    size: int
    edge_dim: int
    records: int = 0
    next_offsets: dict[int, int] = field(default_factory=dict)
    _src: list[torch.Tensor] = field(default_factory=list)
    _dst: list[torch.Tensor] = field(default_factory=list)
    _ts: list[np.ndarray] = field(default_factory=list)
    _feats: list[np.ndarray] = field(default_factory=list)
    _chunks: list[tuple[FetchedBatch, np.ndarray]] = field(default_factory=list)
    # events() of the current content: asked for by the quality sample, the publication to
    # queries and the close of one chunk; built once per change.
    _built: tuple[EventBatch, np.ndarray] | None = None

    @property
    def room(self) -> int:
        """Records that still fit before the batch closes."""
        return self.size - self.records

    @property
    def full(self) -> bool:
        return self.records >= self.size

    def add(
        self,
        records: int,
        next_offsets: dict[int, int],
        src: torch.Tensor,
        dst: torch.Tensor,
        ts: np.ndarray,
        feats: np.ndarray,
        chunk: FetchedBatch,
        positions: np.ndarray,
    ) -> None:
        """Count ``records`` log records in (up to ``room``) with their valid events, which
        come from ``chunk`` at ``positions``."""
        if records > self.room:
            raise ValueError(f"{records} records do not fit in the open batch ({self.room} left)")
        self.records += records
        self.next_offsets.update(next_offsets)
        if ts.size:
            self._built = None
            self._src.append(src)
            self._dst.append(dst)
            self._ts.append(ts)
            self._feats.append(feats)
            self._chunks.append((chunk, positions))

    def events(self, device: torch.device) -> tuple[EventBatch, np.ndarray]:
        """The open events in time order (stable: ties keep log order) and, for each, its
        index in log order (what ``source`` takes)."""
        if self._built is None or self._built[0].src.device != torch.device(device):
            self._built = self._build(device)
        return self._built

    def _build(self, device: torch.device) -> tuple[EventBatch, np.ndarray]:
        if not self._ts:
            empty = EventBatch(
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.float64),
                torch.zeros(0, self.edge_dim),
            )
            return empty.to(device), np.zeros(0, dtype=np.int64)
        ts = np.concatenate(self._ts)
        order = np.argsort(ts, kind="stable")
        idx = torch.from_numpy(order)
        batch = EventBatch(
            torch.cat(self._src)[idx].contiguous(),
            torch.cat(self._dst)[idx].contiguous(),
            torch.from_numpy(np.ascontiguousarray(ts[order])),
            torch.from_numpy(np.ascontiguousarray(np.concatenate(self._feats)[order], dtype=np.float32)),
        )
        return batch.to(device), order

    def remap(self, ids: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give the open events other dense ids: ``ids(src, dst)`` of each added piece, in log
        order (a hot swap re-registers them in the new engine's id map)."""
        for i, (src, dst) in enumerate(zip(self._src, self._dst, strict=True)):
            self._src[i], self._dst[i] = ids(src, dst)
        self._built = None

    def source(self, i: int) -> SourceRecord:
        """The Kafka record of the ``i``-th open event (log order)."""
        for chunk, positions in self._chunks:
            if i < positions.size:
                return chunk.record(int(positions[i]))
            i -= positions.size
        raise IndexError(i)

    def close(self, device: torch.device) -> ClosedBatch:
        """The content as a ``ClosedBatch`` (rows in time order); the builder is emptied."""
        events, order = self.events(device)
        chunks = self._chunks

        def source(row: int) -> SourceRecord:
            i = int(order[row])
            for chunk, positions in chunks:
                if i < positions.size:
                    return chunk.record(int(positions[i]))
                i -= positions.size
            raise IndexError(row)

        closed = ClosedBatch(events, self.records, dict(self.next_offsets), source)
        self.clear()
        return closed

    def clear(self) -> None:
        self.records = 0
        self.next_offsets = {}
        self._src, self._dst, self._ts, self._feats, self._chunks = [], [], [], [], []
        self._built = None
