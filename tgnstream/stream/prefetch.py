"""Kafka fetching in a child process, so the consumer's per-record Python work (all of
kafka-python's parsing; confluent-kafka's record accessors) runs on its own core instead of
contending for the GIL with the engine and the gRPC handlers.

The child owns the Kafka consumer (so it also carries out the offset commits the ingest loop
requests) and ships each micro-batch as raw values plus compact metadata; decoding happens in
the server process, which balances the work of the two cores (measured: decoding in the child
made the child the bottleneck). Batch boundaries are the source's, so where the work runs
never changes the state.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from tgnstream.stream.config import StreamConfig
from tgnstream.stream.consumers import TopicUnavailableError
from tgnstream.stream.source import KafkaSource, LogGapError, LogReset, RecordBatch, SourceRecord

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

__all__ = ["Prefetcher", "FetchedBatch", "FatalIngestError"]

log = logging.getLogger(__name__)

# Room for a few micro-batches of JSON events (~60 KB per 1,000) in the pipe.
_PIPE_BYTES = 1 << 20


class FatalIngestError(RuntimeError):
    """Ingest cannot continue without an operator (e.g. a log gap under policy ``fail``):
    restarting the fetch process would not help."""


@dataclass(frozen=True)
class FetchedBatch:
    """One micro-batch as fetched: raw record values and keys plus per-record metadata.

    values/keys: ``n`` bytes (or None); partitions ``[n]`` int32, offsets ``[n]`` int64,
    timestamps_ms ``[n]`` int64; ``next_offsets``: per partition, the next offset once this
    batch is applied; ``highwater``: the log ends seen by the fetch.
    """

    values: list
    keys: list
    partitions: np.ndarray
    offsets: np.ndarray
    timestamps_ms: np.ndarray
    next_offsets: dict[int, int]
    highwater: dict[int, int | None]
    connected: bool = True
    resets: tuple[LogReset, ...] = ()
    topic_id: str | None = None  # of the log the offsets refer to (changes with a reset)

    @property
    def num_records(self) -> int:
        return len(self.values)

    @property
    def newest_timestamp_ms(self) -> dict[int, int]:
        """Per partition in the batch, the Kafka timestamp of its last record."""
        return {int(p): int(self.timestamps_ms[self.partitions == p][-1]) for p in np.unique(self.partitions)}

    def split_at(self, until: dict[int, int]) -> tuple[FetchedBatch, FetchedBatch | None]:
        """The records before ``until`` (per partition: offsets below it; partitions not named
        are not limited) and the rest (None when nothing is left)."""
        later = np.zeros(self.num_records, dtype=bool)
        for p, stop in until.items():
            later |= (self.partitions == p) & (self.offsets >= stop)
        if not later.any():
            return self, None
        return self._take(~later), self._take(later)

    def _take(self, rows: np.ndarray) -> FetchedBatch:
        idx = np.flatnonzero(rows)
        parts, offs = self.partitions[idx], self.offsets[idx]
        # Each part's next offsets: after its own last record (partitions it lacks are unchanged).
        nxt = dict(self.next_offsets)
        for p in np.unique(parts):
            nxt[int(p)] = int(offs[parts == p][-1]) + 1
        return FetchedBatch(
            values=[self.values[i] for i in idx],
            keys=[self.keys[i] for i in idx],
            partitions=parts,
            offsets=offs,
            timestamps_ms=self.timestamps_ms[idx],
            next_offsets=nxt,
            highwater=self.highwater,
            connected=self.connected,
            resets=(),
            topic_id=self.topic_id,
        )

    def record(self, position: int) -> SourceRecord:
        """The Kafka record at ``position`` (for dead letters)."""
        return SourceRecord(
            int(self.partitions[position]),
            int(self.offsets[position]),
            int(self.timestamps_ms[position]),
            self.keys[position],
            self.values[position],
        )


def take_resets(source: KafkaSource) -> tuple[LogReset, ...]:
    """The log resets ``source`` made since the last call (each is reported once)."""
    resets, source.resets = tuple(source.resets), []
    return resets


def package(source: KafkaSource, batch: RecordBatch) -> FetchedBatch:
    """``batch`` with the source's current view of the log (log ends, connection, resets)."""
    cols = batch.records
    return FetchedBatch(
        values=cols.values,
        keys=cols.keys,
        partitions=cols.partitions,
        offsets=cols.offsets,
        timestamps_ms=cols.timestamps_ms,
        next_offsets=batch.next_offsets,
        highwater=source.highwaters(),
        connected=source.connected(),
        resets=take_resets(source),
        topic_id=source.topic_id,
    )


