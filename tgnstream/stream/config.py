"""Typed configuration of reading the event topic: the Kafka connection, batch boundaries and
which records become events. Every consumer of the stream (the server's ingest, the trainer, a
hot swap's catch-up) reads through it, so the same settings give the same batches."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from tgnstream.core.events import MAX_ABS_EVENT_TIME_S

__all__ = ["KafkaConfig", "StreamConfig"]


class KafkaConfig(BaseModel):
    """How to reach the cluster; security settings are passed through to the Kafka clients."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = Field("127.0.0.1:9092", description="comma-separated host:port list")
    topic: str = Field("events", min_length=1, description="topic of interaction events")
    partitions: list[int] | None = Field(
        None, description="partitions to read (manual assignment); default: all of the topic's"
    )
    group_id: str | None = Field(
        "tgnstream-server",
        description="consumer group whose committed offsets mirror each durable snapshot, for lag "
        "monitoring only (never joined, never used for recovery); None disables commits",
    )
    client: Literal["auto", "confluent-kafka", "kafka-python"] = Field(
        "auto",
        description="consumer library of the ingest loop: confluent-kafka (librdkafka, about 4x "
        "faster) or kafka-python (pure Python); auto = confluent-kafka when installed",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    fetch_max_bytes: int = Field(52_428_800, gt=0)
    max_partition_fetch_bytes: int = Field(8_388_608, gt=0)
    request_timeout_ms: int = Field(30_000, gt=0)

    def client_kwargs(self) -> dict:
        """Connection settings shared by consumers, producers and admin clients."""
        kw: dict = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_plain_username
            if self.sasl_plain_password is not None:
                kw["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name):
                kw[name] = getattr(self, name)
        return kw


class StreamConfig(BaseModel):
    """How the topic becomes batches of events: micro-batching, record format, which records
    are rejected (and why). Settings that change batch boundaries or rejections change the state
    a log produces, so a reader that must reproduce another's state uses the same values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kafka: KafkaConfig = KafkaConfig()
    batch_max_events: int = Field(
        1000,
        ge=1,
        description="batch size in log records: a batch closes (is applied to memory) after exactly "
        "this many records counted from the snapshot's offsets, so its boundaries depend on the log "
        "alone. The records of the batch being filled are visible to queries at once as batch "
        "context (with one partition the state is then a pure function of the log prefix)",
    )
    batch_max_wait_ms: float = Field(
        50.0,
        gt=0,
        description="when caught up, records are handed to the open batch after at most this long "
        "(freshness; batch boundaries do not depend on it)",
    )
    poll_timeout_ms: int = Field(100, gt=0)
    encoding: Literal["json", "protobuf"] = "json"
    max_record_bytes: int = Field(65_536, gt=0)
    allow_self_loops: bool = False
    max_lateness_s: float | None = Field(
        None,
        ge=0,
        description="events older than (watermark - this) go to the DLQ as 'too_late'; None: "
        "every late event is applied with its time gap clamped at 0 (and counted)",
    )
    max_future_s: float | None = Field(
        86_400.0,
        gt=0,
        description="events more than this after the running watermark go to the DLQ as "
        "'too_far_ahead' (one event in milliseconds or from a broken clock would otherwise move the "
        "watermark years ahead); raise it for streams with longer gaps; None: no bound",
    )
    max_ahead_of_record_time_s: float | None = Field(
        None,
        ge=0,
        description="wall-clock bound: events whose ts is more than this ahead of their Kafka record "
        "timestamp go to the DLQ as 'too_far_ahead' (the timestamp is in the log, so replays agree); "
        "needs event times in Unix seconds; None: off",
    )
    max_nodes: int | None = Field(
        None,
        ge=1,
        description="most node ids the state may hold: an event that would add a node past it goes to "
        "the DLQ as 'node_limit' (counted; decided in log order, so replays and replicas agree) and "
        "events between known nodes go on; None: no limit (the state grows with every new id)",
    )
    max_abs_ts_s: float = Field(
        MAX_ABS_EVENT_TIME_S,
        gt=0,
        description="events with |ts| beyond this are rejected as 'ts_out_of_range' (default: about "
        "year 5100, which refuses Unix times in milliseconds or finer)",
    )
    on_log_gap: Literal["fail", "reset"] = Field(
        "fail",
        description="what to do when the log moved behind the applied offsets (topic recreated, "
        "broker replaced empty, records deleted by retention before they were applied): 'fail' "
        "stops with a message saying what happened; 'reset' continues from the earliest offset "
        "(keeping the state) with a loud log line and tgnstream_ingest_log_resets_total",
    )

    @property
    def poll_records(self) -> int:
        """Records one consumer poll may return: a whole micro-batch, and never tiny fetches."""
        return max(self.batch_max_events, 500)

    @model_validator(mode="after")
    def _check(self) -> StreamConfig:
        if self.kafka.partitions is not None and (
            not self.kafka.partitions or min(self.kafka.partitions) < 0
        ):
            raise ValueError("kafka.partitions must be a non-empty list of partition numbers >= 0")
        return self
