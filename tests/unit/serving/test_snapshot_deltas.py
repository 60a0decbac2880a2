"""Delta snapshots: a chain (full base + deltas) restores exactly the state a full snapshot at
the same point holds, every tensor bit for bit; a delta that does not verify ends its chain at
its parent; the store writes a full base whenever a delta would be wrong or not worth it; old
chains are pruned whole. The reference is always an independent full snapshot (another store,
``save_checkpoint`` of the same engine), never the delta code itself."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from tgnstream.apps.replay import encode_event
from tgnstream.apps.testing import StubFetcher
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep
from tgnstream.ingest.config import IngestConfig
from tgnstream.ingest.loop import IngestLoop
from tgnstream.runtime import snapshot_delta
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.metrics import ServerMetrics
from tgnstream.runtime.snapshots import Changes, SnapshotConfig, SnapshotStore
from tgnstream.stream.prefetch import FetchedBatch
from tgnstream.stream.records import RecordDecoder


class Writer:
    """An engine fed like the server feeds it (register ids, prepare + commit, which folds), and
    the ``Changes`` the ingest loop would accumulate."""

    def __init__(
        self,
        pres: bool = False,
        edge_dim: int = 0,
        capacity: int = 8,
        seed: int = 0,
        dtype: str = "float32",
        **spec,
    ):
        torch.manual_seed(seed)
        config = ModelConfig.preset("tgn", width=8, edge_dim=edge_dim, pres=pres, state_dtype=dtype, **spec)
        self.engine = MemoryEngine(config, capacity).eval()
        if pres:  # learnt statistics, as a trained checkpoint brings them
            g = torch.Generator().manual_seed(1)
            self.engine.pres.count.copy_(torch.randint(0, 5, self.engine.pres.count.shape, generator=g))
            self.engine.pres.mean.normal_(generator=g)
            self.engine.pres.m2.uniform_(generator=g)
        self.changes = Changes()
        self.g = torch.Generator().manual_seed(seed + 7)
        self.t = 0.0

    def run(self, events: int, names: int, batch: int = 25) -> None:
        """``events`` more events among the first ``names`` node names (more names: new ids)."""
        engine = self.engine
        for start in range(0, events, batch):
            b = min(batch, events - start)
            pick = torch.randint(names, (2 * b,), generator=self.g)
            dense, _ = engine.ids.lookup([f"n{i}" for i in pick.tolist()])
            engine.ids.flush()
            engine.ensure_capacity(len(engine.ids) + 1)  # LiveEngine's cold slot
            t = self.t + torch.cumsum(torch.rand(b, generator=self.g, dtype=torch.float64), 0)
            self.t = float(t[-1])
            feats = torch.randn(b, engine.config.edge_dim, generator=self.g)
            events_ = EventBatch(dense[0::2].contiguous(), dense[1::2].contiguous(), t, feats)
            self.changes.add(events_.src, events_.dst)
            step = TemporalStep(engine)
            step.commit_live(step.prepare_live(events_))

    def snapshot(self, store: SnapshotStore, version: str = "v1", delta: bool = True, **kw):
        snap = store.write(
            self.engine,
            version,
            {0: int(self.engine.events_applied)},
            "events",
            changes=self.changes if delta else None,
            **kw,
        )
        self.changes = Changes()
        return snap


def full_state(engine: MemoryEngine, tmp_path, name: str) -> dict[str, torch.Tensor]:
    """The state a full snapshot of ``engine`` holds, written and read by an independent store."""
    snap = SnapshotStore(tmp_path / f"reference-{name}", keep=1).write(engine, "v1", {}, "events")
    return snap.load().state_dict()


def assert_same(got: MemoryEngine, want: dict[str, torch.Tensor]) -> None:
    """Every tensor of the state equal bit for bit: keys, dtype, shape and bytes."""
    have = got.state_dict()
    assert list(have) == list(want)
    for key, w in want.items():
        h = have[key]
        assert h.dtype == w.dtype and h.shape == w.shape, key
        assert h.reshape(-1).view(torch.uint8).equal(w.reshape(-1).view(torch.uint8)), key


@pytest.mark.parametrize("pres,edge_dim,dtype", [(False, 0, "float32"), (True, 3, "bfloat16")])
def test_a_chain_restores_the_full_snapshot_state_bit_for_bit(tmp_path, pres, edge_dim, dtype):
    """Base, then deltas through new ids, capacity doubling and pair-table rehashes (with PRES,
    edge features, 16-bit memory storage): the newest delta and every earlier one restore
    exactly what a full snapshot held at that point."""
    w = Writer(pres=pres, edge_dim=edge_dim, dtype=dtype)
    store = SnapshotStore(tmp_path / "snaps", keep=1, full_every=10, delta_max_fraction=1.0)
    w.run(200, names=30)
    snaps = [w.snapshot(store)]
    wants = [full_state(w.engine, tmp_path, "0")]
    for i, names in enumerate([30, 80, 300, 300, 1500], 1):  # 300 and 1500 names: growth, rehash
        w.run(400, names=names)
        snaps.append(w.snapshot(store))
        wants.append(full_state(w.engine, tmp_path, str(i)))
    assert [s.kind for s in snaps] == ["full"] + ["delta"] * 5
    assert snaps[-1].chain == tuple(s.path for s in snaps[:-1])
    assert w.engine.capacity > 8 and len(w.engine.history) > 1024
    got_snap, got = SnapshotStore(tmp_path / "snaps").restore_latest(topic="events")
    assert got_snap.path == snaps[-1].path and got_snap.next_offsets == {0: 2200}
    assert_same(got, wants[-1])
    for snap, want in zip(snaps, wants):
        assert_same(snap.load(), want)


def test_retention_deltas_carry_its_counters_and_a_snapshot_after_forgetting_is_a_full_base(tmp_path):
    """Pair-history retention forgets pairs no delta lists: a snapshot after any was forgotten
    is a full base; one after sweeps that forgot nothing is a delta and carries the sweep
    counters. Either way the chain restores the full snapshot's state bit for bit."""
    w = Writer(history_max_age=40.0)
    store = SnapshotStore(tmp_path / "snaps", keep=1, full_every=50, delta_max_fraction=1.0)
    kinds, swept_in_delta = [], False
    # Last, two names only: their three pairs recur so often that later sweeps forget nothing.
    for i, (events, names) in enumerate([(300, 60), (4, 3), (300, 200), (120, 2), (30, 2), (30, 2)]):
        forgotten, sweeps = snapshot_delta.pairs_forgotten(w.engine), int(w.engine.history.evicted[2])
        w.run(events, names=names, batch=2 if events < 10 else 10)
        snap = w.snapshot(store)
        kinds.append(snap.kind)
        assert (snap.kind == "full") == (i == 0 or snapshot_delta.pairs_forgotten(w.engine) != forgotten)
        swept_in_delta |= snap.kind == "delta" and int(w.engine.history.evicted[2]) > sweeps
        assert_same(
            SnapshotStore(tmp_path / "snaps").restore_latest()[1], full_state(w.engine, tmp_path, str(i))
        )
    assert swept_in_delta and kinds.count("full") >= 2, kinds
    assert int(w.engine.history.evicted[0]) > 100


