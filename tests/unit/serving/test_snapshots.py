"""Snapshot store: atomic manifests, checksum verification, fallback, pruning, round trip."""

from __future__ import annotations

import errno
import hashlib
import json
import logging

import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep
from tgnstream.runtime import durable, snapshots
from tgnstream.runtime.snapshots import SNAPSHOT_FORMAT, SnapshotStore


def _engine(events: int) -> MemoryEngine:
    torch.manual_seed(0)
    engine = MemoryEngine(ModelConfig(memory_dim=8, time_dim=4, embedding_dim=8, num_neighbors=3), capacity=4)
    g = torch.Generator().manual_seed(3)
    names = [f"n{i}" for i in range(40)]
    for start in range(0, events, 10):
        idx = torch.randint(40, (20,), generator=g)
        dense, _ = engine.ids.lookup([names[i] for i in idx.tolist()])
        t = torch.arange(start, start + 10, dtype=torch.float64)
        TemporalStep(engine).apply(
            EventBatch(dense[0::2].contiguous(), dense[1::2].contiguous(), t, torch.zeros(10, 0))
        )
    return engine.eval()


def test_round_trip_restores_state_offsets_and_version(tmp_path):
    store = SnapshotStore(tmp_path, keep=2)
    engine = _engine(50)
    snap = store.write(engine, "v7", {0: 50, 1: 3}, "events")
    got_snap, got = store.restore_latest()
    got.eval()
    assert got_snap.path == snap.path
    assert (got_snap.model_version, got_snap.next_offsets, got_snap.events_applied) == (
        "v7",
        {0: 50, 1: 3},
        50,
    )
    for (k, a), (_, b) in zip(engine.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), k
    assert got.ids.lookup(["n3"], create=False)[0].item() == engine.ids.lookup(["n3"], create=False)[0].item()
    t = torch.full((5,), 60.0, dtype=torch.float64)
    torch.testing.assert_close(
        got.score(torch.arange(5), torch.arange(5, 10), t),
        engine.score(torch.arange(5), torch.arange(5, 10), t),
        rtol=0,
        atol=0,
    )


def test_incomplete_and_corrupt_snapshots_are_never_loaded(tmp_path):
    store = SnapshotStore(tmp_path, keep=5)
    store.write(_engine(30), "v1", {0: 30}, "events")
    newer = store.write(_engine(40), "v1", {0: 40}, "events")
    # A crash before the manifest rename leaves a directory without manifest: ignored.
    (tmp_path / "snap-000000000090-1").mkdir()
    (tmp_path / "snap-000000000090-1" / "state.pt").write_bytes(b"partial")
    assert store.restore_latest()[0].events_applied == 40
    # Bit rot in the newest state: its checksum fails, the previous snapshot is used.
    data = bytearray((newer.path / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newer.path / "state.pt").write_bytes(bytes(data))
    snap, engine = store.restore_latest()
    assert snap.events_applied == 30 and int(engine.events_applied) == 30


def test_prune_keeps_the_newest_complete_ones_and_drops_leftovers(tmp_path):
    store = SnapshotStore(tmp_path, keep=2)
    (tmp_path / "snap-000000000001-1").mkdir()  # crash leftover
    for n in (10, 20, 30):
        store.write(_engine(n), "v", {0: n}, "events")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and [s.events_applied for s in store.complete()] == [20, 30]
    manifest = json.loads((store.complete()[-1].path / "manifest.json").read_text())
    assert manifest["next_offsets"] == {"0": 30} and len(manifest["state_sha256"]) == 64


def test_restore_from_empty_directory_is_none(tmp_path):
    assert SnapshotStore(tmp_path / "new").restore_latest() is None


def _rewrite_manifest(path, edit) -> None:
    """Rewrite ``path``'s manifest by hand: ``edit`` changes the parsed dict in place; the
    checksums are left as they were."""
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))


