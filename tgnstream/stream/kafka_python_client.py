"""``ConsumerClient`` over kafka-python (pure Python; the fallback client)."""

from __future__ import annotations

import logging
import time

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError
from kafka.structs import OffsetAndMetadata

from tgnstream.stream.config import StreamConfig
from tgnstream.stream.consumers import (
    UNKNOWN_TOPIC_GRACE_S,
    Columns,
    OffsetOutOfRange,
    TopicNotFoundError,
    TopicUnavailableError,
)

log = logging.getLogger(__name__)

__all__ = ["KafkaPythonClient"]


class KafkaPythonClient:
    """See ``consumers.ConsumerClient``. Records are kafka-python ``ConsumerRecord``s."""

    def __init__(self, config: StreamConfig):
        k = config.kafka
        self.topic = k.topic
        self._bootstrap = k.bootstrap_servers
        self._commits = k.group_id is not None
        self._consumer = KafkaConsumer(
            **k.client_kwargs(),
            group_id=k.group_id,
            enable_auto_commit=False,
            auto_offset_reset="none",  # out of range raises: the source applies its policy
            max_poll_records=config.poll_records,
            fetch_max_bytes=k.fetch_max_bytes,
            max_partition_fetch_bytes=k.max_partition_fetch_bytes,
            request_timeout_ms=k.request_timeout_ms,
        )
        self._tps: dict[int, TopicPartition] = {}
        self._client_kwargs = k.client_kwargs()

    def partitions(self, timeout_s: float = 30.0) -> list[int]:
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            parts = self._consumer.partitions_for_topic(self.topic)
            if parts:
                return sorted(parts)
            # Metadata that came back without the topic: the broker answered, the topic is not there.
            answered = bool(self._consumer._client.cluster.brokers())
            if answered and time.monotonic() - start > UNKNOWN_TOPIC_GRACE_S:
                raise TopicNotFoundError(self.topic, self._bootstrap)
            if time.monotonic() > deadline:
                raise TopicUnavailableError(f"topic {self.topic!r} not found on {self._bootstrap}")
            time.sleep(0.2)

    def assign(self, start_offsets: dict[int, int | None]) -> dict[int, int]:
        self._tps = {p: TopicPartition(self.topic, p) for p in start_offsets}
        self._consumer.assign(list(self._tps.values()))
        # Explicit offsets everywhere (the log start looked up first): with auto_offset_reset
        # "none", a partition without a position would make the next call raise.
        starts = [tp for p, tp in self._tps.items() if start_offsets[p] is None]
        beginning = self._consumer.beginning_offsets(starts) if starts else {}
        positions = {}
        for p, tp in self._tps.items():
            offset = start_offsets[p] if start_offsets[p] is not None else int(beginning[tp])
            self._consumer.seek(tp, offset)
            positions[p] = offset
        return positions

    def poll(self, timeout_ms: int) -> list:
        try:
            polled = self._consumer.poll(timeout_ms=timeout_ms)
        except (OffsetOutOfRangeError, NoOffsetForPartitionError) as e:
            parts = [tp.partition for tp in (e.args[0] if e.args and isinstance(e.args[0], dict) else {})]
            raise OffsetOutOfRange(parts[0] if parts else min(self._tps), str(e)) from None
        records: list = []
        for tp in sorted(polled, key=lambda tp: tp.partition):  # a stable interleaving per fetch
            records.extend(polled[tp])
        return records

    def position(self, partition: int) -> int:
        return self._consumer.position(self._tps[partition])

    def highwater(self, partition: int) -> int | None:
        return self._consumer.highwater(self._tps[partition])

    def columns(self, records: list) -> Columns:
        n = len(records)
        return Columns(
            values=[r.value for r in records],
            keys=[r.key for r in records],
            partitions=np.fromiter((r.partition for r in records), np.int32, n),
            offsets=np.fromiter((r.offset for r in records), np.int64, n),
            timestamps_ms=np.fromiter((r.timestamp for r in records), np.int64, n),
        )

    def commit(self, offsets: dict[int, int]) -> None:
        if self._commits:
            self._consumer.commit({self._tps[p]: OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})

    def seek(self, positions: dict[int, int]) -> None:
        for p, o in positions.items():
            self._consumer.seek(self._tps[p], o)

    def log_start(self, partition: int) -> int | None:
        tp = self._tps[partition]
        try:
            return int(self._consumer.beginning_offsets([tp], timeout_ms=10_000)[tp])
        except KafkaError:
            return None

    def topic_id(self) -> str | None:
        from kafka.admin import KafkaAdminClient

        try:
            admin = KafkaAdminClient(**self._client_kwargs)
            try:
                described = admin.describe_topics([self.topic])
            finally:
                admin.close()
        except Exception as e:  # an old broker without topic ids: not checkable
            log.debug("could not read the id of topic %r: %s", self.topic, e)
            return None
        ids = [t.get("topic_id") for t in described if t.get("name") == self.topic]
        return str(ids[0]) if ids and ids[0] else None

    def connected(self) -> bool:
        count = self._consumer.metrics().get("consumer-metrics", {}).get("connection-count", 0.0)
        return count > 0

    def close(self) -> None:
        self._consumer.close(autocommit=False)
