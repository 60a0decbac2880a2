"""Kafka source of micro-batches: manual assignment, seek to snapshot offsets, deterministic
batch boundaries, high-watermark lag."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from tgnstream.stream.config import StreamConfig
from tgnstream.stream.consumers import Columns, ConsumerClient, OffsetOutOfRange, open_consumer

__all__ = ["KafkaSource", "LogGapError", "LogReset", "RecordBatch", "SourceRecord"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceRecord:
    """One Kafka record as the ingest loop needs it."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None


class LogGapError(RuntimeError):
    """The log no longer holds the records after the applied offsets (policy ``fail``)."""


@dataclass(frozen=True)
class LogReset:
    """Policy ``reset`` moved ``partition`` from ``old`` to ``new`` (the log start): ``why``."""

    partition: int
    old: int
    new: int
    why: str


@dataclass(frozen=True)
class RecordBatch:
    """A micro-batch: its records in consumption order (as columns) plus the next offset of
    every partition once the batch is applied (what a snapshot taken right after it must store)."""

    records: Columns
    next_offsets: dict[int, int]


class KafkaSource:
    """Reads ``config.kafka.topic`` by manual assignment (no group join) from given offsets.

    Batch boundaries: a batch closes at ``batch_max_events`` records, or earlier only when every
    assigned partition is caught up with its log end and ``batch_max_wait_ms`` has passed since
    the batch's first record. Replaying a backlog therefore always yields the same boundaries,
    which is what makes recovery reproduce the uninterrupted state exactly (memory is
    batch-granular). With several partitions the interleaving follows fetch order, so exact
    reproducibility needs one partition (docs/serving.md, Ingest semantics).
    """

    def __init__(
        self,
        config: StreamConfig,
        start_offsets: dict[int, int] | None = None,
        expected_topic_id: str | None = None,
    ):
        self.config = config
        k = config.kafka
        self.topic = k.topic
        self._client: ConsumerClient = open_consumer(config)
        partitions = k.partitions if k.partitions is not None else self._client.partitions()
        self.partitions = sorted(partitions)
        start_offsets = start_offsets or {}
        unknown = set(start_offsets) - set(self.partitions)
        if unknown:
            raise ValueError(
                f"the snapshot has offsets for partitions {sorted(unknown)} of {self.topic!r} that "
                f"this server does not read ({self.partitions}); refusing to skip their events"
            )
        self.next_offsets: dict[int, int] = self._client.assign(
            {p: start_offsets.get(p) for p in self.partitions}
        )
        self._buffer: deque = deque()  # the client's own record objects
        self._first_buffered_at: float | None = None
        self.resets: list[LogReset] = []  # not yet reported (the fetch process ships them)
        self._was_connected = True
        self._adopt_topic_id = False  # after a reset to a log whose id was not known yet
        self._adopt_tried_at = float("-inf")
        self.topic_id = self._client.topic_id()
        log.info(
            "reading %s (id %s) partitions %s from offsets %s",
            self.topic,
            self.topic_id,
            self.partitions,
            self.next_offsets,
        )
        if expected_topic_id and self.topic_id and expected_topic_id != self.topic_id:
            self._gap(
                self.partitions,
                f"the topic was recreated: its id is {self.topic_id}, the state was built from topic id "
                f"{expected_topic_id}",
            )
        for p in self.partitions:
            start = self._client.log_start(p)
            if start is not None and self.next_offsets[p] < start:
                self._gap(
                    [p],
                    f"records {self.next_offsets[p]}..{start - 1} were deleted (retention) before they "
                    "were applied",
                )

    # ---------------------------------------------------------------------------- log gaps
    def _gap(self, partitions: list[int], why: str) -> None:
        """The log moved behind the applied position of ``partitions``: apply the policy."""
        where = ", ".join(f"{self.topic}[{p}] at offset {self.next_offsets[p]}" for p in partitions)
        if self.config.on_log_gap == "fail":
            raise LogGapError(
                f"{where}: {why}. Refusing to skip or re-read records silently. If the old log is "
                "gone for good, start over with an empty snapshot directory, or set "
                "ingest.on_log_gap = 'reset' to continue from the earliest offset with the current state"
            )
        for p in partitions:
            start = self._client.log_start(p)
            new = 0 if start is None else start
            log.error(
                "LOG GAP on %s[%d]: %s. Policy 'reset': continuing from offset %d (was %d) with the "
                "current state",
                self.topic,
                p,
                why,
                new,
                self.next_offsets[p],
            )
            self.resets.append(LogReset(p, self.next_offsets[p], new, why))
            self.next_offsets[p] = new
        # The log the positions now refer to: adopt its id (unknown now, e.g. the topic is not
        # recreated yet: adopt the first id seen later without calling that another gap).
        self.topic_id = self._client.topic_id()
        self._adopt_topic_id = self.topic_id is None
        # Buffered records are refetched from the (new) positions.
        self._buffer.clear()
        self._first_buffered_at = None
        self._client.seek(dict(self.next_offsets))

    def _check_log(self) -> bool:
        """After a fetch: the log must still reach every position read so far; True when it
        did not (and the policy moved the positions)."""
        connected = self._client.connected()
        adopt = self._adopt_topic_id and time.monotonic() - self._adopt_tried_at >= 1.0
        reconnected = connected and not self._was_connected and self.topic_id is not None
        if reconnected or adopt:
            now = self._client.topic_id()  # the broker may have been replaced meanwhile
            self._adopt_tried_at = time.monotonic()
            if adopt:
                self.topic_id = now
                self._adopt_topic_id = now is None
            elif now is not None and now != self.topic_id:
                old, self.topic_id = self.topic_id, now
                self._gap(self.partitions, f"the topic was recreated while unreachable (id {old} -> {now})")
                return True
        self._was_connected = connected
        behind = []
        for p in self.partitions:
            hw = self._client.highwater(p)
            if hw is not None and hw < self._client.position(p):
                behind.append((p, hw))
        if behind:
            p, hw = behind[0]
            self._gap(
                [q for q, _ in behind],
                f"the log now ends at offset {hw}, before the {self._client.position(p)} records already "
                "read (topic recreated, or broker replaced empty)",
            )
            return True
        return False

    def connected(self) -> bool:
        return self._client.connected()

    # ------------------------------------------------------------------------------ reading
    def _fetch(self, timeout_ms: int) -> None:
        try:
            records = self._client.poll(timeout_ms)
        except OffsetOutOfRange as e:
            self._gap([e.partition], f"the broker says the position is outside the log ({e.detail})")
            return
        if self._check_log() or not records:
            return
        if self._first_buffered_at is None:
            self._first_buffered_at = time.monotonic()
        self._buffer.extend(records)

    def caught_up(self) -> bool:
        """True when every fetched record is buffered and no partition has more in the log."""
        for p in self.partitions:
            hw = self._client.highwater(p)
            if hw is None or self._client.position(p) < hw:
                return False
        return True

    def next_batch(self) -> RecordBatch | None:
        """The next micro-batch, or None when nothing arrived within the poll timeout."""
        cfg = self.config
        want = cfg.batch_max_events
        while len(self._buffer) < want:
            waited_ms = (
                (time.monotonic() - self._first_buffered_at) * 1000 if self._first_buffered_at else 0.0
            )
            if self._buffer and waited_ms >= cfg.batch_max_wait_ms and self.caught_up():
                break
            before = len(self._buffer)
            remaining = cfg.batch_max_wait_ms - waited_ms if self._buffer else cfg.poll_timeout_ms
            self._fetch(max(1, int(min(remaining, cfg.poll_timeout_ms))))
            if not self._buffer:
                return None
            if len(self._buffer) == before and not self.caught_up() and waited_ms > 60_000:
                log.warning("no progress for 60 s while behind the log end; emitting a partial batch")
                break
        n = min(want, len(self._buffer))
        buffer = self._buffer
        if n == len(buffer):
            records = list(buffer)
            buffer.clear()
        else:
            records = [buffer.popleft() for _ in range(n)]
        self._first_buffered_at = time.monotonic() if buffer else None
        cols = self._client.columns(records)
        for p in self.partitions:
            mine = cols.offsets[cols.partitions == p] if len(self.partitions) > 1 else cols.offsets
            if mine.size:
                self.next_offsets[p] = int(mine[-1]) + 1
        return RecordBatch(cols, dict(self.next_offsets))

    # --------------------------------------------------------------------------- monitoring
    def highwaters(self) -> dict[int, int | None]:
        """Per partition: the log end seen in the latest fetch response (None before the first).
        Lag is computed from it because ListOffsets can be wrong on Tansu (docs/architecture.md §9)."""
        return {p: self._client.highwater(p) for p in self.partitions}

    def commit(self, offsets: dict[int, int]) -> None:
        """Record ``offsets`` as the group's committed position (monitoring only; a no-op
        without a group id)."""
        self._client.commit(offsets)

    def close(self) -> None:
        self._client.close()
