"""The ingest writer grows the state ahead of its writes: a flood of new ids and pairs makes
node buffers and the pair table reallocate many times, never while the write lock is held (the
copies hold nobody; only the pair table's adoption takes a short write section), and the
state is the one an offline replay of the same batches gives."""

from __future__ import annotations

import torch

from tgnstream.apps.replay import encode_event
from tgnstream.apps.testing import StubFetcher, feed_in_chunks
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep
from tgnstream.ingest.config import IngestConfig
from tgnstream.ingest.loop import IngestLoop
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.metrics import ServerMetrics
from tgnstream.runtime.snapshots import SnapshotConfig
from tgnstream.stream.records import RecordDecoder


def test_a_flood_of_new_ids_grows_the_state_outside_the_write_lock(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = ModelConfig.preset("tgn", width=8)
    engine = MemoryEngine(config, 16).eval()
    reference = MemoryEngine(config, 16).eval()
    reference.model.load_state_dict(engine.model.state_dict())
    live = LiveEngine(engine, "v", {})
    lock = live._lock
    grown_under_lock, grown_free, adopted_under_lock = [], [], []

    def watch(module, method, log_free=None, log_locked=None):
        original = getattr(type(module), method)

        def wrapper(self, *args, **kwargs):
            if self is module:
                (log_locked if lock._writer else log_free).append(method)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(type(module), method, wrapper)

    watch(engine.memory, "grow", grown_free, grown_under_lock)
    watch(engine.neighbors, "grow", grown_free, grown_under_lock)
    watch(engine.history, "rehashed", grown_free, grown_under_lock)
    watch(engine.history, "adopt", [], adopted_under_lock)

    # 3,000 events, every one between two ids never seen before: ~6,000 nodes and 3,000 pairs.
    values = [encode_event(f"u{i}", f"p{i}", float(i)) for i in range(3000)]
    loop = IngestLoop(
        IngestConfig(batch_max_events=100, quality={"enabled": False}),
        live,
        StubFetcher(len(values)),
        RecordDecoder(),
        None,
        None,
        SnapshotConfig(dir=tmp_path),
        ServerMetrics(),
    )
    feed_in_chunks(loop, values)
    assert engine.capacity >= 6000 and len(engine.history) >= 2900
    assert grown_under_lock == [] and grown_free.count("grow") >= 2 * 5 and "rehashed" in grown_free
    assert len(adopted_under_lock) >= 1  # the pair table's new slots are adopted in a write section

    # The same batches applied offline, ids in order of first appearance.
    names = {}
    for i in range(int(engine.events_applied)):
        names.setdefault(f"u{i}", len(names))
        names.setdefault(f"p{i}", len(names))
    reference.ensure_capacity(len(names) + 1)
    for start in range(0, int(engine.events_applied), 100):
        idx = range(start, start + 100)
        src = torch.tensor([names[f"u{i}"] for i in idx])
        dst = torch.tensor([names[f"p{i}"] for i in idx])
        t = torch.tensor([float(i) for i in idx], dtype=torch.float64)
        step = TemporalStep(reference)
        step.commit_live(step.prepare_live(EventBatch(src, dst, t, torch.zeros(100, 0))))
    n = len(names)
    assert torch.equal(engine.memory.memory[:n], reference.memory.memory[:n])
    assert torch.equal(engine.neighbors.ids[:n], reference.neighbors.ids[:n])
    want, got = reference.history.state_dict(), engine.history.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in ("keys", "counts", "last_t", "size"))