def test_a_delta_holds_only_what_changed(tmp_path):
    """A delta after a few events on a handful of nodes is a small fraction of the base."""
    w = Writer()
    store = SnapshotStore(tmp_path, full_every=10, delta_max_fraction=1.0)
    w.run(3000, names=2000)
    base = w.snapshot(store)
    w.run(10, names=5)
    delta = w.snapshot(store)
    m = json.loads((delta.path / "manifest.json").read_text())
    assert m["kind"] == "delta" and m["parent"] == base.path.name and m["depth"] == 1
    assert m["nodes"] <= 5 and m["pairs"] <= 10 and m["new_ids"] <= 5
    base_bytes = (base.path / "state.pt").stat().st_size
    assert (delta.path / "state.pt").stat().st_size < base_bytes / 20
    assert_same(SnapshotStore(tmp_path).restore_latest()[1], full_state(w.engine, tmp_path, "x"))


def _chain(tmp_path, deltas: int = 3):
    w = Writer()
    store = SnapshotStore(tmp_path / "snaps", keep=2, full_every=10, delta_max_fraction=1.0)
    w.run(200, names=40)
    snaps, wants = [w.snapshot(store)], [full_state(w.engine, tmp_path, "0")]
    for i in range(deltas):
        w.run(100, names=60 + 20 * i)
        snaps.append(w.snapshot(store))
        wants.append(full_state(w.engine, tmp_path, str(i + 1)))
    return snaps, wants


