"""The Kafka consumer behind ``KafkaSource``: one small interface, two clients.

* ``confluent-kafka`` (librdkafka): fetching, decompression and record parsing run in C threads;
  about 4x kafka-python's consume rate on the embedded broker, which made Kafka parsing stop
  being the bound of ingest (benchmarks/README.md, serve.py).
* ``kafka-python``: pure Python; the fallback where no confluent-kafka wheel exists.

``KafkaConfig.client`` picks one ("auto": confluent-kafka when it imports). Both read by manual
assignment from explicit offsets and report the log end seen in fetch responses (ListOffsets
is wrong on Tansu, docs/architecture.md §9), so the source above them behaves the same with either.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tgnstream.stream.config import StreamConfig

__all__ = [
    "Columns",
    "ConnectionLogThrottle",
    "ConsumerClient",
    "OffsetOutOfRange",
    "TopicNotFoundError",
    "TopicUnavailableError",
    "open_consumer",
    "resolve_client",
    "throttle_kafka_python_logs",
]

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


class OffsetOutOfRange(Exception):
    """The broker says a partition's position is outside its log (deleted by retention, or the
    log is shorter than it was): raised by ``poll`` instead of silently jumping elsewhere."""

    def __init__(self, partition: int, detail: str = ""):
        super().__init__(partition, detail)
        self.partition = partition
        self.detail = detail


#: A broker that answers "unknown topic" this long is believed (a topic being created, or
#: auto-created by a first producer, shows up well within it); no answer at all is waited for
#: longer, as a broker that is starting may need.
UNKNOWN_TOPIC_GRACE_S = 5.0


class TopicUnavailableError(RuntimeError):
    """The topic's metadata or offsets could not be had (no answer in time): a condition that may
    pass, which callers retry with backoff rather than crash."""


class TopicNotFoundError(TopicUnavailableError):
    """The broker answers, and the topic does not exist there (a typo, or it was never created).
    The message says how to fix it."""

    def __init__(self, topic: str, bootstrap: str, detail: str = ""):
        super().__init__(
            f"topic {topic!r} does not exist on {bootstrap}{f' ({detail})' if detail else ''}: create it "
            f"(the embedded broker: tgnstream broker --topic {topic}; Apache Kafka: kafka-topics.sh "
            f"--create --topic {topic}), or set the kafka topic setting to an existing one"
        )
        self.topic = topic


class ConsumerClient(Protocol):
    """What ``KafkaSource`` needs from a Kafka consumer of one topic.

    Records are the client's own objects (wrapping each would cost about 1 µs per record);
    ``columns`` turns a list of them into arrays once per micro-batch.
    """

    def partitions(self) -> list[int]:
        """The topic's partitions. Raises ``TopicNotFoundError`` when the broker keeps saying the
        topic is unknown for ``UNKNOWN_TOPIC_GRACE_S``, ``TopicUnavailableError`` when no answer
        comes within the timeout."""

    def assign(self, start_offsets: dict[int, int | None]) -> dict[int, int]:
        """Read these partitions from these offsets (None: the log start); returns the offsets."""

    def poll(self, timeout_ms: int) -> list[Any]:
        """Records fetched within ``timeout_ms`` (maybe none), partition by partition; raises
        ``OffsetOutOfRange`` rather than resetting a position by itself."""

    def seek(self, positions: dict[int, int]) -> None:
        """Continue these partitions from these offsets."""

    def log_start(self, partition: int) -> int | None:
        """The partition's earliest offset (a broker round trip; None when unreachable)."""

    def topic_id(self) -> str | None:
        """The topic's unique id (a recreated topic has a new one); None when unknown."""

    def connected(self) -> bool:
        """Whether the client currently has a working connection to a broker."""

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


def open_consumer(config: StreamConfig) -> ConsumerClient:
    """A connected consumer of ``config.kafka.topic`` with the configured client."""
    name = resolve_client(config.kafka.client)
    if name == "confluent-kafka":
        from tgnstream.stream.confluent_client import ConfluentClient

        return ConfluentClient(config)
    from tgnstream.stream.kafka_python_client import KafkaPythonClient

    return KafkaPythonClient(config)


class ConnectionLogThrottle:
    """Rate-limits a Kafka client's connection-failure log lines while a broker is unreachable.

    Clients retry connecting every few tens of milliseconds and log each failure (hundreds of
    lines a minute). ``filter(text)`` returns the line to log, or None to drop it: the first
    failure of a streak passes; later ones pass at most at 1, 2, 4, ... ``max_interval_s``
    seconds into the streak, annotated with how many were suppressed. ``reset()`` (called when
    the connection is back) ends the streak.
    """

    def __init__(self, max_interval_s: float = 60.0, quiet_reset_s: float = 120.0, clock=time.monotonic):
        self._max = max_interval_s
        self._quiet_reset = quiet_reset_s
        self._clock = clock
        self._last_seen = float("-inf")
        self.reset()

    def reset(self) -> None:
        self._next_at: float | None = None
        self._interval = 1.0
        self._suppressed = 0

    def filter(self, text: str) -> str | None:
        now = self._clock()
        if now - self._last_seen > self._quiet_reset:  # a long quiet spell ends the streak too
            self.reset()
        self._last_seen = now
        if self._next_at is not None and now < self._next_at:
            self._suppressed += 1
            return None
        if self._suppressed:
            text = f"{text} (and {self._suppressed} similar lines suppressed)"
        self._suppressed = 0
        self._next_at = now + self._interval
        self._interval = min(self._interval * 2, self._max)
        return text


# kafka-python's lines for one failed (re)connection attempt.
_KAFKA_PYTHON_FAILURES = ("ECONNREFUSED", "Connection failed", "Connection lost", "Metadata refresh: failed")


class _KafkaPythonThrottle(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._throttle = ConnectionLogThrottle()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not any(f in text for f in _KAFKA_PYTHON_FAILURES):
            return True
        kept = self._throttle.filter(text)
        if kept is None:
            return False
        record.msg, record.args = kept, None
        return True


def throttle_kafka_python_logs() -> None:
    """Rate-limit kafka-python's connection-failure lines (its producers and admin clients
    retry every few hundred milliseconds while a broker is down, three lines a try) on the
    handlers of the root logger; idempotent."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, _KafkaPythonThrottle) for f in handler.filters):
            handler.addFilter(_KafkaPythonThrottle())
