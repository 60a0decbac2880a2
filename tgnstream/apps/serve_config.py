"""Configuration of ``tgnstream serve``: one file (TOML or JSON) plus environment overrides.

Environment variables win over the file: ``TGNSTREAM_SERVE_<SECTION>__<FIELD>``, e.g.
``TGNSTREAM_SERVE_INGEST__KAFKA__BOOTSTRAP_SERVERS=kafka:9092`` or
``TGNSTREAM_SERVE_GRPC__PORT=50052``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from tgnstream.core.spec import spec_settings
from tgnstream.ingest.config import IngestConfig
from tgnstream.model_server.config import GrpcConfig
from tgnstream.runtime.health import HealthConfig
from tgnstream.runtime.hot_swap import HotSwapConfig
from tgnstream.runtime.settings import FileSettings, load_settings
from tgnstream.runtime.snapshots import SnapshotConfig

__all__ = ["ModelSource", "ServeConfig", "load_serve_config"]


class ModelSource(spec_settings(BaseModel, default_preset="tgn")):
    """Which model to serve when no snapshot exists yet (a snapshot, once written, wins: it
    holds weights, state and version together). Without a checkpoint: fresh weights of the model
    spec ``preset`` with overrides of its fields (``model_spec()``); with one, the checkpoint's
    spec, and any of these set explicitly must agree with it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: Path | None = Field(
        None, description="checkpoint.pt from `tgnstream train` (weights and architecture)"
    )
    keep_checkpoint_state: bool = Field(
        False,
        description="also start from the checkpoint's node state (only right if the topic continues "
        "exactly where the checkpoint's stream ended); default: empty memory, read from offset 0",
    )
    seed: int = Field(0, description="weight initialisation seed when no checkpoint")
    version: str | None = Field(
        None,
        description="served model version (default: ckpt-<checkpoint hash> or init-<preset>-s<seed>)",
    )
    initial_capacity: int = Field(1024, ge=1, description="node slots allocated up front (grows by doubling)")
    on_model_change: Literal["refuse", "start_over"] = Field(
        "refuse",
        description="when the newest snapshot was built with another model than `checkpoint`: refuse to "
        "start (say what to do), or move the snapshots aside and start over from the checkpoint",
    )


class ServeConfig(FileSettings):
    """Everything a serving process needs."""

    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", env_prefix="TGNSTREAM_SERVE_", env_nested_delimiter="__"
    )

    model: ModelSource = ModelSource()
    ingest: IngestConfig = IngestConfig()
    grpc: GrpcConfig = GrpcConfig()
    snapshots: SnapshotConfig = SnapshotConfig()
    models: HotSwapConfig = HotSwapConfig()
    health: HealthConfig = HealthConfig()
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(
        9100, ge=0, le=65535, description="HTTP port of /metrics, /livez and /readyz (0: any free port)"
    )
    node_capacity: int = Field(
        0,
        ge=0,
        description="with reader processes: node slots allocated up front in shared memory (0: twice "
        "the nodes known at start, at least 1,024); past it the state doubles, a rare pause readers follow",
    )
    pair_capacity: int = Field(
        0,
        ge=0,
        description="with reader processes: pair-history entries allocated up front (0: as node_capacity)",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's)")
    gil_switch_interval_ms: float = Field(
        0.5,
        gt=0,
        description="Python's thread switch interval (sys.setswitchinterval): how long a gRPC "
        "handler may wait for the GIL while the ingest thread runs Python code (Python's default: 5)",
    )
    ready_file: Path | None = Field(
        None, description="write {grpc_port, metrics_port, pid} here once serving (for scripts and tests)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    stop_grace_s: float = Field(
        8.0,
        ge=2.0,
        description="SIGTERM to exit, whatever the broker does: gRPC drains (at most half of it, "
        "grpc.shutdown_grace_s), ingest stops and the final snapshot is written within it. Keep it "
        "below the orchestrator's grace (Docker 10 s, Kubernetes terminationGracePeriodSeconds 30 s) "
        "and above twice a snapshot's duration",
    )


def load_serve_config(path: str | Path | None) -> ServeConfig:
    """Parse a TOML/JSON config file (or none: defaults) with environment overrides."""
    return load_settings(ServeConfig, path)
