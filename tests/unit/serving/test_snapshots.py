"""Snapshot store: atomic manifests, checksum verification, fallback, pruning, round trip."""

from __future__ import annotations

import json

import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.snapshots import SnapshotStore


def _engine(events: int) -> MemoryEngine:
    torch.manual_seed(0)
    engine = MemoryEngine(ModelConfig(memory_dim=8, time_dim=4, embedding_dim=8, num_neighbors=3), capacity=4)
    g = torch.Generator().manual_seed(3)
    names = [f"n{i}" for i in range(40)]
    for start in range(0, events, 10):
        idx = torch.randint(40, (20,), generator=g)
        dense, _ = engine.ids.lookup([names[i] for i in idx.tolist()])
        t = torch.arange(start, start + 10, dtype=torch.float64)
        engine.apply_events(
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