def test_a_damaged_delta_ends_the_chain_at_its_parent(tmp_path, caplog):
    snaps, wants = _chain(tmp_path)
    state = snaps[2].path / "state.pt"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        snap, engine = SnapshotStore(tmp_path / "snaps").restore_latest()
    assert snap.path == snaps[1].path and snap.next_offsets == snaps[1].next_offsets
    assert_same(engine, wants[1])
    assert f"snapshot {snaps[2].path} is damaged" in caplog.text
    with pytest.raises(ValueError, match="checksum"):
        snaps[3].load()


def test_an_edited_delta_manifest_leaves_it_and_its_children_out(tmp_path, caplog):
    snaps, wants = _chain(tmp_path)
    manifest = snaps[2].path / "manifest.json"
    m = json.loads(manifest.read_text())
    m["next_offsets"] = {"0": 1}
    manifest.write_text(json.dumps(m))
    store = SnapshotStore(tmp_path / "snaps")
    with caplog.at_level(logging.WARNING):
        assert [s.path for s in store.complete()] == [s.path for s in snaps[:2]]
        snap, engine = store.restore_latest()
    assert snap.path == snaps[1].path
    assert_same(engine, wants[1])
    assert "manifest checksum does not match" in caplog.text
    assert f"its parent {snaps[2].path.name} is missing or does not verify" in caplog.text


def test_a_damaged_base_falls_back_to_the_older_chain(tmp_path, caplog):
    w = Writer()
    store = SnapshotStore(tmp_path / "snaps", keep=2, full_every=1, delta_max_fraction=1.0)
    w.run(200, names=40)
    old_base = w.snapshot(store)
    w.run(100, names=50)
    old_delta = w.snapshot(store)
    want = full_state(w.engine, tmp_path, "old")
    w.run(100, names=60)
    new_base = w.snapshot(store)
    w.run(100, names=70)
    w.snapshot(store)
    assert [old_base.kind, old_delta.kind, new_base.kind] == ["full", "delta", "full"]
    (new_base.path / "state.pt").write_bytes(b"rotten")
    with caplog.at_level(logging.ERROR):
        snap, engine = SnapshotStore(tmp_path / "snaps").restore_latest()
    assert snap.path == old_delta.path
    assert_same(engine, want)
    assert caplog.text.count("is damaged") == 1  # the broken base is tried once, not per delta


def test_full_every_starts_a_new_chain_and_pruning_keeps_whole_chains(tmp_path):
    w = Writer()
    store = SnapshotStore(tmp_path, keep=1, full_every=2, delta_max_fraction=1.0)
    kinds, on_disk = [], []
    for i in range(7):
        w.run(50, names=30 + 5 * i)
        snap = w.snapshot(store)
        kinds.append(snap.kind)
        on_disk.append(sorted(p.name for p in tmp_path.glob("snap-*")))
    assert kinds == ["full", "delta", "delta", "full", "delta", "delta", "full"]
    # keep=1: the previous chain goes only when the next base is durable, never a base that a
    # delta on disk needs.
    assert [len(names) for names in on_disk] == [1, 2, 3, 1, 2, 3, 1]
    assert all(not names[0].endswith("-delta") for names in on_disk)  # the oldest left is a base
    assert_same(SnapshotStore(tmp_path).restore_latest()[1], full_state(w.engine, tmp_path, "x"))


