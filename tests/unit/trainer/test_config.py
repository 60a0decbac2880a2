"""Offline training config: environment overrides, validation, derived defaults."""

from __future__ import annotations

import pydantic
import pytest

from tgnstream.trainer.config import OfflineTrainConfig


def test_environment_overrides_defaults_and_explicit_values_win(monkeypatch, tmp_path):
    monkeypatch.setenv("TGNSTREAM_TRAIN_EPOCHS", "7")
    monkeypatch.setenv("TGNSTREAM_TRAIN_PAIR_FEATURES", "true")
    cfg = OfflineTrainConfig(data=tmp_path / "d.csv", out=tmp_path)
    assert cfg.epochs == 7 and cfg.pair_features is True
    assert cfg.selection_metric == "mrr" and cfg.historical_ratio == 0.5
    assert OfflineTrainConfig(data=tmp_path / "d.csv", out=tmp_path, epochs=3).epochs == 3


def test_invalid_values_are_rejected_with_the_field_name(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="batch_size"):
        OfflineTrainConfig(data=tmp_path / "d.csv", out=tmp_path, batch_size=0)
    cfg = OfflineTrainConfig(data=tmp_path / "d.csv", out=tmp_path)
    with pytest.raises(pydantic.ValidationError):
        cfg.epochs = 3  # frozen


def test_negative_shares_that_exceed_one_are_refused_when_the_config_is_parsed(tmp_path):
    with pytest.raises(ValueError, match="exceed 1"):
        OfflineTrainConfig(
            data=tmp_path / "d.csv",
            out=tmp_path,
            pair_features=True,
            neg_historical_ratio=0.7,
            neg_recent_ratio=0.4,
        )
    assert (
        OfflineTrainConfig(data=tmp_path / "d.csv", out=tmp_path, neg_recent_ratio=0.4).neg_recent_ratio
        == 0.4
    )
