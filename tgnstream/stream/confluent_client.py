"""``ConsumerClient`` over confluent-kafka (librdkafka: fetching and parsing in C threads)."""

from __future__ import annotations

import json
import logging
import time
from uuid import UUID

import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from tgnstream.stream.config import KafkaConfig, StreamConfig
from tgnstream.stream.consumers import (
    UNKNOWN_TOPIC_GRACE_S,
    Columns,
    ConnectionLogThrottle,
    OffsetOutOfRange,
    TopicNotFoundError,
    TopicUnavailableError,
)

__all__ = ["ConfluentClient", "librdkafka_settings"]

log = logging.getLogger(__name__)

# librdkafka insists on a group id even for a consumer that never joins or commits.
_NO_GROUP = "tgnstream-assign-only"
_MASK64 = (1 << 64) - 1
# Fragments of librdkafka's per-attempt connection failure lines.
_CONNECTION_FAILURES = ("Connect to", "Disconnected", "brokers are down", "Connection refused")


class _ThrottledLogger:
    """What librdkafka logs through: forwards to the ``librdkafka`` logger, with connection
    failures rate-limited (``ConnectionLogThrottle``)."""

    def __init__(self, throttle: ConnectionLogThrottle):
        self._log = logging.getLogger("librdkafka")
        self._throttle = throttle

    def log(self, level: int, msg: str, *args) -> None:
        text = msg % args if args else msg
        if any(f in text for f in _CONNECTION_FAILURES):
            text = self._throttle.filter(text)
            if text is None:
                return
        self._log.log(level, "%s", text)


def librdkafka_settings(k: KafkaConfig) -> dict:
    """``KafkaConfig``'s connection settings under librdkafka's names."""
    s: dict = {"bootstrap.servers": k.bootstrap_servers, "security.protocol": k.security_protocol}
    if k.sasl_mechanism:
        s["sasl.mechanism"] = k.sasl_mechanism
        if k.sasl_plain_username is not None:
            s["sasl.username"] = k.sasl_plain_username
        if k.sasl_plain_password is not None:
            s["sasl.password"] = k.sasl_plain_password.get_secret_value()
    for ours, theirs in (
        ("ssl_cafile", "ssl.ca.location"),
        ("ssl_certfile", "ssl.certificate.location"),
        ("ssl_keyfile", "ssl.key.location"),
    ):
        if getattr(k, ours):
            s[theirs] = getattr(k, ours)
    return s


