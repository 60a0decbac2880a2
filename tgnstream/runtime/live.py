"""The engine a server answers from: one writer (the ingest loop), many readers (gRPC handlers).

Shared by ``tgnstream.ingest`` (writes) and ``tgnstream.model_server`` (reads), so that neither
service imports the other; the composition root (``tgnstream.apps.serve``) builds one and hands it to
both.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch

__all__ = ["LiveEngine", "OpenBatch", "ReadWriteLock", "StateStamp"]

R = TypeVar("R")


class ReadWriteLock:
    """Many concurrent readers or one writer; a waiting writer blocks new readers, so a steady
    query load cannot starve ingest."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass(frozen=True)
class StateStamp:
    """What a reply was computed from: ``events_applied`` counts every event the answer reflects
    (applied batches plus the open batch's events, which queries see as batch context);
    ``watermark`` is the latest of their times."""

    model_version: str
    events_applied: int
    watermark: float

    @staticmethod
    def of(model_version: str, engine: MemoryEngine, context: EventBatch | None) -> StateStamp:
        """The stamp of ``engine``'s applied state plus the open batch ``context``."""
        events, watermark = int(engine.events_applied), float(engine.watermark)
        if context is not None:
            events += len(context)
            watermark = max(watermark, float(context.t[-1]))
        return StateStamp(model_version, events, watermark)


@dataclass(frozen=True)
class OpenBatch:
    """The events of the batch being filled: visible to queries as batch context (the way
    training shows a batch's earlier events to a query), applied to memory when it closes.

    events: time-ordered (stable) ``EventBatch`` of dense ids; ``next_offsets``: per partition,
    the next offset after the last record read into it.
    """

    events: EventBatch
    next_offsets: dict[int, int]

    def __len__(self) -> int:
        return len(self.events)