def _send(out: Connection, item: tuple) -> bool:
    """Pickle ``item`` and write it to the pipe (blocks while the pipe is full: back-pressure);
    False when the parent is gone (its read end closed, so the write fails)."""
    try:
        out.send_bytes(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
        return True
    except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
        return False


def _widen(conn: Connection, nbytes: int) -> None:
    """Let the pipe hold ``nbytes`` (a few batches) before a write blocks; Linux only, best effort."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", 1031) if fcntl is not None else None
    if setpipe is None or sys.platform != "linux":
        return
    try:
        fcntl.fcntl(conn.fileno(), setpipe, nbytes)
    except OSError:  # above /proc/sys/fs/pipe-max-size: keep the default
        pass


def _child(
    config: StreamConfig,
    start_offsets: dict[int, int],
    topic_id: str | None,
    out: Connection,
    commands: mp.Queue,
    log_level: int,
    parent_pid: int,
) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[fetch]: %(message)s")
    # Batches go straight down a pipe from this thread: an mp.Queue would pickle them in a
    # feeder thread that contends for the GIL with the consumer's parsing (the pipe gave +8%
    # ingest in an A/B), and would make exit wait on a flush into a dead parent's pipe.
    _widen(out, _PIPE_BYTES)
    source = None
    try:
        source = KafkaSource(config, start_offsets, topic_id)
        ready = ("ready", source.partitions, dict(source.next_offsets), source.topic_id, take_resets(source))
        if not _send(out, ready):
            return
        while True:
            if os.getppid() != parent_pid:
                break  # the server was killed (SIGKILL leaves no chance to stop us): exit too
            try:
                cmd = commands.get_nowait()
            except queue.Empty:
                cmd = None
            if cmd is not None:
                if cmd[0] == "stop":
                    break
                if cmd[0] == "commit":
                    try:
                        source.commit(cmd[1])
                    except Exception as e:  # monitoring only: never fatal
                        log.warning("committing offsets to Kafka failed (lag monitoring only): %s", e)
            batch = source.next_batch()
            if batch is None:
                item = (
                    "idle",
                    source.highwaters(),
                    source.connected(),
                    take_resets(source),
                    source.topic_id,
                )
            else:
                item = ("batch", package(source, batch))
            if not _send(out, item):
                break  # the server is gone
    except LogGapError as e:  # the message says it all: no traceback
        _send(out, ("fatal", str(e)))
    except TopicUnavailableError as e:  # the message explains it; the parent retries
        _send(out, ("error", f"{type(e).__name__}: {e}"))
    except BaseException as e:
        log.exception("fetch process failed")
        _send(out, ("error", f"{type(e).__name__}: {e}"))
    finally:
        if source is not None:
            source.close()


class Prefetcher:
    """Parent-side handle of the fetch process.

    Batches come down a pipe that holds a few of them (``_PIPE_BYTES``; bounded memory and
    back-pressure on Kafka). ``partitions``/``start_offsets`` are known after ``start()``.
    """

    def __init__(self, config: StreamConfig, start_offsets: dict[int, int], topic_id: str | None = None):
        ctx = mp.get_context("spawn")  # never fork a process that holds torch/grpc threads
        self._out, self._writer = ctx.Pipe(duplex=False)
        self._commands: mp.Queue = ctx.Queue()
        self._proc = ctx.Process(
            target=_child,
            args=(
                config,
                dict(start_offsets),
                topic_id,
                self._writer,
                self._commands,
                logging.getLogger().level,
                os.getpid(),
            ),
            name="tgnstream-fetch",
            daemon=True,
        )
        self.partitions: list[int] = []
        self.start_offsets: dict[int, int] = {}
        self.topic_id: str | None = None
        # Per partition, the last log end seen (kept while the broker is unreachable: lag is
        # then measured against the last known end, not reported as 0).
        self.highwater: dict[int, int | None] = {}
        self.connected = True
        self.resets: list[LogReset] = []  # reported by the child, not yet handled by the loop

    def start(self, timeout: float = 60.0) -> None:
        self._proc.start()
        # Only the child may hold the write end: then its exit (or death) reads as EOF here.
        self._writer.close()
        deadline = time.monotonic() + timeout
        while (item := self._receive_starting(0.2)) is None:
            if not self._proc.is_alive():
                raise RuntimeError(
                    f"the Kafka fetch process exited during start-up (code {self._proc.exitcode}); "
                    "see the log above"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Kafka fetch process did not start within {timeout} s")
        kind, *rest = item
        if kind == "fatal":
            self.stop()
            raise FatalIngestError(rest[0])
        if kind == "error":
            self.stop()
            raise RuntimeError(f"the Kafka fetch process failed to start: {rest[0]}")
        self.partitions, self.start_offsets, self.topic_id, resets = rest
        self.resets.extend(resets)

    def _receive_starting(self, timeout: float) -> tuple | None:
        try:
            return self._receive(timeout)
        except RuntimeError:
            raise RuntimeError(
                f"the Kafka fetch process exited during start-up (code {self._proc.exitcode}); "
                "see the log above"
            ) from None

    def _receive(self, timeout: float) -> tuple | None:
        """The next item from the child, None if none came within ``timeout``; raises when
        the child is gone (EOF: it closed the pipe by exiting)."""
        try:
            if not self._out.poll(timeout):
                return None
            return pickle.loads(self._out.recv_bytes())
        except (EOFError, OSError):
            self._proc.join(1)
            raise RuntimeError(f"the Kafka fetch process died (exit code {self._proc.exitcode})") from None

    def get(self, timeout: float) -> FetchedBatch | None:
        """The next batch; None when the source was idle (or nothing came in time)."""
        item = self._receive(timeout)
        if item is None:
            return None
        kind, *payload = item
        if kind == "fatal":
            raise FatalIngestError(payload[0])
        if kind == "error":
            raise RuntimeError(f"Kafka fetch process: {payload[0]}")
        if kind == "idle":
            highwater, self.connected, resets, topic_id = payload
            self._saw(highwater, resets, topic_id)
            return None
        batch: FetchedBatch = payload[0]
        self.connected = batch.connected
        self._saw(batch.highwater, batch.resets, batch.topic_id)
        return batch

    def _saw(
        self, highwater: dict[int, int | None], resets: tuple[LogReset, ...], topic_id: str | None
    ) -> None:
        if topic_id is not None:
            self.topic_id = topic_id
        for p, hw in highwater.items():
            if hw is not None or p not in self.highwater:
                self.highwater[p] = hw
        for r in resets:  # a reset moves the position back: the old log end means nothing now
            self.highwater[r.partition] = highwater.get(r.partition)
        self.resets.extend(resets)

    def request_commit(self, offsets: dict[int, int]) -> None:
        self._commands.put(("commit", dict(offsets)))

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc.is_alive():
            self._commands.put(("stop",))
            # Drain so the child is never blocked on a full pipe while we wait for it.
            while self._proc.is_alive() and timeout > 0:
                try:
                    if self._out.poll(0.1):
                        self._out.recv_bytes()
                except (EOFError, OSError):
                    pass
                self._proc.join(0)
                timeout -= 0.1
            if self._proc.is_alive():
                self._proc.kill()
        self._proc.join(5)
