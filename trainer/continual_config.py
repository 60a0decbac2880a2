"""Configuration of ``tgnstream trainer`` (continual training): one TOML/JSON file plus
environment overrides ``TGNSTREAM_TRAINER_<SECTION>__<FIELD>`` (they win over the file), e.g.
``TGNSTREAM_TRAINER_STREAM__KAFKA__BOOTSTRAP_SERVERS=kafka:9092``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from tgnstream.core.spec import spec_settings
from tgnstream.runtime.settings import FileSettings, load_settings
from tgnstream.runtime.store_location import StoreLocation
from tgnstream.stream.config import KafkaConfig, StreamConfig

if TYPE_CHECKING:
    from tgnstream.runtime.models import ModelStore

__all__ = ["FineTuneConfig", "GateConfig", "StartModel", "TrainerConfig", "load_trainer_config"]


class StartModel(spec_settings(BaseModel, exclude=("pres", "pres_gamma"))):
    """The weights the trainer starts from when it has no checkpoint of its own and nothing is
    published yet (its node state always starts empty: the state is a function of the topic).
    Without a checkpoint: the model spec ``preset`` (``recommended``) with overrides of its fields
    (``model_spec()``); ``pres`` and ``pres_gamma`` apply to a checkpoint too."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: Path | None = Field(
        None, description="checkpoint.pt of `tgnstream train` (weights, architecture)"
    )
    seed: int = Field(0, description="weight initialisation seed without a checkpoint")
    pres: bool = Field(
        True,
        description="train with PRES (memory-coherence loss; prediction-correction with weight pres_gamma); "
        "turned on for a checkpoint trained without it (its statistics start empty)",
    )
    pres_gamma: float = Field(
        0.0,
        ge=0,
        le=1,
        description="weight of PRES's predicted memory in every memory update (training and serving). 0: "
        "the coherence loss only. Measured (docs/training.md, 'Continual training'): the fusion costs "
        "ranking quality, most in serving, where its statistics drift the memory batch after batch",
    )


class FineTuneConfig(BaseModel):
    """When and how the trainer fine-tunes on its window of recent events."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window_events: int = Field(
        50_000, ge=10, description="recent events kept for fine-tuning (whole stream batches)"
    )
    every_events: int = Field(10_000, ge=1, description="fine-tune after this many new events ...")
    every_seconds: float = Field(300.0, gt=0, description="... or this long after the last round ...")
    min_new_events: int = Field(1_000, ge=1, description="... but never on fewer new events than this")
    holdout_events: int = Field(
        2_000,
        ge=1,
        description="the newest events of the window, held out of training: the promotion gate scores "
        "candidate and published model on them (prequentially, same negatives)",
    )
    epochs: int = Field(1, ge=1, description="passes over the window per round")
    batch_size: int = Field(
        1_000, ge=1, description="training batch (large temporal batches: PRES corrects them)"
    )
    lr: float = Field(1e-3, gt=0)
    pres_beta: float = Field(0.1, ge=0, description="weight of PRES's memory-coherence loss")
    pipeline_depth: int | None = Field(
        1,
        ge=0,
        description="MSPipe: a producer thread prepares batches ahead, memory reads may miss at most "
        "this many write-backs (0 = exact sequential semantics; None = no producer thread)",
    )
    neg_historical_ratio: float = Field(0.5, ge=0, le=1, description="share of historical training negatives")
    sampling_correction: bool = Field(True, description="logQ correction of the training logits")
    seed: int = 0

    @model_validator(mode="after")
    def _sizes(self) -> FineTuneConfig:
        if self.holdout_events >= self.window_events:
            raise ValueError(
                f"holdout_events ({self.holdout_events}) must be smaller than window_events "
                f"({self.window_events}): the rest of the window is what the candidate trains on"
            )
        return self


class GateConfig(BaseModel):
    """The promotion gate: a candidate is published only when it is not worse than the published
    model on the holdout by more than these margins."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_ap_drop: float = Field(0.002, ge=0, description="largest tolerated drop of AP")
    max_mrr_drop: float = Field(0.005, ge=0, description="largest tolerated drop of MRR")
    rank_all_max: int = Field(
        10_000, ge=0, description="rank against every destination up to this many, else sampled candidates"
    )
    sampled_negatives: int = Field(100, ge=1, description="candidates per positive when sampling")
    min_holdout_events: int = Field(
        100,
        ge=1,
        description="a round whose holdout (the window's newest whole batches, at least holdout_events "
        "when the window allows) has fewer events is skipped before training: logged with the reason "
        'and counted as tgnstream_trainer_rounds_total{result="skipped"}; it runs again once more '
        "events arrived",
    )


class PublishConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    dir: StoreLocation = Field(
        Path("runs/models"),
        description="where versions are published (<dir>/<version>/): a directory, or an object-store URL "
        "such as s3://bucket/models (needs tgnstream[s3]; the manifest is uploaded last)",
    )
    keep: int = Field(5, ge=1, description="versions kept")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="with a URL: options of its fsspec filesystem, e.g. {endpoint_url = "
        '"http://minio:9000"} for s3:// (credentials: better from the environment, AWS_ACCESS_KEY_ID ...)',
    )
    cache_dir: Path | None = Field(
        None,
        description="with a URL: local copies of versions (the staged upload, a version loaded at start); "
        "default: a directory under the system's temporary directory",
    )

    def open_store(self) -> ModelStore:
        """The store of ``dir`` with these options."""
        from tgnstream.runtime.models import ModelStore

        return ModelStore(self.dir, self.keep, storage_options=self.storage_options, cache_dir=self.cache_dir)


class TrainerCheckpointConfig(BaseModel):
    """The trainer's own checkpoints (weights, both states, window, optimizer, offsets)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dir: Path = Field(Path("runs/trainer"), description="checkpoint directory")
    every_events: int = Field(20_000, ge=1, description="checkpoint after this many new events ...")
    every_seconds: float = Field(
        60.0, gt=0, description="... or this long after the last (and after every round)"
    )


def _trainer_stream() -> StreamConfig:
    return StreamConfig(kafka=KafkaConfig(group_id="tgnstream-trainer"))


class TrainerConfig(FileSettings):
    """Everything the continual trainer needs. ``stream`` must match the server's ``ingest``
    settings that shape batches (``batch_max_events`` and the bad-input rules), so that a
    published state and a server's catch-up cut the log the same way."""

    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", env_prefix="TGNSTREAM_TRAINER_", env_nested_delimiter="__"
    )

    stream: StreamConfig = Field(default_factory=_trainer_stream)
    start: StartModel = StartModel()
    training: FineTuneConfig = FineTuneConfig()
    gate: GateConfig = GateConfig()
    publish: PublishConfig = PublishConfig()
    checkpoints: TrainerCheckpointConfig = TrainerCheckpointConfig()
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9101, ge=0, le=65535, description="HTTP port of /metrics (0: any free port)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    torch_threads: int | None = Field(None, ge=1)
    status_every_s: float = Field(10.0, gt=0, description="a status line this often")
    progress: bool = Field(True, description="a progress bar while catching up with the topic")
    ready_file: Path | None = Field(None, description="write {metrics_port, pid} here once running")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def load_trainer_config(path: str | Path | None) -> TrainerConfig:
    """Parse a TOML/JSON config file (or none: defaults) with environment overrides."""
    return load_settings(TrainerConfig, path)
