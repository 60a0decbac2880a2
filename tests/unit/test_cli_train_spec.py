"""``tgnstream train``'s flags are generated from the model spec and the training config; with no
flags it trains the recommended preset with the recommended recipe (what `make train` ran with
its flags); every config embeds the spec (preset + overrides)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tgnstream.apps import cli
from tgnstream.core.spec import ModelSpec
from tgnstream.trainer.config import OfflineTrainConfig

ROOT = Path(__file__).resolve().parents[2]

#: The flags of `tgnstream train --help` before they were generated (none may be lost).
FLAGS_BEFORE = {
    "--activity-features", "--batch-neighbors", "--batch-size", "--data", "--device", "--epochs",
    "--eval-batch-size", "--limit", "--log-level", "--lr", "--memory-dim", "--model",
    "--neg-historical-ratio", "--neg-recent-ratio", "--negatives", "--no-fold-once",
    "--no-pipeline-mitigation", "--no-progress", "--out", "--pair-features", "--patience",
    "--pipeline-depth", "--pipeline-eager-fetch", "--pipeline-mitigation", "--pres", "--pres-beta",
    "--pres-gamma", "--pres-learn-gamma", "--ranking-weight", "--sampling-correction", "--seed",
    "--threads", "--time-encoding", "--val-candidates", "--verbose", "-v", "--help", "-h",
}  # fmt: skip
#: Makefile TRAIN_ARGS before presets.
MAKE_TRAIN_ARGS = ["--pair-features", "--activity-features", "--sampling-correction", "--lr", "1e-3"]


def _train_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser(["train"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _config(*flags: str) -> OfflineTrainConfig:
    args = cli.build_parser(["train"]).parse_args(["train", "--data", "d.csv", "--out", "o", *flags])
    del args.verbose  # as main() does
    return cli._train_config(args)


def test_every_spec_and_training_field_has_a_flag_and_no_flag_was_lost():
    flags = {s for a in _train_parser()._actions for s in a.option_strings}
    assert FLAGS_BEFORE <= flags, FLAGS_BEFORE - flags
    for name in (*ModelSpec.model_fields, *OfflineTrainConfig.model_fields):
        if name != "edge_dim":  # the data's
            assert "--" + name.replace("_", "-") in flags, name
    assert "--edge-dim" not in flags and "--preset" in flags
    for name in ModelSpec.model_fields:
        if isinstance(ModelSpec.model_fields[name].default, bool):
            assert f"--no-{name.replace('_', '-')}" in flags, name


def test_no_flags_is_the_recommended_preset_and_recipe(monkeypatch):
    for var in [v for v in __import__("os").environ if v.startswith("TGNSTREAM_TRAIN_")]:
        monkeypatch.delenv(var)
    cfg = _config()
    assert cfg.preset == "recommended"
    assert cfg.model_spec(edge_dim=0) == ModelSpec.preset("recommended")
    assert (cfg.lr, cfg.sampling_correction, cfg.historical_ratio, cfg.selection_metric) == (
        1e-3,
        True,
        0.5,
        "mrr",
    )
    # `make train`'s old flags give the same model and the same training settings.
    old = _config(*MAKE_TRAIN_ARGS)
    assert old.model_spec(edge_dim=0) == cfg.model_spec(edge_dim=0)
    settings = {k for k in OfflineTrainConfig.model_fields if k not in ModelSpec.model_fields}
    assert {k: getattr(old, k) for k in settings} == {k: getattr(cfg, k) for k in settings}


def test_flags_override_the_preset_and_keep_their_meaning(monkeypatch):
    for var in [v for v in __import__("os").environ if v.startswith("TGNSTREAM_TRAIN_")]:
        monkeypatch.delenv(var)
    assert _config("--preset", "tgn").model_spec() == ModelSpec.preset("tgn")
    assert _config("--model", "jodie").model_spec() == ModelSpec.preset(
        "jodie", pair_features=True, activity_features=True, state_dtype="bfloat16"
    )
    spec = _config("--memory-dim", "32", "--no-pair-features", "--no-fold-once").model_spec()
    # --memory-dim: one width; the recommended storage stays
    assert spec == ModelSpec.preset("tgn", width=32, fold_once=False, state_dtype="bfloat16")
    cfg = _config("--no-pipeline-mitigation", "--pipeline-depth", "1", "--no-progress")
    assert (cfg.pipeline_mitigation, cfg.pipeline_depth, cfg.progress) == (None, 1, False)
    assert _config("--pipeline-mitigation", "0.5").pipeline_mitigation == 0.5
    assert _config().pipeline_mitigation == 0.9


def test_the_environment_still_sets_what_no_flag_does(monkeypatch):
    monkeypatch.setenv("TGNSTREAM_TRAIN_PAIR_FEATURES", "false")
    monkeypatch.setenv("TGNSTREAM_TRAIN_PRESET", "recommended")
    assert _config().model_spec() == ModelSpec.preset("tgn", state_dtype="bfloat16")
    assert _config("--pair-features").model_spec() == ModelSpec.preset("recommended")  # flag wins


def test_an_invalid_spec_is_a_usage_error(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("u,i,ts,label\n1,2,0,0\n")
    rc = cli.main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--num-heads", "3"])
    assert rc == cli.EXIT_USAGE


def test_the_service_configs_embed_the_spec(monkeypatch):
    from tgnstream.apps.serve_config import ModelSource, load_serve_config
    from tgnstream.trainer.continual_config import StartModel, load_trainer_config

    # The deploy files' keys mean what they meant: the trainer starts from the recommended model,
    # a server without a checkpoint from TGN with pair features.
    trainer = load_trainer_config(ROOT / "deploy" / "trainer.toml")
    assert trainer.start.model_spec() == ModelSpec.preset("recommended") == StartModel().model_spec()
    assert trainer.start.pres and trainer.start.pres_gamma == 0.0
    serve = load_serve_config(ROOT / "deploy" / "serve.toml")
    assert serve.model.model_spec() == ModelSpec.preset("tgn", pair_features=True)
    assert ModelSource().model_spec() == ModelSpec.preset("tgn")  # the default before
    assert ModelSource(memory_dim=16).model_spec() == ModelSpec.preset("tgn", width=16)
    # Every spec field is a setting now (activity_features was missing from the server's).
    monkeypatch.setenv("TGNSTREAM_SERVE_MODEL__PRESET", "recommended")
    monkeypatch.setenv("TGNSTREAM_SERVE_MODEL__NUM_NEIGHBORS", "5")
    serve = load_serve_config(ROOT / "deploy" / "serve.toml")
    assert serve.model.model_spec() == ModelSpec.preset("recommended", num_neighbors=5)
    monkeypatch.setenv("TGNSTREAM_TRAINER_START__MEMORY_DIM", "16")
    assert load_trainer_config(ROOT / "deploy" / "trainer.toml").start.model_spec().embedding_dim == 16
    with pytest.raises(ValueError, match="divisible by num_heads"):
        StartModel(num_heads=3)