def test_a_delta_touching_most_nodes_is_written_as_a_full_base(tmp_path):
    w = Writer()
    store = SnapshotStore(tmp_path, full_every=10)  # delta_max_fraction 0.5
    w.run(2000, names=100)
    assert w.snapshot(store).kind == "full"
    w.run(10, names=100)
    assert w.snapshot(store).kind == "delta"
    w.run(2000, names=100)  # every node again
    assert w.snapshot(store).kind == "full"


def test_the_store_writes_a_full_base_when_a_delta_would_be_wrong(tmp_path):
    w = Writer()
    store = SnapshotStore(tmp_path, keep=5, full_every=10, delta_max_fraction=1.0)
    w.run(100, names=30)
    assert w.snapshot(store).kind == "full"
    w.run(20, names=30)
    assert w.snapshot(store).kind == "delta"
    w.run(20, names=30)
    assert w.snapshot(store, delta=False).kind == "full"  # the writer does not know what changed
    w.run(20, names=30)
    assert w.snapshot(store, version="v2").kind == "full"  # another model version
    w.run(20, names=30)
    with torch.no_grad():
        next(w.engine.parameters()).add_(1.0)  # weights written in place
    assert w.snapshot(store, version="v2").kind == "full"
    w.run(20, names=30)
    assert w.snapshot(store, version="v2", delta_max_fraction=1e-6).kind == "full"  # too large
    other = Writer(seed=3)
    other.run(20, names=10)
    other.changes = w.changes
    assert other.snapshot(store, version="v2").kind == "full"  # another engine
    w.run(20, names=30)
    assert w.snapshot(store, version="v2").kind == "full"  # the head is another engine's
    w.run(20, names=30)
    assert w.snapshot(store, version="v2").kind == "delta"
    assert_same(SnapshotStore(tmp_path).restore_latest()[1], full_state(w.engine, tmp_path, "x"))


def test_a_head_changed_on_disk_is_not_built_on(tmp_path):
    w = Writer()
    store = SnapshotStore(tmp_path, keep=5, full_every=10, delta_max_fraction=1.0)
    w.run(100, names=30)
    w.snapshot(store)
    w.run(20, names=30)
    head = w.snapshot(store)
    (head.path / "state.pt").write_bytes(b"x")  # e.g. truncated by someone
    w.run(20, names=30)
    assert w.snapshot(store).kind == "full"


def test_changes_compaction_keeps_every_node_and_pair(monkeypatch):
    monkeypatch.setattr(snapshot_delta, "_COMPACT_AT", 16)
    changes = Changes()
    g = torch.Generator().manual_seed(0)
    src, dst = torch.randint(50, (300,), generator=g), torch.randint(50, (300,), generator=g)
    for i in range(0, 300, 7):
        changes.add(src[i : i + 7], dst[i : i + 7])
    assert changes.nodes().tolist() == sorted(set(src.tolist()) | set(dst.tolist()))
    keys = {(min(a, b) << 32) | max(a, b) for a, b in zip(src.tolist(), dst.tolist())}
    assert changes.pairs().tolist() == sorted(keys)
    assert changes.events == 300


def _feed(loop: IngestLoop, values: list[bytes], start: int, end: int) -> None:
    """Records ``values[start:end]`` (partition 0, offsets as their index) to the loop, in chunks."""
    for at in range(start, end, 37):
        k = min(37, end - at)
        loop._handle(
            FetchedBatch(
                values[at : at + k], [None] * k, np.zeros(k, np.int32), np.arange(at, at + k),
                np.full(k, -1), {0: at + k}, {0: len(values)},
            )
        )  # fmt: skip


def _records(n: int, names: int, seed: int) -> list[bytes]:
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(names, (2 * n,), generator=g).tolist()
    return [encode_event(f"u{pick[2 * i]}", f"p{pick[2 * i + 1]}", float(i)) for i in range(n)]


def _ingest_loop(live, records: int, store, cfg: SnapshotConfig, metrics: ServerMetrics) -> IngestLoop:
    """The real ingest loop over ``live``, batches of 20 events, fed by ``_feed``."""
    config = IngestConfig(batch_max_events=20, quality={"enabled": False})
    return IngestLoop(config, live, StubFetcher(records), RecordDecoder(), None, store, cfg, metrics)


