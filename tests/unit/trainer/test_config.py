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


def test_the_deploy_trainer_config_parses_and_env_wins(monkeypatch):
    from pathlib import Path

    from tgnstream.trainer.continual_config import load_trainer_config

    path = Path(__file__).resolve().parents[3] / "deploy" / "trainer.toml"
    cfg = load_trainer_config(path)
    assert cfg.stream.batch_max_events == 1000 and cfg.training.pipeline_depth == 1 and cfg.start.pres
    monkeypatch.setenv("TGNSTREAM_TRAINER_STREAM__KAFKA__TOPIC", "other")
    monkeypatch.setenv("TGNSTREAM_TRAINER_TRAINING__EPOCHS", "3")
    cfg = load_trainer_config(path)
    assert cfg.stream.kafka.topic == "other" and cfg.training.epochs == 3


def test_trainer_config_errors_are_clear(tmp_path):
    import pytest

    from tgnstream.trainer.continual_config import FineTuneConfig, load_trainer_config

    bad = tmp_path / "t.toml"
    bad.write_text("[training\n")
    with pytest.raises(ValueError, match=str(bad)):
        load_trainer_config(bad)
    with pytest.raises(ValueError, match="holdout_events"):
        FineTuneConfig(window_events=100, holdout_events=100)
