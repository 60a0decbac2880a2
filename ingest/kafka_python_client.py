"""``ConsumerClient`` over kafka-python (pure Python; the fallback client)."""

from __future__ import annotations

import time

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from tgnstream.ingest.config import IngestConfig
from tgnstream.ingest.consumers import Columns

__all__ = ["KafkaPythonClient"]


class KafkaPythonClient:
    """See ``consumers.ConsumerClient``. Records are kafka-python ``ConsumerRecord``s."""

    def __init__(self, config: IngestConfig):
        k = config.kafka
        self.topic = k.topic
        self._bootstrap = k.bootstrap_servers
        self._commits = k.group_id is not None
        self._consumer = KafkaConsumer(
            **k.client_kwargs(),
            group_id=k.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=config.poll_records,
            fetch_max_bytes=k.fetch_max_bytes,
            max_partition_fetch_bytes=k.max_partition_fetch_bytes,
            request_timeout_ms=k.request_timeout_ms,
        )
        self._tps: dict[int, TopicPartition] = {}

    def partitions(self, timeout_s: float = 30.0) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while True:
            parts = self._consumer.partitions_for_topic(self.topic)
            if parts:
                return sorted(parts)
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {self.topic!r} not found on {self._bootstrap}")
            time.sleep(0.2)

    def assign(self, start_offsets: dict[int, int | None]) -> dict[int, int]:
        self._tps = {p: TopicPartition(self.topic, p) for p in start_offsets}
        self._consumer.assign(list(self._tps.values()))
        positions = {}
        for p, tp in self._tps.items():
            if start_offsets[p] is None:
                self._consumer.seek_to_beginning(tp)
                positions[p] = self._consumer.position(tp)
            else:
                self._consumer.seek(tp, start_offsets[p])
                positions[p] = start_offsets[p]
        return positions

    def poll(self, timeout_ms: int) -> list:
        polled = self._consumer.poll(timeout_ms=timeout_ms)
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

    def close(self) -> None:
        self._consumer.close(autocommit=False)
