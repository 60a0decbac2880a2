"""Dead letters: rejected records go to ``<topic>.dlq`` unchanged, with why and where in headers.

Headers follow Kafka Connect's ``errors.deadletterqueue.context.headers.enable`` idea under a
``tgnstream.`` prefix; every header value is UTF-8 text (numbers in decimal), so any Kafka
tool can show them:

=============================== ==============================================================
``tgnstream.dlq.reason``        reason code (``tgnstream.stream.records.REASONS`` or the loop's)
``tgnstream.dlq.detail``        short human-readable explanation
``tgnstream.source.topic``      topic the record was read from
``tgnstream.source.partition``  its partition
``tgnstream.source.offset``     its offset
``tgnstream.source.timestamp``  its timestamp in ms since the epoch (absent when unknown)
``tgnstream.dlq.truncated``     only when the value was cut: its original length in bytes
=============================== ==============================================================

Key and value are the original bytes. Two unavoidable exceptions, both flagged: a record with
neither key nor value (a keyless tombstone) is sent with an empty value, because Kafka needs
one of them; a value too large for a produce request is cut to ``max_value_bytes`` (else it
could never be dead-lettered and would block the ingest loop forever).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kafka import KafkaProducer

__all__ = [
    "DLQ_HEADERS",
    "DeadLetterError",
    "DeadLetterPublisher",
    "dlq_topic",
    "read_dead_letters",
]

REASON = "tgnstream.dlq.reason"
DETAIL = "tgnstream.dlq.detail"
SOURCE_TOPIC = "tgnstream.source.topic"
SOURCE_PARTITION = "tgnstream.source.partition"
SOURCE_OFFSET = "tgnstream.source.offset"
SOURCE_TIMESTAMP = "tgnstream.source.timestamp"
TRUNCATED = "tgnstream.dlq.truncated"
DLQ_HEADERS: tuple[str, ...] = (
    REASON,
    DETAIL,
    SOURCE_TOPIC,
    SOURCE_PARTITION,
    SOURCE_OFFSET,
    SOURCE_TIMESTAMP,
    TRUNCATED,
)
# Room left for key, headers and record overhead below the produce request limit.
_HEADROOM = 64 * 1024
_BROKER_DEFAULT_MAX = 1024 * 1024  # Kafka's default message.max.bytes is about 1 MiB


def dlq_topic(topic: str) -> str:
    """The dead-letter topic of ``topic``."""
    return f"{topic}.dlq"


class DeadLetterError(RuntimeError):
    """Dead letters could not be delivered; they are kept and retried by the next ``flush``."""


class DeadLetterPublisher:
    """Sends rejected records (original key and value untouched) to ``<topic>.dlq`` with the
    reason and source partition/offset in headers.

    ``publish`` never blocks on the broker and never raises for delivery problems: failures
    (reported asynchronously by the producer, or raised by ``send`` itself) are kept, and
    ``flush`` re-sends them and raises ``DeadLetterError`` while any is still undelivered. So
    a caller that flushes before each snapshot never stores offsets past a dead letter that is
    not durable. Use a producer with ``acks="all"`` (kafka-python 3's idempotent default) and a
    short ``max_block_ms`` so a broker outage cannot stall the ingest loop inside ``send``.

    Args:
        producer: a ``kafka.KafkaProducer`` without key/value serializers (bytes in, bytes out),
            or a function that makes one, called at the first dead letter (a server that starts
            while the broker is unreachable does not block on it: a failed creation is a failed
            send, kept and retried by ``flush``).
        topic: the source topic; dead letters go to ``dlq_topic(topic)``.
        max_value_bytes: longer values are cut (flagged in a header); default: the producer's
            ``max_request_size`` (at most 1 MiB, the broker default) minus 64 KiB.
    """

    def __init__(
        self,
        producer: KafkaProducer | Callable[[], KafkaProducer],
        topic: str,
        max_value_bytes: int | None = None,
    ):
        self._producer = None if callable(producer) and not hasattr(producer, "send") else producer
        self._make_producer = producer if self._producer is None else None
        self.source_topic = topic
        self.topic = dlq_topic(topic)
        if max_value_bytes is None:
            config = getattr(self._producer, "config", {}) if self._producer is not None else {}
            request_max = int(config.get("max_request_size", _BROKER_DEFAULT_MAX))
            max_value_bytes = min(request_max, _BROKER_DEFAULT_MAX) - _HEADROOM
        if max_value_bytes <= 0:
            raise ValueError(f"max_value_bytes must be > 0, got {max_value_bytes}")
        self.max_value_bytes = max_value_bytes
        self._lock = threading.Lock()
        self._failed: list[tuple[dict[str, Any], BaseException]] = []
        self.published = 0  # records handed to the producer (including re-sends)

    def publish(
        self,
        *,
        key: bytes | None,
        value: bytes | None,
        reason: str,
        detail: str,
        source_topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int | None,
    ) -> None:
        """Queue one dead letter for sending (asynchronous; see ``flush``)."""
        headers = [
            (REASON, reason.encode("utf-8")),
            (DETAIL, detail.encode("utf-8", "replace")),
            (SOURCE_TOPIC, source_topic.encode("utf-8")),
            (SOURCE_PARTITION, str(int(partition)).encode()),
            (SOURCE_OFFSET, str(int(offset)).encode()),
        ]
        if timestamp_ms is not None and timestamp_ms >= 0:
            headers.append((SOURCE_TIMESTAMP, str(int(timestamp_ms)).encode()))
        if value is not None and len(value) > self.max_value_bytes:
            headers.append((TRUNCATED, str(len(value)).encode()))
            value = bytes(value[: self.max_value_bytes])
        if key is None and value is None:
            value = b""  # Kafka needs a key or a value; the reason (null_value) says what it was
        self._send({"key": key, "value": value, "headers": headers})

    @property
    def producer(self) -> KafkaProducer:
        """The producer (made on first use when a factory was given)."""
        if self._producer is None:
            self._producer = self._make_producer()
        return self._producer

    def _send(self, record: dict[str, Any]) -> None:
        self.published += 1
        try:
            future = self.producer.send(self.topic, **record)
        except Exception as e:  # e.g. KafkaTimeoutError (no metadata): keep it for flush
            self._record_failure(record, e)
            return
        future.add_errback(self._record_failure, record)

    def _record_failure(self, record: dict[str, Any], exc: BaseException) -> None:
        # Called from the producer's I/O thread for asynchronous failures.
        with self._lock:
            self._failed.append((record, exc))

    def pending_failures(self) -> int:
        """Dead letters that failed and were not delivered by a later flush yet."""
        with self._lock:
            return len(self._failed)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every dead letter is acknowledged; raise ``DeadLetterError`` if any is not.

        Failed ones are re-sent once within this call; those still failing are kept for the
        next call, so nothing is ever dropped silently.
        """
        self._flush_producer(timeout)
        with self._lock:
            failed, self._failed = self._failed, []
        if not failed:
            return
        started = time.monotonic()
        for record, _ in failed:
            self._send(record)
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        self._flush_producer(left)
        with self._lock:
            still = len(self._failed)
            first = self._failed[0][1] if self._failed else None
        if still:
            raise DeadLetterError(
                f"{still} dead letter(s) to {self.topic!r} could not be delivered (kept for retry): {first!r}"
            ) from first

    def _flush_producer(self, timeout: float | None) -> None:
        if self._producer is None and self._make_producer is not None:
            return  # nothing was ever sent (or the producer could not be made: its failures are kept)
        try:
            self.producer.flush(timeout=timeout)
        except Exception as e:  # KafkaTimeoutError: records still in flight
            raise DeadLetterError(f"flushing dead letters to {self.topic!r} timed out: {e!r}") from e


def read_dead_letters(bootstrap: str, topic: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Read a whole dead-letter topic (for tests and operations), oldest first per partition.

    Uses ``assign`` + ``seek_to_beginning`` (no consumer group) and reads up to the high
    watermark of every partition, waiting up to ``timeout`` s (also for the topic to appear).
    Each dict has ``reason``, ``detail``, ``source_topic``, ``partition``, ``offset``,
    ``timestamp_ms`` (source record), ``truncated_from``, ``key``, ``value``, ``headers`` (all
    of them, decoded) and ``dlq_partition``/``dlq_offset``.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False)
    deadline = time.monotonic() + timeout
    try:
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            consumer.topics()  # refreshes metadata
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(_as_dead_letter(r) for r in records)
            # The fetch high watermark is right even where ListOffsets is not (docs/architecture.md §9).
            highs = [consumer.highwater(tp) for tp in tps]
            if all(h is not None and consumer.position(tp) >= h for tp, h in zip(tps, highs)):
                break
        return sorted(out, key=lambda d: (d["dlq_partition"], d["dlq_offset"]))
    finally:
        consumer.close()


def _as_dead_letter(record: Any) -> dict[str, Any]:
    headers = {k: v.decode("utf-8", "replace") for k, v in (record.headers or [])}

    def number(name: str) -> int | None:
        text = headers.get(name)
        return int(text) if text is not None and text.lstrip("-").isdigit() else None

    return {
        "reason": headers.get(REASON),
        "detail": headers.get(DETAIL),
        "source_topic": headers.get(SOURCE_TOPIC),
        "partition": number(SOURCE_PARTITION),
        "offset": number(SOURCE_OFFSET),
        "timestamp_ms": number(SOURCE_TIMESTAMP),
        "truncated_from": number(TRUNCATED),
        "key": record.key,
        "value": record.value,
        "headers": headers,
        "dlq_partition": record.partition,
        "dlq_offset": record.offset,
    }
