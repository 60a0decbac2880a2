"""The Kafka consumer behind ``KafkaSource``: one small interface, two clients.

* ``confluent-kafka`` (librdkafka): fetching, decompression and record parsing run in C threads;
  about 4x kafka-python's consume rate on the embedded broker, which made Kafka parsing stop
  being the bound of ingest (see the README's benchmark).
* ``kafka-python``: pure Python; the fallback where no confluent-kafka wheel exists.

``KafkaConfig.client`` picks one ("auto": confluent-kafka when it imports). Both read by manual
assignment from explicit offsets and report the log end seen in fetch responses (ListOffsets
is wrong on Tansu, design §9), so the source above them behaves the same with either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tgnstream.ingest.config import IngestConfig

__all__ = ["Columns", "ConsumerClient", "open_consumer", "resolve_client"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Columns:
    """Records as columns: ``values``/``keys`` (bytes or None) of ``n`` records, ``partitions``
    ``[n]`` int32, ``offsets`` ``[n]`` int64, ``timestamps_ms`` ``[n]`` int64 (-1: none)."""

    values: list
    keys: list
    partitions: np.ndarray
    offsets: np.ndarray
    timestamps_ms: np.ndarray


class ConsumerClient(Protocol):
    """What ``KafkaSource`` needs from a Kafka consumer of one topic.

    Records are the client's own objects (wrapping each would cost about 1 µs per record);
    ``columns`` turns a list of them into arrays once per micro-batch.
    """

    def partitions(self) -> list[int]:
        """The topic's partitions (waits for the topic to exist, raises after a timeout)."""

    def assign(self, start_offsets: dict[int, int | None]) -> dict[int, int]:
        """Read these partitions from these offsets (None: the log start); returns the offsets."""

    def poll(self, timeout_ms: int) -> list[Any]:
        """Records fetched within ``timeout_ms`` (maybe none), partition by partition."""

    def position(self, partition: int) -> int:
        """The offset after the last record returned by ``poll``."""

    def highwater(self, partition: int) -> int | None:
        """The log end seen in the latest fetch response (None before the first)."""

    def columns(self, records: list[Any]) -> Columns: ...

    def commit(self, offsets: dict[int, int]) -> None:
        """Record ``offsets`` as the consumer group's committed position."""

    def close(self) -> None: ...


def resolve_client(name: str) -> str:
    """The client ``name`` means here: "auto" is confluent-kafka when it imports."""
    if name != "auto":
        return name
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        log.warning("confluent-kafka is not installed: reading Kafka with kafka-python (slower)")
        return "kafka-python"
    return "confluent-kafka"


def open_consumer(config: IngestConfig) -> ConsumerClient:
    """A connected consumer of ``config.kafka.topic`` with the configured client."""
    name = resolve_client(config.kafka.client)
    if name == "confluent-kafka":
        from tgnstream.ingest.confluent_client import ConfluentClient

        return ConfluentClient(config)
    from tgnstream.ingest.kafka_python_client import KafkaPythonClient

    return KafkaPythonClient(config)