class ConfluentClient:
    """See ``consumers.ConsumerClient``. Records are confluent-kafka ``Message``s."""

    def __init__(self, config: StreamConfig):
        k = config.kafka
        self.topic = k.topic
        self._bootstrap = k.bootstrap_servers
        self._commits = k.group_id is not None
        self._max_poll = config.poll_records
        self._throttle = ConnectionLogThrottle()
        self._connected = True  # it must connect to list partitions; stats say otherwise later
        self._consumer = Consumer(
            {
                **librdkafka_settings(k),
                "group.id": k.group_id or _NO_GROUP,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                # Never jump by itself: a position outside the log is reported (poll raises
                # OffsetOutOfRange) and the source applies the configured policy.
                "auto.offset.reset": "error",
                "statistics.interval.ms": 1000,
                "stats_cb": self._on_stats,
                "error_cb": self._on_error,
                "fetch.max.bytes": k.fetch_max_bytes,
                "max.partition.fetch.bytes": k.max_partition_fetch_bytes,
                "socket.timeout.ms": k.request_timeout_ms,
            },
            logger=_ThrottledLogger(self._throttle),
        )
        self._settings = librdkafka_settings(k)
        self._tps: dict[int, TopicPartition] = {}
        self._positions: dict[int, int] = {}

    def partitions(self, timeout_s: float = 30.0) -> list[int]:
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            try:
                meta = self._consumer.list_topics(self.topic, timeout=5).topics.get(self.topic)
            except KafkaException as e:
                meta, why = None, str(e)
            else:
                why = str(meta.error) if meta is not None and meta.error is not None else "no partitions"
            if meta is not None and meta.error is None and meta.partitions:
                return sorted(meta.partitions)
            unknown = (
                meta is not None
                and meta.error is not None
                and meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
            )
            if unknown and time.monotonic() - start > UNKNOWN_TOPIC_GRACE_S:
                raise TopicNotFoundError(self.topic, self._bootstrap, meta.error.str())
            if time.monotonic() > deadline:
                raise TopicUnavailableError(f"topic {self.topic!r} not found on {self._bootstrap} ({why})")
            time.sleep(0.2)

    def assign(self, start_offsets: dict[int, int | None]) -> dict[int, int]:
        positions = {}
        for p, offset in start_offsets.items():
            if offset is None:
                # The log start (ListOffsets "earliest"), so the offsets are known before a fetch.
                marks = self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=30)
                if marks is None:
                    raise TopicUnavailableError(f"no answer for the start of {self.topic}[{p}] within 30 s")
                offset = max(int(marks[0]), 0)
            positions[p] = offset
        self._tps = {p: TopicPartition(self.topic, p) for p in positions}
        self._consumer.assign([TopicPartition(self.topic, p, o) for p, o in positions.items()])
        self._positions = dict(positions)
        return positions

    def poll(self, timeout_ms: int) -> list:
        messages = self._consumer.consume(self._max_poll, timeout_ms / 1000)
        if not messages:
            return messages
        if any(m.error() is not None for m in messages):
            messages = self._drop_errors(messages)
        if len(self._tps) > 1:
            messages.sort(key=lambda m: m.partition())  # stable: keeps each partition's order
            for m in messages:
                self._positions[m.partition()] = m.offset() + 1
        elif messages:
            self._positions[messages[-1].partition()] = messages[-1].offset() + 1
        return messages

    def _drop_errors(self, messages: list) -> list:
        for m in messages:
            err = m.error()
            if err is None:
                continue
            if err.fatal():
                raise KafkaException(err)
            if err.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
                raise OffsetOutOfRange(m.partition(), err.str())
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("Kafka: %s (partition %s); librdkafka retries", err, m.partition())
        return [m for m in messages if m.error() is None]

    # ------------------------------------------------------------------ log checks, health
    def seek(self, positions: dict[int, int]) -> None:
        self._positions.update(positions)
        self._consumer.assign([TopicPartition(self.topic, p, o) for p, o in self._positions.items()])

    def log_start(self, partition: int) -> int | None:
        try:
            low, _ = self._consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=10)
        except KafkaException:
            return None
        return max(int(low), 0)

    def topic_id(self) -> str | None:
        try:
            from confluent_kafka import TopicCollection
            from confluent_kafka.admin import AdminClient

            admin = AdminClient({**self._settings, "logger": _ThrottledLogger(self._throttle)})
            described = admin.describe_topics(TopicCollection([self.topic]), request_timeout=10)
            uuid = described[self.topic].result(timeout=15).topic_id
        except Exception as e:  # an old broker or client without topic ids: not checkable
            log.debug("could not read the id of topic %r: %s", self.topic, e)
            return None
        if uuid is None:
            return None
        # The canonical UUID text, as kafka-python and the Kafka tools print it.
        msb, lsb = uuid.get_most_significant_bits(), uuid.get_least_significant_bits()
        return str(UUID(int=((msb & _MASK64) << 64) | (lsb & _MASK64)))

    def connected(self) -> bool:
        return self._connected

    def _on_stats(self, raw: str) -> None:
        # Called from poll (this thread) every statistics.interval.ms: a broker (not the
        # bootstrap placeholder, nodeid -1) in state UP means we can fetch.
        try:
            brokers = json.loads(raw).get("brokers", {}).values()
        except ValueError:
            return
        up = any(b.get("nodeid", -1) >= 0 and b.get("state") == "UP" for b in brokers)
        self._set_connected(up)

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._set_connected(False)

    def _set_connected(self, up: bool) -> None:
        if up and not self._connected:
            log.info("Kafka: connected to %s again", self._bootstrap)
            self._throttle.reset()
        self._connected = up

    def position(self, partition: int) -> int:
        return self._positions[partition]

    def highwater(self, partition: int) -> int | None:
        try:
            _, high = self._consumer.get_watermark_offsets(self._tps[partition], cached=True)
        except KafkaException:
            return None
        return int(high) if high >= 0 else None

    def columns(self, records: list) -> Columns:
        n = len(records)
        return Columns(
            values=[m.value() for m in records],
            keys=[m.key() for m in records],
            partitions=np.fromiter((m.partition() for m in records), np.int32, n),
            offsets=np.fromiter((m.offset() for m in records), np.int64, n),
            timestamps_ms=np.fromiter((m.timestamp()[1] for m in records), np.int64, n),
        )

    def commit(self, offsets: dict[int, int]) -> None:
        if self._commits:
            self._consumer.commit(
                offsets=[TopicPartition(self.topic, p, o) for p, o in offsets.items()], asynchronous=False
            )

    def close(self) -> None:
        self._consumer.close()
