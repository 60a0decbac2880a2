"""Small helpers for tests and benchmarks that talk to Kafka (the embedded broker or a real one)."""

from __future__ import annotations

import time
from typing import Any

from tgnstream.broker import free_port

__all__ = ["consume_records", "free_port"]


def consume_records(
    bootstrap: str,
    topic: str,
    count: int,
    *,
    partition: int = 0,
    offset: int = 0,
    timeout: float = 10.0,
    **consumer_config: Any,
) -> list:  # list[kafka.consumer.fetcher.ConsumerRecord]
    """Read exactly ``count`` records of one partition starting at ``offset``.

    Uses ``assign`` + ``seek`` (no consumer-group join: slow on Tansu, see tgnstream.broker).
    Raises ``TimeoutError`` naming how many arrived if fewer than ``count`` do within
    ``timeout`` seconds; records past ``count`` are not returned.
    """
    from kafka import KafkaConsumer, TopicPartition

    tp = TopicPartition(topic, partition)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **consumer_config)
    try:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        records: list = []
        deadline = time.monotonic() + timeout
        while len(records) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{len(records)} of {count} records from {topic}[{partition}]@{offset} in {timeout:g} s"
                )
            for batch in consumer.poll(timeout_ms=int(min(left, 1.0) * 1000)).values():
                records.extend(batch)
        return records[:count]
    finally:
        consumer.close()