def test_manifest_checksum_is_sha256_of_canonical_json_of_the_other_fields(tmp_path):
    snap = SnapshotStore(tmp_path).write(_engine(20), "v1", {1: 7, 0: 20}, "events")
    manifest = json.loads((snap.path / "manifest.json").read_text())
    assert manifest["format"] == SNAPSHOT_FORMAT == 2
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert manifest["manifest_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert set(body) == {
        "format",
        "model_version",
        "topic",
        "topic_id",
        "next_offsets",
        "events_applied",
        "created_at",
        "state_sha256",
    }


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(next_offsets={"0": 41}),
        lambda m: m["next_offsets"].update({"1": 5}),
        lambda m: m.update(events_applied=45),
        lambda m: m.update(topic="other"),
        lambda m: m.update(model_version="v2"),
        lambda m: m.pop("manifest_sha256"),
    ],
    ids=["next_offsets", "extra_partition", "events_applied", "topic", "model_version", "no_checksum"],
)
def test_an_edited_manifest_is_ignored_and_the_older_snapshot_restored(tmp_path, caplog, edit):
    store = SnapshotStore(tmp_path, keep=2)
    older = store.write(_engine(30), "v1", {0: 30}, "events")
    newer = store.write(_engine(40), "v1", {0: 40}, "events")
    _rewrite_manifest(newer.path, edit)
    with caplog.at_level(logging.WARNING, logger="tgnstream.runtime.snapshots"):
        snap, engine = store.restore_latest()
    assert snap.path == older.path and snap.next_offsets == {0: 30} and int(engine.events_applied) == 30
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(newer.path) in warnings[0] and "edited or damaged" in warnings[0]
    # Ignored, never trusted: complete() leaves it out, Snapshot.load refuses it, and the warning
    # is not repeated after every later write.
    assert [s.path for s in store.complete()] == [older.path]
    with pytest.raises(ValueError, match="edited or damaged"):
        newer.load()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tgnstream.runtime.snapshots"):
        store.write(_engine(50), "v1", {0: 50}, "events")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [s.events_applied for s in store.complete()] == [30, 50]


def test_a_format_1_manifest_still_restores_with_a_warning(tmp_path, caplog):
    store = SnapshotStore(tmp_path)
    snap = store.write(_engine(30), "v1", {0: 30, 1: 2}, "events")

    def to_format_1(m):  # as the previous version wrote it, and hand-made without a topic
        m.update(format=1)
        del m["manifest_sha256"], m["topic"]

    _rewrite_manifest(snap.path, to_format_1)
    with caplog.at_level(logging.WARNING, logger="tgnstream.runtime.snapshots"):
        got, engine = store.restore_latest(topic="events")  # no topic recorded: counts as matching
    assert (got.path, got.next_offsets, got.events_applied, got.topic) == (snap.path, {0: 30, 1: 2}, 30, "")
    assert int(engine.events_applied) == 30
    assert any(str(snap.path) in r.getMessage() and "not protected" in r.getMessage() for r in caplog.records)


def test_an_unsupported_format_is_ignored_with_a_warning(tmp_path, caplog):
    store = SnapshotStore(tmp_path, keep=1)
    snap = store.write(_engine(30), "v1", {0: 30}, "events")
    _rewrite_manifest(snap.path, lambda m: m.update(format=3))
    with caplog.at_level(logging.WARNING, logger="tgnstream.runtime.snapshots"):
        assert store.restore_latest() is None
    assert any(str(snap.path) in r.getMessage() and "unsupported" in r.getMessage() for r in caplog.records)
    # Not this writer's crash leftover (e.g. written by a newer version): prune leaves it alone.
    store.write(_engine(40), "v1", {0: 40}, "events")
    assert snap.path.is_dir()