class LiveEngine:
    """A ``MemoryEngine`` plus the Kafka position its state reflects, behind a read/write lock.

    Readers (``with live.read() as engine``) never see a half-applied batch: the writer mutates
    the state only inside ``with live.write() as engine``, and updates ``next_offsets`` (the
    per-partition next offset to apply) inside the same critical section.

    Ids are registered (under ``write()``) before their events join the open batch; they become
    visible to queries when the open batch that holds their events is published, or closed
    (assigning ``open``): ``visible_ids`` counts them, so that an answer depends on the events it
    reflects only, never on how far the writer got with the next chunk. Node slot
    ``visible_ids`` has no visible events: readers map every unknown (or not yet visible)
    external id to it, which is exactly cold-start state. The writer keeps slot ``len(ids)``
    allocated (``reserve_cold_slot``) so readers never grow buffers.
    """

    def __init__(self, engine: MemoryEngine, model_version: str, next_offsets: dict[int, int] | None = None):
        self.engine = engine
        # A StateBoard when reader processes answer from shared memory (see shared_state.py):
        # every write section is then published to them.
        self._board = None
        self._restoring = False
        # Reader processes share TopK candidate embeddings through it; none in one process.
        self.candidate_store = None
        self.generation = 0
        self.model_version = model_version
        # The position the applied state reflects (what a snapshot stores); the open batch's
        # records are after it and are re-read after a restart.
        self.next_offsets: dict[int, int] = dict(next_offsets or {})
        self._open: OpenBatch | None = None
        self.visible_ids = len(engine.ids)
        self._lock = ReadWriteLock()
        self.reserve_cold_slot()

    @property
    def board(self):
        return self._board

    @board.setter
    def board(self, board) -> None:
        self._board = board
        if board is not None:
            board.set_restoring(self._restoring)

    @property
    def restoring(self) -> bool:
        """True until the state has been restored and has caught up with the log once: queries
        then get UNAVAILABLE instead of answers from a half-replayed state (reader processes too)."""
        return self._restoring

    @restoring.setter
    def restoring(self, restoring: bool) -> None:
        self._restoring = bool(restoring)
        if self._board is not None:
            self._board.set_restoring(self._restoring)

    @contextmanager
    def read(self) -> Iterator[MemoryEngine]:
        with self._lock.read():
            yield self.engine

    @contextmanager
    def write(self, state: bool = True) -> Iterator[MemoryEngine]:
        """Exclusive access for the writer. ``state=False`` promises that the section changes
        no engine tensor (only ids, the open batch, offsets): reader processes' queries already
        computing then stay valid."""
        with self._lock.write():
            board = self.board
            if board is not None:
                board.begin(state)
            try:
                yield self.engine
            finally:
                self.reserve_cold_slot()
                if board is not None:
                    board.end(self.context, self.visible_offsets, self.visible_ids)

    def replace_engine(self, engine: MemoryEngine, model_version: str, open_batch: OpenBatch | None) -> None:
        """Serve ``engine`` (a hot swap; it reflects ``next_offsets`` exactly) under
        ``model_version`` with ``open_batch`` (the open records' events in its ids). Call inside
        ``write()``: queries that hold ``read()`` finished on the old engine; later ones see the
        new one. ``generation`` moves on, so nothing computed for the old engine is reused."""
        if self.board is not None:
            self.board.replace_engine(engine, model_version)
        self.engine = engine
        self.model_version = model_version
        self.generation += 1
        self.open = open_batch

    def consistent(self, fn: Callable[[], R]) -> R:
        """``fn()`` (a query that takes ``read()`` itself): the same call a reader process's view
        makes with its sequence protocol."""
        return fn()

    def still_valid(self) -> bool:
        """Always true here: readers hold the lock while they compute."""
        return True

    def reads_done(self) -> None:
        """A query says it has copied everything it reads from the state (no-op here; see
        ``SharedLiveView.reads_done``)."""

    def reserve_cold_slot(self) -> None:
        self.engine.ensure_capacity(len(self.engine.ids) + 1)

    def make_room(self, new_ids: int | list[str] = 0, new_pairs: int = 0) -> None:
        """Grow the state ahead of a write that may add up to ``new_ids`` ids and ``new_pairs``
        pairs, so that the write itself never reallocates. Call from the writer thread outside
        ``write()``: the copies then hold no lock, and queries go on meanwhile.

        Node buffers keep every row at its index when they grow, and nothing writes them while
        they are copied (the one writer is here), so a query that reads some old and some new
        buffers reads the same values. The pair table's entries move to new slots: the new table
        is built aside and adopted in one short write section. ``new_ids`` may be the names about
        to be registered: they are then counted (only when they might not fit), so that a chunk
        of known names does not grow the state."""
        engine = self.engine
        if isinstance(new_ids, list):
            if len(engine.ids) + len(new_ids) + 1 <= engine.capacity:
                new_ids = 0
            else:  # the one writer is the only one that adds names: reading the map here is safe
                new_ids = int((engine.ids.lookup(new_ids, create=False)[0] < 0).sum())
        need = len(engine.ids) + new_ids + 1  # and the cold-start slot
        if need > engine.capacity:
            engine.ensure_capacity(need)
        history = engine.history
        table = history.table_for(new_pairs) if new_pairs else None
        if table is not None:
            with self.write():
                history.adopt(table)

    @property
    def open(self) -> OpenBatch | None:
        return self._open

    @open.setter
    def open(self, batch: OpenBatch | None) -> None:
        """Publish (or clear, at a close) the open batch; every id registered so far is then
        either in an applied batch or in this one: visible. Call under ``write()``."""
        self._open = batch
        self.visible_ids = len(self.engine.ids)

    @property
    def cold_slot(self) -> int:
        return self.visible_ids

    def resolve(self, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense indices ``[n]`` (on the engine's device) of external ids, unknown ones mapped to
        the cold-start slot, and a ``[n]`` bool mask of the unknown ones. Call under ``read()``."""
        idx, _ = self.engine.ids.lookup(ids, create=False)
        unknown = (idx < 0) | (idx >= self.visible_ids)
        idx = idx.masked_fill(unknown, self.cold_slot)
        return idx.to(self.engine.device), unknown

    @property
    def context(self) -> EventBatch | None:
        """The open batch's events (queries' batch context), or None. Call under a lock."""
        return None if self.open is None or not len(self.open) else self.open.events

    @property
    def visible_offsets(self) -> dict[int, int]:
        """Per partition, the next offset after every record the answers reflect (applied or in
        the open batch). Call under a lock."""
        if self.open is None:
            return dict(self.next_offsets)
        return {**self.next_offsets, **self.open.next_offsets}

    def stamp(self) -> StateStamp:
        """Call under ``read()`` or ``write()``."""
        return StateStamp.of(self.model_version, self.engine, self.context)
