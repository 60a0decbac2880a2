"""The live state in shared memory: one writer process applies batches, reader processes answer
queries from the same tensors, never from a half-applied batch.

Protocol (a sequence lock, as in the Linux kernel's seqlock):

* The writer changes state only between ``begin()`` and ``end()``: ``begin`` makes the sequence
  number odd, ``end`` publishes what readers need besides the engine's own tensors (the open
  batch, the id count, the visible offsets), waits for the device (CUDA) and makes it even.
* A reader notes the (even) sequence number, computes its answer from the shared tensors and
  keeps it only if the number did not change meanwhile; otherwise it computes again. What
  changes with every fetched chunk (the open batch, new ids, offsets) has a sequence number of
  its own and is copied once at a query's start, so publishing it never costs a query its work. After
  ``max_attempts`` tries it takes the commit lock, which the writer holds for every change, and
  computes once more while the writer waits: a long query never starves, a short one never
  blocks the writer.
* Torn reads are harmless by construction: indices read from the state are always within the
  buffers (ids < capacity, positions within the pair table), so a read racing a write yields
  wrong numbers or an exception, both discarded by the sequence check. One exception to
  "harmless": operations that pass over their input twice (``nonzero``, boolean-mask indexing,
  ``masked_select``: count, allocate, fill) must run on a private copy of shared data, never on
  the shared buffer itself, or a write between the passes makes them write past their output.

Buffers never move under a reader: node capacity and the pair table are sized ahead, and grow
only by doubling, as an explicit event. The writer then shares the new tensors, bumps the layout
number and sends them to every reader (``layout`` queue); a reader that sees a newer layout
attaches the new tensors before it reads, once the queries already computing in its process are
done (they began on the old buffers; the sequence check makes them compute again).

Store order matters: the writer's stores must become visible in program order (x86-64's
total store order does this; other architectures would need fences here).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.runtime.live import ReadWriteLock, StateStamp

__all__ = ["StateBoard", "SharedHandles", "SharedLiveView", "SharedCandidates", "Layout", "MAX_PARTITIONS"]

log = logging.getLogger(__name__)

R = TypeVar("R")

#: Partitions whose offsets the header can carry (a topic with more cannot use reader processes).
MAX_PARTITIONS = 1024
_VERSION_BYTES = 256

# Header slots (int64).
SEQ, LAYOUT, OPEN_COUNT, N_IDS, READY, STOPPING, VERSION_LEN, VISIBLE_IDS, GENERATION, OPEN_SEQ, RESTORING = (
    range(11)
)
_OFFSETS = 16
_HEADER_LEN = _OFFSETS + MAX_PARTITIONS


@dataclass
class Layout:
    """Where the shared tensors are: ``tensors`` by dotted engine name (parameters and buffers),
    plus the id map's byte and offset stores; ``number`` increases at every reallocation."""

    number: int
    tensors: dict[str, torch.Tensor]
    id_blob: torch.Tensor
    id_offsets: torch.Tensor


class SharedCandidates:
    """One TopK candidate-embedding entry that every reader process can use: the first reader to
    need a state's candidate embeddings builds them (the build lock makes it the only one) and
    publishes them here; the others copy them instead of computing the same ~1,000 embeddings.

    Buffers: ``meta [4]`` int64 (sequence number, model generation and events applied of the
    entry's state, candidate count), ``time [1]`` float64 (the time they were embedded at),
    ``nodes [C]`` int64, ``z [C, d]`` float32. An entry larger than ``C`` is not shared (each
    reader then builds its own, as without this store).
    """

    def __init__(self, capacity: int, dim: int, device: torch.device, context):
        self.meta = torch.zeros(4, dtype=torch.long).share_memory_()
        self.meta[1] = -1
        self.time = torch.zeros(1, dtype=torch.float64).share_memory_()
        self.nodes = _share(torch.zeros(capacity, dtype=torch.long, device=device))
        self.z = _share(torch.zeros(capacity, dim, device=device))
        self.lock = context.Lock()

    def _sync(self) -> None:
        if self.z.device.type == "cuda":
            torch.cuda.synchronize(self.z.device)

    def load(self, generation: int, events: int) -> tuple[float, torch.Tensor, torch.Tensor] | None:
        """``(time, nodes [D], z [D, d])`` (copies) of the entry for that state, or None."""
        meta = self.meta
        for _ in range(3):
            seq = int(meta[0])
            if seq % 2:
                time.sleep(0)
                continue
            if int(meta[1]) != generation or int(meta[2]) != events:
                return None
            n = int(meta[3])
            out = float(self.time[0]), self.nodes[:n].clone(), self.z[:n].clone()
            self._sync()
            if int(meta[0]) == seq:
                return out
        return None

    def publish(
        self, generation: int, events: int, when: float, nodes: torch.Tensor, z: torch.Tensor
    ) -> bool:
        """Store an entry (call holding ``lock``); False when it does not fit."""
        n = nodes.numel()
        if n > self.nodes.numel():
            return False
        meta = self.meta
        meta[0] += 1
        try:
            self.nodes[:n] = nodes
            self.z[:n] = z
            self.time[0] = when
            meta[1], meta[2], meta[3] = generation, events, n
            self._sync()
        finally:
            meta[0] += 1
        return True


