"""Published versions: round trip of weights + state + offsets + gate, monotone names, pruning,
refusal of damaged or edited versions with fallback, no leftovers from a failed write."""

from __future__ import annotations

import errno
import json
import logging

import pytest
import torch

from tgnstream.apps.testing import small_engine
from tgnstream.runtime import models
from tgnstream.runtime.models import ModelStore

_engine = small_engine


def test_round_trip_of_weights_state_offsets_and_gate(tmp_path):
    store = ModelStore(tmp_path)
    engine = _engine(40, seed=1)
    gate = {"decision": "published", "candidate": {"ap": 0.9}, "published": {"ap": 0.8}}
    first = store.publish(engine, {0: 40, 1: 2}, "events", "tid", parent=None, gate=gate)
    second = store.publish(_engine(50, seed=2), {0: 50, 1: 2}, "events", "tid", parent=first.version)
    assert (first.version, second.version) == ("v000001", "v000002")
    got = store.get("v000001")
    assert (got.next_offsets, got.events_applied, got.topic, got.topic_id, got.gate, got.parent) == (
        {0: 40, 1: 2},
        40,
        "events",
        "tid",
        gate,
        None,
    )
    assert store.latest().parent == "v000001"
    loaded = got.load().eval()
    for (k, a), (_, b) in zip(engine.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    t = torch.full((4,), 60.0, dtype=torch.float64)
    assert torch.equal(
        loaded.score(torch.arange(4), torch.arange(4, 8), t),
        engine.score(torch.arange(4), torch.arange(4, 8), t),
    )
    assert json.loads((got.path / "config.json").read_text()) == engine.config.model_dump(mode="json")
    with pytest.raises(KeyError):
        store.get("v000009")


def test_names_are_monotone_and_only_the_newest_are_kept(tmp_path):
    store = ModelStore(tmp_path, keep=2)
    for i in range(4):
        store.publish(_engine(10), {0: 10 * (i + 1)}, "events")
    assert [v.version for v in store.versions()] == ["v000003", "v000004"]
    (tmp_path / "v000005").mkdir()  # an interrupted write: its name is never reused
    assert store.publish(_engine(10), {0: 60}, "events").version == "v000006"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000004", "v000006"]  # v000005 pruned


def test_a_damaged_version_is_refused_and_the_previous_one_loads(tmp_path, caplog):
    store = ModelStore(tmp_path)
    good = store.publish(_engine(20), {0: 20}, "events")
    bad = store.publish(_engine(30), {0: 30}, "events")
    state = bad.path / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        store.get(bad.version).load()
    with caplog.at_level(logging.ERROR, logger="tgnstream.runtime.models"):
        published, engine = store.load_latest()
    assert published.version == good.version and int(engine.events_applied) == 20
    assert any("damaged" in r.getMessage() for r in caplog.records)


def test_an_edited_manifest_is_ignored(tmp_path, caplog):
    store = ModelStore(tmp_path)
    good = store.publish(_engine(20), {0: 20}, "events")
    edited = store.publish(_engine(30), {0: 30}, "events")
    m = json.loads((edited.path / "manifest.json").read_text())
    m["next_offsets"] = {"0": 10}  # would replay events the state already holds
    (edited.path / "manifest.json").write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING, logger="tgnstream.runtime.models"):
        assert store.latest().version == good.version
    assert any("checksum" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="checksum"):
        store.get(edited.version)


def test_a_failed_write_leaves_no_version(tmp_path, monkeypatch):
    store = ModelStore(tmp_path)
    kept = store.publish(_engine(10), {0: 10}, "events")

    def disk_full(path, *args, **kwargs):
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models, "save_checkpoint", disk_full)
    with pytest.raises(OSError):
        store.publish(_engine(20), {0: 20}, "events")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [kept.version]
    assert store.latest().version == kept.version
