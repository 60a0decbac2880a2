"""Which model a server serves, and why: a configured checkpoint that differs from the one the
snapshots were built with is refused with what to do (or, when asked, the snapshots are moved
aside and the checkpoint served); settings that contradict the checkpoint are an error; a file
that is not a checkpoint is named; fresh random weights come with a warning."""

from __future__ import annotations

import logging

import pytest
import torch

from tgnstream.apps.serve import ServingProcess, checkpoint_version, initial_engine
from tgnstream.apps.serve_config import ModelSource, ServeConfig
from tgnstream.core.checkpoint import save_checkpoint
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.runtime.snapshots import SnapshotStore


def _checkpoint(path, seed: int):
    torch.manual_seed(seed)
    save_checkpoint(path, MemoryEngine(ModelConfig.preset("tgn", width=16, pair_features=True), 8))
    return path


def _config(tmp_path, **model) -> ServeConfig:
    return ServeConfig(
        model=model,
        ingest={"dlq_enabled": False, "kafka": {"bootstrap_servers": "127.0.0.1:1"}},
        grpc={"port": 0, "readers": 0},
        snapshots={"dir": tmp_path / "snapshots"},
        metrics_port=0,
    )


def _serving(cfg: ServeConfig) -> ServingProcess:
    proc = ServingProcess(cfg)  # not started: no Kafka needed
    proc.http.stop()
    return proc


def test_a_snapshot_of_another_model_is_refused_or_set_aside(tmp_path):
    old = _checkpoint(tmp_path / "old.pt", 1)
    new = _checkpoint(tmp_path / "new.pt", 2)
    engine, version = initial_engine(ModelSource(checkpoint=old), torch.device("cpu"))
    SnapshotStore(tmp_path / "snapshots").write(engine, version, {0: 0}, "events")
    # The same checkpoint: the snapshot is restored.
    assert _serving(_config(tmp_path, checkpoint=old)).live.model_version == version
    with pytest.raises(ValueError, match='on_model_change = "start_over"') as info:
        _serving(_config(tmp_path, checkpoint=new))
    assert str(new) in str(info.value) and version in str(info.value)
    proc = _serving(_config(tmp_path, checkpoint=new, on_model_change="start_over"))
    assert proc.live.model_version == checkpoint_version(ModelSource(checkpoint=new))
    assert SnapshotStore(tmp_path / "snapshots").complete() == []
    (aside,) = (tmp_path / "snapshots").glob("superseded-*")
    assert len(list(aside.glob("snap-*"))) == 1


def test_settings_that_contradict_the_checkpoint_are_an_error(tmp_path):
    ckpt = _checkpoint(tmp_path / "c.pt", 1)
    with pytest.raises(ValueError, match=r"memory_dim = 100 \(the checkpoint has 16\)"):
        initial_engine(ModelSource(checkpoint=ckpt, memory_dim=100), torch.device("cpu"))
    with pytest.raises(ValueError, match="pair_features = False"):
        initial_engine(ModelSource(checkpoint=ckpt, pair_features=False), torch.device("cpu"))
    # Settings that agree, or are left at their defaults, are fine.
    initial_engine(ModelSource(checkpoint=ckpt, memory_dim=16, preset="tgn"), torch.device("cpu"))
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(ValueError, match="is not a tgnstream checkpoint"):
        initial_engine(ModelSource(checkpoint=not_a_checkpoint), torch.device("cpu"))
    with pytest.raises(ValueError, match="no such file"):
        initial_engine(ModelSource(checkpoint=tmp_path / "missing.pt"), torch.device("cpu"))


def test_fresh_weights_are_served_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tgnstream.apps.serve"):
        proc = _serving(_config(tmp_path))
    assert proc.live.model_version == "init-tgn-s0"
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "FRESH RANDOM WEIGHTS" in r.getMessage()
    ]
    assert warnings and "make train" in warnings[0].getMessage()
