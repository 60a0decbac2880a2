"""One model spec: presets, resolution with overrides, the engine builder, and the checkpoint's
record of spec and preset (old checkpoints without one still load)."""

from __future__ import annotations

import pydantic
import pytest
import torch

from tgnstream.core.checkpoint import checkpoint_spec, load_checkpoint, save_checkpoint
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.spec import (
    DEFAULT_PRESET,
    PRESETS,
    ModelSpec,
    build_engine,
    preset_of,
    resolve_spec,
)

#: `make train` before presets existed (Makefile TRAIN_ARGS "--pair-features
#: --activity-features --sampling-correction --lr 1e-3", cli.py's ModelConfig.preset("tgn",
#: width=100, ...) with OfflineTrainConfig's defaults), written out field by field.
MAKE_TRAIN_SPEC = dict(
    memory_dim=100,
    time_dim=100,
    embedding_dim=100,
    edge_dim=0,
    message="identity",
    message_dim=100,
    aggregator="last",
    updater="gru",
    embedding="attention",
    time_encoding="fixed",
    num_neighbors=10,
    num_heads=2,
    dropout=0.1,
    pair_features=True,
    activity_features=True,
    neighbor_memory_grad=True,
    fold_once=True,
    decoder_hidden=100,
    batch_neighbors=False,
    pres=False,
    pres_gamma=0.9,
    pres_learn_gamma=False,
    state_dtype="bfloat16",
    history_max_age=None,
    history_max_pairs=None,
)


def test_recommended_is_the_make_train_model_field_by_field():
    spec = ModelSpec.preset("recommended")
    assert set(MAKE_TRAIN_SPEC) == set(ModelSpec.model_fields)  # a new field: add it above
    assert spec.model_dump() == MAKE_TRAIN_SPEC
    assert DEFAULT_PRESET == "recommended" and spec.label == "tgn+pair"


def test_tgn_and_jodie_presets_are_the_architectures_they_always_were():
    assert ModelSpec.preset("tgn") == ModelSpec(updater="gru", embedding="attention")
    assert ModelSpec.preset("tgn").model_dump() == {
        **MAKE_TRAIN_SPEC,
        "pair_features": False,
        "activity_features": False,
        "state_dtype": "float32",
    }
    assert ModelSpec.preset("jodie") == ModelSpec(updater="rnn", embedding="time")
    assert ModelSpec.preset("jodie").label == "jodie" and ModelSpec.preset("tgn").label == "tgn"
    assert set(PRESETS) == {"recommended", "tgn", "jodie"}
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelSpec.preset("graphmixer")


def test_model_config_is_the_spec():
    assert ModelConfig is ModelSpec
    assert ModelConfig.preset("tgn", width=16, pair_features=True) == resolve_spec(
        "tgn", memory_dim=16, pair_features=True
    )


def test_resolve_spec_overrides_the_preset():
    spec = resolve_spec("recommended", memory_dim=32, num_neighbors=None)  # None: the preset's
    assert (spec.memory_dim, spec.time_dim, spec.embedding_dim) == (32, 32, 32)  # one width
    assert spec.num_neighbors == 10 and spec.pair_features and spec.activity_features
    assert resolve_spec("recommended", memory_dim=32, time_dim=8).time_dim == 8
    assert resolve_spec("recommended", architecture="jodie") == ModelSpec.preset(
        "jodie", pair_features=True, activity_features=True, state_dtype="bfloat16"
    )
    # Activity features extend the pair statistics: recommended without pair features is tgn
    # (with the recommended storage).
    assert resolve_spec("recommended", pair_features=False) == ModelSpec.preset("tgn", state_dtype="bfloat16")
    with pytest.raises(pydantic.ValidationError, match="divisible by num_heads"):
        resolve_spec("recommended", num_heads=3)


def test_preset_of_names_a_spec_that_is_a_preset():
    assert preset_of(ModelSpec.preset("recommended", edge_dim=172)) == "recommended"
    assert preset_of(ModelSpec.preset("jodie")) == "jodie"
    assert preset_of(ModelSpec.preset("tgn", memory_dim=64)) is None


def test_build_engine_builds_the_spec():
    spec = resolve_spec("recommended", memory_dim=8, num_neighbors=3)
    torch.manual_seed(0)
    engine = build_engine(spec, "cpu", capacity=16)
    torch.manual_seed(0)
    direct = MemoryEngine(spec, 16, "cpu")
    assert isinstance(engine, MemoryEngine) and engine.config == spec and engine.capacity == 16
    for (k, v), (_, w) in zip(engine.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(v, w), k


def test_checkpoint_records_spec_and_preset(tmp_path):
    spec = resolve_spec("recommended", memory_dim=8)
    engine = build_engine(spec, capacity=4)
    path = save_checkpoint(tmp_path / "c.pt", engine, preset="recommended")
    assert checkpoint_spec(path) == (spec, "recommended")
    loaded, _ = load_checkpoint(path)
    assert loaded.config == spec
    # Without a name, the preset the spec equals (if any) is recorded.
    save_checkpoint(tmp_path / "j.pt", build_engine(ModelSpec.preset("jodie")))
    assert checkpoint_spec(tmp_path / "j.pt") == (ModelSpec.preset("jodie"), "jodie")


def test_a_checkpoint_from_before_specs_were_recorded_still_loads(tmp_path):
    """Format 1 before presets: no ``preset`` key, and (older still) no ``time_encoding`` and
    ``fold_once`` in the config: the spec comes from the stored config, the preset from it."""
    path = save_checkpoint(tmp_path / "c.pt", build_engine(ModelSpec.preset("tgn", pair_features=True)))
    payload = torch.load(path, weights_only=False)
    del payload["preset"]
    torch.save(payload, path)
    assert checkpoint_spec(path) == (ModelSpec.preset("tgn", pair_features=True), None)
    recommended = {**payload, "model_config": ModelSpec.preset("recommended").model_dump()}
    torch.save(recommended, tmp_path / "r.pt")
    assert checkpoint_spec(tmp_path / "r.pt")[1] == "recommended"

    for key in ("time_encoding", "fold_once"):
        del payload["model_config"][key]
    torch.save(payload, tmp_path / "older.pt")
    spec, preset = checkpoint_spec(tmp_path / "older.pt")
    assert (spec.time_encoding, spec.fold_once, preset) == ("learned", False, None)
    engine, _ = load_checkpoint(tmp_path / "older.pt")
    assert engine.config == spec