@dataclass
class SharedHandles:
    """What a reader process is given at start (picklable by ``torch.multiprocessing``: the
    tensors travel as shared-memory handles). ``header [16 + MAX_PARTITIONS]`` int64,
    ``version [256]`` uint8 (model version, UTF-8), open batch buffers ``open_src/open_dst [B]``
    int64, ``open_t [B]`` float64, ``open_feats [B, d_edge]`` float32; ``lock``: the commit lock."""

    header: torch.Tensor
    version: torch.Tensor
    open_src: torch.Tensor
    open_dst: torch.Tensor
    open_t: torch.Tensor
    open_feats: torch.Tensor
    lock: Any
    config: ModelConfig
    device: str
    candidates: SharedCandidates | None = None


def _share(t: torch.Tensor) -> torch.Tensor:
    return t.share_memory_() if t.device.type == "cpu" else t


def _engine_tensors(engine: MemoryEngine) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the engine except the id map's (shared as its stores)."""
    out = {n: p.data for n, p in engine.named_parameters()}
    out.update({n: b for n, b in engine.named_buffers() if not n.startswith("ids.")})
    return out


def _set_tensor(module: torch.nn.Module, dotted: str, value: torch.Tensor) -> None:
    *path, name = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


class StateBoard:
    """The writer's side: moves a live engine's state into shared memory (pre-sized), and
    publishes each change with the sequence protocol of the module docstring.

    Args:
        engine: the writer's engine (its tensors are moved into shared memory in place).
        open_capacity: most events an open batch holds (the ingest batch size).
        context: a ``torch.multiprocessing`` spawn context (for the lock and the queues).
        node_capacity: node slots to pre-size (at least twice the nodes known now).
        pair_capacity: pair-table entries to pre-size (at least twice the pairs known now).
    """

    def __init__(
        self,
        engine: MemoryEngine,
        model_version: str,
        open_capacity: int,
        context,
        node_capacity: int = 0,
        pair_capacity: int = 0,
    ):
        self.engine = engine
        dev = engine.device
        engine.ensure_capacity(max(node_capacity, 2 * len(engine.ids), 1024))
        engine.history.reserve(max(pair_capacity, 2 * len(engine.history), 1024))
        engine.ids.flush()
        self.handles = SharedHandles(
            header=torch.zeros(_HEADER_LEN, dtype=torch.long).share_memory_(),
            version=torch.zeros(_VERSION_BYTES, dtype=torch.uint8).share_memory_(),
            open_src=_share(torch.zeros(open_capacity, dtype=torch.long, device=dev)),
            open_dst=_share(torch.zeros(open_capacity, dtype=torch.long, device=dev)),
            open_t=_share(torch.zeros(open_capacity, dtype=torch.float64, device=dev)),
            open_feats=_share(torch.zeros(open_capacity, engine.config.edge_dim, device=dev)),
            lock=context.Lock(),
            config=engine.config,
            device=str(dev),
        )
        cfg = engine.config
        self.handles.candidates = SharedCandidates(
            engine.capacity,
            cfg.embedding_dim if cfg.embedding == "attention" else cfg.memory_dim,
            dev,
            context,
        )
        self._context = context
        self._state_section = True
        self._queues: list = []
        self._published: dict[str, torch.Tensor] = {}
        self.layout = self._share_layout(0)
        self.handles.header[_OFFSETS:] = -1
        self.set_model_version(model_version)
        self.layout_changes = 0

    # ------------------------------------------------------------------------------ layout
    def _share_layout(self, number: int) -> Layout:
        e = self.engine
        tensors = {n: _share(t) for n, t in _engine_tensors(e).items()}
        blob, offsets = _share(e.ids._blob_store), _share(e.ids._offsets_store)
        # ids.flush() keeps views of its stores; re-take them on the now shared storage.
        e.ids.blob = blob[: e.ids.blob.numel()]
        e.ids.offsets = offsets[: e.ids.offsets.numel()]
        self._published = {**tensors, "ids._blob_store": blob, "ids._offsets_store": offsets}
        self.handles.header[LAYOUT] = number
        return Layout(number, tensors, blob, offsets)

    def _layout_moved(self) -> bool:
        now = {**_engine_tensors(self.engine)}
        now["ids._blob_store"] = self.engine.ids._blob_store
        now["ids._offsets_store"] = self.engine.ids._offsets_store
        if now.keys() != self._published.keys():
            return True
        return any(
            now[n].data_ptr() != p.data_ptr() or now[n].shape != p.shape for n, p in self._published.items()
        )

    def new_reader_queue(self):
        """A queue over which a reader receives every later layout (give it to the reader)."""
        q = self._context.Queue()
        self._queues.append(q)
        return q

    def drop_reader_queue(self, q) -> None:
        if q in self._queues:
            self._queues.remove(q)
            q.close()
            q.cancel_join_thread()

    # ------------------------------------------------------------------------------ writes
    def begin(self, state: bool = True) -> None:
        """Start a change. ``state=False``: the section changes only what queries read once,
        at their start (the open batch, registered ids, offsets), not the engine's tensors; it
        then does not invalidate queries already computing."""
        self.handles.lock.acquire()
        self._state_section = state
        self.handles.header[OPEN_SEQ] += 1
        if state:
            self.handles.header[SEQ] += 1

    def end(self, open_events: EventBatch | None, visible_offsets: dict[int, int], visible_ids: int) -> None:
        """Publish the change and let readers in again (the sequence number becomes even)."""
        try:
            h, e = self.handles, self.engine
            e.ids.flush()
            if self._layout_moved():
                self.layout = self._share_layout(self.layout.number + 1)
                self.layout_changes += 1
                if not self._state_section:  # queries running on the old buffers start again
                    h.header[SEQ] += 2
                for q in list(self._queues):
                    q.put(self.layout)
                log.info("shared state reallocated (layout %d): readers re-attach", self.layout.number)
            n = 0 if open_events is None else len(open_events)
            if n > h.open_src.numel():
                raise ValueError(f"open batch of {n} events exceeds the shared buffer ({h.open_src.numel()})")
            if n:
                h.open_src[:n] = open_events.src
                h.open_dst[:n] = open_events.dst
                h.open_t[:n] = open_events.t
                h.open_feats[:n] = open_events.feats
            h.header[OPEN_COUNT] = n
            h.header[N_IDS] = len(e.ids)
            h.header[VISIBLE_IDS] = visible_ids
            for p, off in visible_offsets.items():
                if not 0 <= p < MAX_PARTITIONS:
                    raise ValueError(
                        f"partition {p}: reader processes support partitions 0..{MAX_PARTITIONS - 1}"
                    )
                h.header[_OFFSETS + p] = off
            if e.device.type == "cuda":
                torch.cuda.synchronize(e.device)
        finally:
            self.handles.header[OPEN_SEQ] += 1
            if self._state_section:
                self.handles.header[SEQ] += 1
            self.handles.lock.release()

    def replace_engine(self, engine: MemoryEngine, version: str) -> None:
        """Serve ``engine`` (same architecture; a hot swap) from now on: call inside a write
        section. It is pre-sized like the current one; ``end`` then shares its tensors as a new
        layout (weights included), which every reader attaches before its next read."""
        if engine.config != self.handles.config:
            raise ValueError("a reader pool serves one architecture: the new engine's config differs")
        if engine.device != self.engine.device:
            raise ValueError(
                f"the new engine is on {engine.device}, the shared state on {self.engine.device}"
            )
        engine.ensure_capacity(max(self.engine.capacity, 2 * len(engine.ids), 1024))
        engine.history.reserve(max(self.engine.history.capacity, 2 * len(engine.history), 1024))
        engine.ids.flush()
        self.engine = engine
        self.set_model_version(version)

    def set_model_version(self, version: str) -> None:
        """Name the model the state belongs to (a new generation: cached results of the previous
        model are never reused)."""
        self.handles.header[GENERATION] += 1
        raw = version.encode("utf-8")[:_VERSION_BYTES]
        self.handles.version[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        self.handles.header[VERSION_LEN] = len(raw)

    def set_ready(self, ready: bool) -> None:
        self.handles.header[READY] = int(ready)

    def request_stop(self) -> None:
        self.handles.header[STOPPING] = 1

    def set_restoring(self, restoring: bool) -> None:
        self.handles.header[RESTORING] = int(restoring)


@dataclass(frozen=True)
class _OpenSnapshot:
    """What a query reads once, at its start: the open batch, the visible ids, the offsets."""

    seq: int
    context: EventBatch | None
    visible_ids: int
    offsets: dict[int, int]


class _Attempt(threading.local):
    seq: int = -1
    open: _OpenSnapshot | None = None
    reads_valid: bool | None = None  # None: the query never called reads_done()


class SharedLiveView:
    """A reader's ``LiveEngine`` look-alike over a ``StateBoard``'s shared state.

    ``consistent(fn)`` runs a query with the sequence protocol; inside it, ``read()``,
    ``stamp()``, ``resolve()``, ``context`` and ``visible_offsets`` describe one state. The
    engine's tensors are the shared ones; its id map is this process's own index, synchronised
    from the shared stores (ids are append-only).

    Two sequence numbers: the state's (engine tensors: a batch applied, buffers grown) decides
    whether an answer is kept; the open part's (open batch, registered ids, offsets) is only
    checked while a query copies that part at its start. Publishing the open batch, which
    happens for every fetched chunk, therefore never throws away a query's work.

    Counters: ``retries`` (answers computed again because a write overlapped), ``fallbacks``
    (answers computed under the commit lock).
    """

    def __init__(self, handles: SharedHandles, layout: Layout, layout_queue=None, max_attempts: int = 4):
        self.handles = handles
        self.engine = MemoryEngine(handles.config, capacity=1, device="cpu")
        self.engine.eval()
        self.engine.frozen_capacity = True
        self._queue = layout_queue
        self.max_attempts = max_attempts
        # Queries hold it shared while they compute, a re-attach exclusively: a re-attach swaps
        # the engine's tensors one by one, and a query running meanwhile would mix two layouts
        # (on CUDA it could still have kernels in flight on memory the swap releases).
        self._attach_lock = ReadWriteLock()
        self._layout: Layout | None = None
        self._attach(layout)
        self._attempt = _Attempt()
        self._open_cache: _OpenSnapshot | None = None
        self._ids_lock = threading.Lock()
        self.retries = 0
        self.fallbacks = 0

    # ------------------------------------------------------------------------------ layout
    def _attach(self, layout: Layout) -> None:
        for name, t in layout.tensors.items():
            _set_tensor(self.engine, name, t)
        self._id_blob, self._id_offsets = layout.id_blob, layout.id_offsets
        self._layout = layout

    def _layout_current(self) -> bool:
        return int(self.handles.header[LAYOUT]) == self._layout.number

    @contextmanager
    def _attached(self) -> Iterator[None]:
        """Hold the current layout for a query: re-attach first if the writer reallocated."""
        while True:
            self._follow_layout()
            with self._attach_lock.read():
                if self._layout_current():
                    yield
                    return

    def _follow_layout(self) -> None:
        want = int(self.handles.header[LAYOUT])
        if want == self._layout.number:
            return
        with self._attach_lock.write():
            while self._layout.number < want:
                if self._queue is None:
                    raise RuntimeError("shared state was reallocated and this view has no layout queue")
                layout = self._queue.get(timeout=30)
                if layout.number > self._layout.number:
                    self._attach(layout)

    def _sync_ids(self, open_seq: int) -> bool:
        """Register the ids added since the last sync; False if a write overlapped."""
        ids = self.engine.ids
        n = int(self.handles.header[N_IDS])
        if n <= len(ids):
            return True
        with self._ids_lock:
            have = len(ids)
            if n <= have:
                return True
            offs = self._id_offsets[have : n + 1].numpy().copy()
            raw = self._id_blob[int(offs[0]) : int(offs[-1])].numpy().tobytes()
            base = int(offs[0])
            try:
                names = [raw[a - base : b - base].decode("utf-8") for a, b in zip(offs[:-1], offs[1:])]
            except (UnicodeDecodeError, ValueError):
                return False
            if int(self.handles.header[OPEN_SEQ]) != open_seq:
                return False
            ids.lookup(names, create=True)
            return True

    def _open_snapshot(self) -> _OpenSnapshot | None:
        """A consistent copy of the open part (None if a write overlapped: try again)."""
        h = self.handles
        header = h.header
        seq = int(header[OPEN_SEQ])
        if seq % 2 or int(header[LAYOUT]) != self._layout.number:
            # (Layouts change only inside a section: with the open sequence number unchanged
            # to the end, the stores read below are the ones the counts refer to.)
            return None
        cached = self._open_cache
        if cached is not None and cached.seq == seq:
            return cached
        if not self._sync_ids(seq):
            return None
        n = int(header[OPEN_COUNT])
        context = None
        if n:
            context = EventBatch(
                h.open_src[:n].clone(), h.open_dst[:n].clone(), h.open_t[:n].clone(), h.open_feats[:n].clone()
            )
            self._sync_device()
        offs = header[_OFFSETS:].numpy()
        snap = _OpenSnapshot(
            seq, context, int(header[VISIBLE_IDS]), {int(p): int(offs[p]) for p in np.flatnonzero(offs >= 0)}
        )
        if int(header[OPEN_SEQ]) != seq:
            return None
        self._open_cache = snap
        return snap

    # ------------------------------------------------------------------------------ protocol
    def _enter(self) -> bool:
        """Begin an attempt (note the sequence number, copy the open part); False if the writer
        reallocated meanwhile (the caller leaves its ``_attached`` section and re-attaches)."""
        header = self.handles.header
        spins = 0
        while True:
            seq = int(header[SEQ])
            if not self._layout_current():
                return False
            if seq % 2 == 0:
                snap = self._open_snapshot()
                if snap is not None and int(header[SEQ]) == seq:
                    self._attempt.seq, self._attempt.open = seq, snap
                    return True
            spins += 1
            time.sleep(0 if spins < 100 else 0.0005)

    def still_valid(self) -> bool:
        """Whether the state (engine tensors) did not change since this thread's attempt began."""
        return int(self.handles.header[SEQ]) == self._attempt.seq

    def reads_done(self) -> None:
        """The query has copied everything it reads from the state so far, and what it does
        next until its next ``reads_done`` only computes: the attempt is kept if the state was
        unchanged at every such call, even when a batch is applied during the computation."""
        valid = self.still_valid()
        self._attempt.reads_valid = valid and self._attempt.reads_valid is not False

    def _sync_device(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)

    def consistent(self, fn: Callable[[], R]) -> R:
        """``fn()`` computed from one complete state (see the module docstring)."""
        attempts = 0
        while attempts < self.max_attempts:
            with self._attached():
                if not self._enter():
                    continue  # reallocated before the attempt began: re-attach, not a retry
                attempts += 1
                self._attempt.reads_valid = None
                try:
                    result = fn()
                except Exception:
                    self._sync_device()
                    if self.still_valid():
                        raise
                    self.retries += 1
                    continue
                self._sync_device()
                if self._attempt.reads_valid or self.still_valid():
                    return result
                self.retries += 1
        self.fallbacks += 1
        with self.handles.lock:  # the writer waits for this one answer
            with self._attached():
                self._enter()
                return fn()

    def _open(self) -> _OpenSnapshot:
        snap = self._attempt.open
        while snap is None:  # outside consistent(): whatever is current
            with self._attached():
                if self._enter():
                    snap = self._attempt.open
        return snap

    # ------------------------------------------------------------------ LiveEngine interface
    @contextmanager
    def read(self) -> Iterator[MemoryEngine]:
        yield self.engine

    @property
    def model_version(self) -> str:
        n = int(self.handles.header[VERSION_LEN])
        return self.handles.version[:n].numpy().tobytes().decode("utf-8", "replace")

    @property
    def cold_slot(self) -> int:
        return self._open().visible_ids

    def resolve(self, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        idx, _ = self.engine.ids.lookup(ids, create=False)
        # The ids visible in this attempt's state (the local index may know later ones).
        cold = self.cold_slot
        unknown = (idx < 0) | (idx >= cold)
        idx = idx.masked_fill(unknown, cold)
        return idx.to(self.engine.device), unknown

    @property
    def context(self) -> EventBatch | None:
        return self._open().context

    @property
    def visible_offsets(self) -> dict[int, int]:
        return dict(self._open().offsets)

    def stamp(self) -> StateStamp:
        return StateStamp.of(self.model_version, self.engine, self.context)

    @property
    def candidate_store(self) -> SharedCandidates | None:
        """The TopK candidate entry shared with the other readers (see ``SharedCandidates``)."""
        return self.handles.candidates

    @property
    def generation(self) -> int:
        return int(self.handles.header[GENERATION])

    @property
    def ready(self) -> bool:
        return bool(self.handles.header[READY])

    @property
    def stopping(self) -> bool:
        return bool(self.handles.header[STOPPING])

    @property
    def restoring(self) -> bool:
        """The writer has not yet restored the state and caught up with the log once: queries
        get UNAVAILABLE (``LiveEngine.restoring``)."""
        return bool(self.handles.header[RESTORING])
