"""Configuration of offline training (typed, frozen; environment overrides ``TGNSTREAM_TRAIN_*``).

The model is a :class:`~tgnstream.core.spec.ModelSpec` preset (``recommended`` by default) with
optional overrides of its fields, generated from the spec (``spec_settings``); the training
settings' defaults are the recommended recipe's (``make train``: lr 1e-3, sampling correction),
so a run with no settings trains the recommended model. ``tgnstream train``'s flags are
generated from these fields."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tgnstream.core.spec import spec_settings

__all__ = ["OfflineTrainConfig"]


class OfflineTrainConfig(spec_settings(BaseSettings, exclude=("edge_dim",))):
    """Everything an offline run needs: the model (``preset`` + spec overrides; ``edge_dim`` is
    the data's) and how it is trained. ``model_spec(edge_dim=...)`` is the model."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", env_prefix="TGNSTREAM_TRAIN_")

    data: Path = Field(description="dataset file (JODIE .csv or whitespace edge list)")
    out: Path = Field(description="output directory for checkpoint.pt and results.json")
    model: Literal["tgn", "jodie"] | None = Field(
        None,
        description="architecture over the preset: tgn (temporal graph attention, GRU updater) or jodie "
        "(time projection embedding, RNN updater); unset: the preset's (recommended: tgn)",
    )
    epochs: int = Field(50, ge=1, description="maximum epochs")
    patience: int = Field(5, ge=1, description="early stopping: epochs without improvement")
    batch_size: int = Field(200, ge=1, description="events per training batch")
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
    lr: float = Field(
        1e-3, gt=0, description="Adam learning rate (the recommended recipe's, chosen by validation MRR)"
    )
    seed: int = Field(0, description="seed of weight initialisation and negative sampling")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    val_frac: float = Field(
        0.15, gt=0, lt=0.5, description="share of the stream for validation (after training)"
    )
    test_frac: float = Field(0.15, gt=0, lt=0.5, description="share of the stream for test (the last events)")
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
        True,
        description="subtract log(q/p) from the training logits, q the negatives' sampling distribution, p "
        "uniform over the candidate pool (the logQ correction of sampled softmax): historical and "
        "recent negatives then stop pushing past partners and active nodes below unseen ones (a "
        "training setting: the loss changes, not the function the model computes; exactly zero "
        "with uniform negatives, the default without pair features)",
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
    pres_beta: float = Field(0.1, ge=0, description="weight of PRES's memory-coherence loss (with pres)")
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
    progress: bool = Field(True, description="progress bars")

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
        return "mrr" if self.model_spec().pair_features else "ap"

    @property
    def historical_ratio(self) -> float:
        if self.neg_historical_ratio is not None:
            return self.neg_historical_ratio
        return 0.5 if self.model_spec().pair_features else 0.0