def test_the_ingest_loop_writes_a_base_then_deltas_and_a_base_after_a_swap(tmp_path):
    """Through the real ingest path: the first snapshot of a loop is a full base (the state it
    started from may not be the one restored), later ones deltas of the nodes its batches
    touched, and a hot swap starts a new chain; every restore equals a full snapshot."""
    torch.manual_seed(0)
    live = LiveEngine(MemoryEngine(ModelConfig.preset("tgn", width=8), 16).eval(), "v1", {})
    store = SnapshotStore(tmp_path / "snaps", keep=3)
    cfg = SnapshotConfig(dir=tmp_path / "snaps", every_events=10**9, full_every=3, delta_max_fraction=1.0)
    values = _records(1200, 150, seed=1)
    loop = _ingest_loop(live, len(values), store, cfg, ServerMetrics())
    kinds = []
    for part in range(4):
        _feed(loop, values, 300 * part, 300 * (part + 1))
        assert loop.snapshot()
        kinds.append(store.complete()[-1].kind)
    assert kinds == ["full", "delta", "delta", "delta"]
    want = full_state(live.engine, tmp_path, "loop")
    snap, engine = SnapshotStore(tmp_path / "snaps").restore_latest()
    assert snap.next_offsets == dict(live.next_offsets)
    assert_same(engine, want)
    # A hot swap: another engine (here the restored copy) under another version.
    loop.swap_in(engine, "v2")
    values += _records(100, 200, seed=2)
    _feed(loop, values, 1200, 1300)
    assert loop.snapshot()
    assert store.complete()[-1].kind == "full" and store.complete()[-1].model_version == "v2"


def test_the_ingest_loop_counts_what_retention_forgot(tmp_path):
    """Served with a retention rule, the ingest path forgets pairs as the state's rule says and
    counts them in ``tgnstream_pairs_forgotten_total``; the pairs held match a reference
    EdgeHistory fed the same events, one batch of 20 at a time, with the same rule."""
    from tgnstream.core.edge_history import EdgeHistory

    spec = ModelConfig.preset("tgn", width=8, history_max_age=150.0, history_max_pairs=100)
    live = LiveEngine(MemoryEngine(spec, 16).eval(), "v1", {})
    metrics = ServerMetrics()
    # Many pairs (the count rule forgets), then a few recurring ones (the age rule forgets the rest).
    values = _records(600, 120, seed=3) + [
        encode_event(f"u{i % 2}", f"p{i % 3}", 600.0 + i) for i in range(600)
    ]
    loop = _ingest_loop(live, len(values), None, SnapshotConfig(dir=tmp_path / "snaps"), metrics)
    _feed(loop, values, 0, 1200)
    loop._publish_state_metrics(force=True)
    ref = EdgeHistory()
    engine = live.engine
    events = [json.loads(v) for v in values]
    for at in range(0, int(engine.events_applied), 20):  # the applied batches (not the open one)
        batch = events[at : at + 20]
        src, _ = engine.ids.lookup([e["src"] for e in batch], create=False)
        dst, _ = engine.ids.lookup([e["dst"] for e in batch], create=False)
        t = torch.tensor([e["ts"] for e in batch], dtype=torch.float64)
        ref.insert(src, dst, t)
        ref.retain(float(t.max()), 150.0, 100)
    assert ref.evicted.tolist() == engine.history.evicted.tolist()
    assert int(ref.evicted[0]) >= 50 and int(ref.evicted[1]) > 100  # both rules forgot
    assert ref.state_dict()["keys"].equal(engine.history.state_dict()["keys"])
    counted = {
        m.labels["rule"]: m.value
        for m in metrics.pairs_forgotten.collect()[0].samples
        if m.name.endswith("_total")
    }
    assert counted == {"age": float(ref.evicted[0]), "count": float(ref.evicted[1])}
    assert metrics.memory_pairs._value.get() == len(ref)
