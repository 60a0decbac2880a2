"""Kafka fetching in a child process, so kafka-python's pure-Python record parsing runs on its
own core instead of contending for the GIL with the engine and the gRPC handlers.

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
import queue
import time
from dataclasses import dataclass

import numpy as np

from tgnstream.ingest.config import IngestConfig
from tgnstream.ingest.source import KafkaSource, RecordBatch, SourceRecord

__all__ = ["Prefetcher", "FetchedBatch"]

log = logging.getLogger(__name__)


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

    @property
    def num_records(self) -> int:
        return len(self.values)

    @property
    def newest_timestamp_ms(self) -> dict[int, int]:
        """Per partition in the batch, the Kafka timestamp of its last record."""
        return {int(p): int(self.timestamps_ms[self.partitions == p][-1]) for p in np.unique(self.partitions)}

    def record(self, position: int) -> SourceRecord:
        """The Kafka record at ``position`` (for dead letters)."""
        return SourceRecord(
            int(self.partitions[position]),
            int(self.offsets[position]),
            int(self.timestamps_ms[position]),
            self.keys[position],
            self.values[position],
        )


def _package(source: KafkaSource, batch: RecordBatch) -> FetchedBatch:
    records = batch.records
    n = len(records)
    return FetchedBatch(
        values=[r.value for r in records],
        keys=[r.key for r in records],
        partitions=np.fromiter((r.partition for r in records), np.int32, n),
        offsets=np.fromiter((r.offset for r in records), np.int64, n),
        timestamps_ms=np.fromiter((r.timestamp for r in records), np.int64, n),
        next_offsets=batch.next_offsets,
        highwater=source.highwaters(),
    )


def _put(out: mp.Queue, item: tuple, parent_pid: int) -> bool:
    """Blocking put that gives up when the parent is gone (its queue would never drain)."""
    while os.getppid() == parent_pid:
        try:
            out.put(item, timeout=0.5)
            return True
        except queue.Full:
            continue
    return False


def _child(
    config: IngestConfig,
    start_offsets: dict[int, int],
    out: mp.Queue,
    commands: mp.Queue,
    log_level: int,
    parent_pid: int,
) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[fetch]: %(message)s")
    # At exit, multiprocessing would otherwise wait for the queue's feeder thread to flush into
    # a pipe that a dead parent never drains: the child would hang forever as an orphan.
    out.cancel_join_thread()
    source = None
    try:
        source = KafkaSource(config, start_offsets)
        _put(out, ("ready", source.partitions, dict(source.next_offsets)), parent_pid)
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
                _put(out, ("idle", source.highwaters()), parent_pid)
                continue
            _put(out, ("batch", _package(source, batch)), parent_pid)
    except BaseException as e:
        log.exception("fetch process failed")
        _put(out, ("error", f"{type(e).__name__}: {e}"), parent_pid)
    finally:
        if source is not None:
            source.close()


class Prefetcher:
    """Parent-side handle of the fetch process.

    At most ``depth`` batches wait in the queue (bounded memory and back-pressure on Kafka).
    ``partitions``/``start_offsets`` are known after ``start()``.
    """

    def __init__(self, config: IngestConfig, start_offsets: dict[int, int], depth: int = 2):
        ctx = mp.get_context("spawn")  # never fork a process that holds torch/grpc threads
        self._out: mp.Queue = ctx.Queue(maxsize=depth)
        self._commands: mp.Queue = ctx.Queue()
        self._proc = ctx.Process(
            target=_child,
            args=(
                config,
                dict(start_offsets),
                self._out,
                self._commands,
                logging.getLogger().level,
                os.getpid(),
            ),
            name="tgnstream-fetch",
            daemon=True,
        )
        self.partitions: list[int] = []
        self.start_offsets: dict[int, int] = {}
        self.highwater: dict[int, int | None] = {}

    def start(self, timeout: float = 60.0) -> None:
        self._proc.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                kind, *rest = self._out.get(timeout=0.2)
                break
            except queue.Empty:
                if not self._proc.is_alive():
                    raise RuntimeError(
                        f"the Kafka fetch process exited during start-up (code {self._proc.exitcode}); "
                        "see the log above"
                    ) from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the Kafka fetch process did not start within {timeout} s") from None
        if kind == "error":
            self.stop()
            raise RuntimeError(f"the Kafka fetch process failed to start: {rest[0]}")
        self.partitions, self.start_offsets = rest

    def get(self, timeout: float) -> FetchedBatch | None:
        """The next batch; None when the source was idle (or nothing came in time)."""
        try:
            kind, payload = self._out.get(timeout=timeout)
        except queue.Empty:
            if not self._proc.is_alive():
                raise RuntimeError(
                    f"the Kafka fetch process died (exit code {self._proc.exitcode})"
                ) from None
            return None
        if kind == "error":
            raise RuntimeError(f"Kafka fetch process: {payload}")
        if kind == "idle":
            self.highwater = payload
            return None
        self.highwater = payload.highwater
        return payload

    def request_commit(self, offsets: dict[int, int]) -> None:
        self._commands.put(("commit", dict(offsets)))

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc.is_alive():
            self._commands.put(("stop",))
            # Drain so the child is never blocked on a full queue while we wait for it.
            while self._proc.is_alive() and timeout > 0:
                try:
                    self._out.get(timeout=0.1)
                except queue.Empty:
                    pass
                self._proc.join(0)
                timeout -= 0.1
            if self._proc.is_alive():
                self._proc.kill()
        self._proc.join(5)
