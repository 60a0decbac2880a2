"""Kafka source of micro-batches: manual assignment, seek to snapshot offsets, deterministic
batch boundaries, high-watermark lag."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from tgnstream.ingest.config import IngestConfig

__all__ = ["KafkaSource", "RecordBatch", "SourceRecord"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceRecord:
    """One Kafka record as the ingest loop needs it."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class RecordBatch:
    """A micro-batch: records in consumption order plus the next offset of every partition once
    the batch is applied (what a snapshot taken right after it must store)."""

    records: list  # kafka ConsumerRecord objects (partition, offset, timestamp, key, value)
    next_offsets: dict[int, int]


class KafkaSource:
    """Reads ``config.kafka.topic`` by manual assignment (no group join) from given offsets.

    Batch boundaries: a batch closes at ``batch_max_events`` records, or earlier only when every
    assigned partition is caught up with its log end and ``batch_max_wait_ms`` has passed since
    the batch's first record. Replaying a backlog therefore always yields the same boundaries,
    which is what makes recovery reproduce the uninterrupted state exactly (memory is
    batch-granular). With several partitions the interleaving follows fetch order, so exact
    reproducibility needs one partition (documented in the README).
    """

    def __init__(self, config: IngestConfig, start_offsets: dict[int, int] | None = None):
        self.config = config
        k = config.kafka
        self.topic = k.topic
        self._consumer = KafkaConsumer(
            **k.client_kwargs(),
            group_id=k.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=max(config.batch_max_events, 500),
            fetch_max_bytes=k.fetch_max_bytes,
            max_partition_fetch_bytes=k.max_partition_fetch_bytes,
            request_timeout_ms=k.request_timeout_ms,
        )
        partitions = k.partitions if k.partitions is not None else self._discover_partitions()
        self.partitions = sorted(partitions)
        self._tps = {p: TopicPartition(self.topic, p) for p in self.partitions}
        self._consumer.assign(list(self._tps.values()))
        start_offsets = start_offsets or {}
        unknown = set(start_offsets) - set(self.partitions)
        if unknown:
            raise ValueError(
                f"the snapshot has offsets for partitions {sorted(unknown)} of {self.topic!r} that "
                f"this server does not read ({self.partitions}); refusing to skip their events"
            )
        self.next_offsets: dict[int, int] = {}
        for p, tp in self._tps.items():
            if p in start_offsets:
                self._consumer.seek(tp, start_offsets[p])
                self.next_offsets[p] = start_offsets[p]
            else:
                self._consumer.seek_to_beginning(tp)
                self.next_offsets[p] = self._consumer.position(tp)
        # kafka-python's own record objects: wrapping each one would cost ~1 µs per record.
        self._buffer: deque = deque()
        self._first_buffered_at: float | None = None
        log.info("reading %s partitions %s from offsets %s", self.topic, self.partitions, self.next_offsets)

    def _discover_partitions(self, timeout_s: float = 30.0) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while True:
            parts = self._consumer.partitions_for_topic(self.topic)
            if parts:
                return list(parts)
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {self.topic!r} not found on {self.config.kafka.bootstrap_servers}")
            time.sleep(0.2)

    # ------------------------------------------------------------------------------ reading
    def _fetch(self, timeout_ms: int) -> None:
        polled = self._consumer.poll(timeout_ms=timeout_ms)
        if not polled:
            return
        if self._first_buffered_at is None:
            self._first_buffered_at = time.monotonic()
        # Fixed partition order makes multi-partition interleaving at least stable per fetch.
        for tp in sorted(polled, key=lambda tp: tp.partition):
            self._buffer.extend(polled[tp])

    def caught_up(self) -> bool:
        """True when every fetched record is buffered and no partition has more in the log."""
        for tp in self._tps.values():
            hw = self._consumer.highwater(tp)
            if hw is None or self._consumer.position(tp) < hw:
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
        for p in self.partitions:
            last = next((r.offset for r in reversed(records) if r.partition == p), None)
            if last is not None:
                self.next_offsets[p] = last + 1
        return RecordBatch(records, dict(self.next_offsets))

    # --------------------------------------------------------------------------- monitoring
    def highwaters(self) -> dict[int, int | None]:
        """Per partition: the log end seen in the latest fetch response (None before the first).
        Lag is computed from it because ListOffsets can be wrong on Tansu (design §9)."""
        return {p: self._consumer.highwater(tp) for p, tp in self._tps.items()}

    def commit(self, offsets: dict[int, int]) -> None:
        """Record ``offsets`` as the group's committed position (monitoring only)."""
        if self.config.kafka.group_id is None:
            return
        self._consumer.commit({self._tps[p]: OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})

    def close(self) -> None:
        self._consumer.close(autocommit=False)
