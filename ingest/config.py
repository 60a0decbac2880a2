"""Typed configuration of the ingest loop: the stream settings plus dead letters and prequential
quality."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tgnstream.stream.config import KafkaConfig, StreamConfig

__all__ = ["KafkaConfig", "IngestConfig", "QualityConfig"]


class QualityConfig(BaseModel):
    """Prequential (score-then-apply) quality estimate of the served model on live events."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    events_per_batch: int = Field(16, ge=1, description="live events scored per micro-batch (sampled)")
    negatives: int = Field(99, ge=1, description="random destinations each event is ranked against (MRR)")
    window: int = Field(5000, ge=10, description="rolling window of scored events for AP and MRR")
    min_interval_ms: float = Field(
        100.0,
        ge=0,
        description="score at most one micro-batch per interval: bounds the monitoring cost (one "
        "scoring costs a few ms whatever the batch size) to ~10 scorings/s; 0 scores every batch",
    )
    seed: int = 0


class IngestConfig(StreamConfig):
    """The server's ingest loop: how the topic is read (``StreamConfig``) plus what the loop
    adds around the shared path (dead letters, prequential quality)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dlq_enabled: bool = Field(
        True, description="send invalid records to <topic>.dlq (else: count and log only)"
    )
    quality: QualityConfig = QualityConfig()