def test_restore_skips_snapshots_of_another_topic(tmp_path, caplog):
    store = SnapshotStore(tmp_path, keep=5)
    store.write(_engine(30), "v1", {0: 30}, "a")
    newest_a = store.write(_engine(40), "v1", {0: 40}, "a")
    b = store.write(_engine(50), "v1", {0: 50}, "b")
    with caplog.at_level(logging.WARNING, logger="tgnstream.runtime.snapshots"):
        snap, engine = store.restore_latest(topic="a")
    assert snap.path == newest_a.path and snap.topic == "a" and int(engine.events_applied) == 40
    message = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(b.path) in message and "'b'" in message and "'a'" in message
    assert store.restore_latest(topic="b")[0].path == b.path
    assert store.restore_latest()[0].path == b.path  # no topic given: the newest of any


def test_restore_with_only_other_topics_is_none(tmp_path):
    store = SnapshotStore(tmp_path)
    store.write(_engine(30), "v1", {0: 30}, "b")
    assert store.restore_latest(topic="a") is None
    assert store.restore_latest(topic="b") is not None


def test_prune_keeps_the_newest_of_each_topic(tmp_path):
    store = SnapshotStore(tmp_path, keep=1)
    store.write(_engine(10), "v", {0: 10}, "a")
    store.write(_engine(20), "v", {0: 20}, "b")
    store.write(_engine(30), "v", {0: 30}, "a")
    assert [(s.topic, s.events_applied) for s in store.complete()] == [("b", 20), ("a", 30)]
    store.write(_engine(40), "v", {0: 40}, "b")
    assert [(s.topic, s.events_applied) for s in store.complete()] == [("a", 30), ("b", 40)]
    assert len(list(tmp_path.glob("snap-*"))) == 2


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _partial_state_then_disk_full(path, *args, **kwargs):
    path.write_bytes(b"half a checkpoint")
    _disk_full()


@pytest.mark.parametrize(
    "target, failure",
    [
        ("save_checkpoint", _partial_state_then_disk_full),
        ("os.fsync", _disk_full),  # in save_checkpoint or on the manifest temp file
        ("fsync_dir", _disk_full),  # the manifest is already in place by then
    ],
)
def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, target, failure):
    store = SnapshotStore(tmp_path, keep=3)
    kept = store.write(_engine(10), "v1", {0: 10}, "events")
    with monkeypatch.context() as m:
        if target == "os.fsync":
            m.setattr(durable.os, "fsync", failure)
        elif target == "fsync_dir":
            m.setattr(durable, target, failure)
        else:
            m.setattr(snapshots, target, failure)
        with pytest.raises(OSError) as info:
            store.write(_engine(20), "v1", {0: 20}, "events")
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.glob("snap-*")] == [kept.path.name]
    assert store.restore_latest()[0].path == kept.path
    later = store.write(_engine(30), "v1", {0: 30}, "events")
    assert [s.path for s in store.complete()] == [kept.path, later.path]
    assert store.restore_latest()[0].path == later.path


def test_a_failed_cleanup_does_not_mask_the_write_error(tmp_path, monkeypatch, caplog):
    store = SnapshotStore(tmp_path)
    monkeypatch.setattr(snapshots, "save_checkpoint", _partial_state_then_disk_full)

    def rmtree_fails(path, ignore_errors=False):
        if not ignore_errors:
            raise PermissionError(errno.EACCES, "read-only", str(path))

    monkeypatch.setattr(snapshots.shutil, "rmtree", rmtree_fails)
    with caplog.at_level(logging.WARNING, logger="tgnstream.runtime.snapshots"):
        with pytest.raises(OSError) as info:
            store.write(_engine(20), "v1", {0: 20}, "events")
    assert info.value.errno == errno.ENOSPC
    (left,) = tmp_path.glob("snap-*")
    assert any(str(left) in r.getMessage() for r in caplog.records)
    assert store.complete() == []  # no manifest: incomplete, never loaded
    monkeypatch.undo()
    store.prune()
    assert list(tmp_path.glob("snap-*")) == []
