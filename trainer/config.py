"""Configuration of offline training (typed, frozen; environment overrides ``TGNSTREAM_TRAIN_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["OfflineTrainConfig"]


class OfflineTrainConfig(BaseSettings):
    """Everything an offline run needs besides the model architecture."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", env_prefix="TGNSTREAM_TRAIN_")

    data: Path = Field(description="dataset file (JODIE .csv or whitespace edge list)")
    out: Path = Field(description="output directory for checkpoint.pt and results.json")
    model: Literal["tgn", "jodie"] = "tgn"
    pair_features: bool = False
    activity_features: bool = Field(
        False, description="see ModelConfig.activity_features (needs pair_features)"
    )
    fold_once: bool = Field(True, description="see ModelConfig.fold_once")
    time_encoding: Literal["fixed", "learned"] = Field("fixed", description="see ModelConfig.time_encoding")
    epochs: int = Field(50, ge=1, description="maximum epochs")
    patience: int = Field(5, ge=1, description="early stopping: epochs without improvement")
    batch_size: int = Field(200, ge=1)
    eval_batch_size: int = Field(
        200,
        ge=1,
        description="batch size of validation and test (part of the protocol, fixed so that runs "
        "with different training batches are compared on the same evaluation)",
    )
    val_candidates: int | None = Field(
        None,
        ge=1,
        description="validation (early stopping) ranks each positive against this many sampled "
        "candidates, half from the source's recent partners, half uniform, instead of the test's "
        "full candidate pool: far cheaper per epoch on a large pool; the test protocol is unchanged "
        "(default: the test's protocol)",
    )
    lr: float = Field(1e-4, gt=0)
    seed: int = 0
    device: str = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    val_frac: float = Field(0.15, gt=0, lt=0.5)
    test_frac: float = Field(0.15, gt=0, lt=0.5)
    limit: int | None = Field(None, ge=1, description="use only the first N events")
    select_metric: Literal["auto", "ap", "mrr"] = Field(
        "auto", description="validation metric for early stopping (auto: mrr with pair features, else ap)"
    )
    neg_historical_ratio: float | None = Field(
        None,
        ge=0,
        le=1,
        description="share of training negatives drawn from the source's recent neighbours "
        "(default 0.5 with pair features, else 0)",
    )
    neg_recent_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of training negatives drawn from the destinations of the batch's earlier "
        "events: nodes active a moment ago but not this source's partner (what teaches the model "
        "not to rank every recently active node first)",
    )
    sampling_correction: bool = Field(
        False,
        description="subtract log(q/p) from the training logits, q the negatives' sampling distribution, p "
        "uniform over the candidate pool (the logQ correction of sampled softmax): historical and "
        "recent negatives then stop pushing past partners and active nodes below unseen ones",
    )
    negatives: int = Field(
        1,
        ge=1,
        description="negative destinations per training event (historical share: neg_historical_ratio)",
    )
    ranking_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the listwise loss term: softmax cross-entropy of each positive among its "
        "negatives (with negatives > 1; MRR is a ranking metric, BCE scores pairs one by one)",
    )
    batch_neighbors: bool = Field(False, description="see ModelConfig.batch_neighbors")
    pres: bool = Field(
        False, description="PRES prediction-correction + memory coherence (see ModelConfig.pres)"
    )
    pres_gamma: float = Field(0.9, ge=0, le=1, description="PRES fusion weight of the prediction")
    pres_beta: float = Field(0.1, ge=0, description="weight of PRES's memory-coherence loss")
    pres_learn_gamma: bool = Field(False, description="learn the PRES fusion weight")
    pipeline_depth: int | None = Field(
        None,
        ge=0,
        description="None: sequential step; K: a producer thread prepares batches ahead and memory "
        "reads may miss at most K write-backs (0 = exact sequential semantics)",
    )
    pipeline_mitigation: float | None = Field(
        0.9, ge=0, le=1, description="lambda of MSPipe's staleness mitigation (None: off)"
    )
    pipeline_eager_fetch: bool = Field(
        False, description="fetch memory as early as the bound allows (worst-case staleness; ablation)"
    )
    progress: bool = True

    @model_validator(mode="after")
    def _negative_shares(self) -> OfflineTrainConfig:
        if self.historical_ratio + self.neg_recent_ratio > 1.0:
            raise ValueError(
                f"historical ({self.historical_ratio}) + recent ({self.neg_recent_ratio}) negative shares "
                "exceed 1"
            )
        return self

    @property
    def selection_metric(self) -> str:
        if self.select_metric != "auto":
            return self.select_metric
        return "mrr" if self.pair_features else "ap"

    @property
    def historical_ratio(self) -> float:
        if self.neg_historical_ratio is not None:
            return self.neg_historical_ratio
        return 0.5 if self.pair_features else 0.0
