"""Ingest counters give one result per record (late events are not counted again as applied),
and snapshot age is 0 while the newest snapshot holds the whole state (an idle topic), growing
only while applied changes wait for one."""

from __future__ import annotations

import time

import torch

from tgnstream.apps.replay import encode_event
from tgnstream.apps.testing import StubFetcher, feed_in_chunks
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.ingest.config import IngestConfig
from tgnstream.ingest.loop import IngestLoop
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.metrics import DLQ_REASONS, ServerMetrics
from tgnstream.runtime.snapshots import SnapshotConfig, SnapshotStore
from tgnstream.stream.records import RecordDecoder


def _loop(tmp_path, total: int, metrics: ServerMetrics, store: SnapshotStore | None = None) -> IngestLoop:
    torch.manual_seed(0)
    live = LiveEngine(MemoryEngine(ModelConfig.preset("tgn", width=8), 16).eval(), "v", {})
    config = IngestConfig(batch_max_events=10, quality={"enabled": False})
    return IngestLoop(
        config, live, StubFetcher(total), RecordDecoder(), None, store, SnapshotConfig(dir=tmp_path), metrics
    )


def _value(metrics: ServerMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_each_record_counts_once(tmp_path):
    # 30 records: batch 2 holds 3 events older than batch 1's newest (late, applied clamped).
    times = (
        [float(i) for i in range(10)]
        + [20.0 + i for i in range(7)]
        + [5.0, 6.0, 7.0]
        + [30.0 + i for i in range(10)]
    )
    values = [encode_event(f"u{i % 4}", f"p{i % 3}", t) for i, t in enumerate(times)]
    metrics = ServerMetrics()
    loop = _loop(tmp_path, len(values), metrics)
    feed_in_chunks(loop, values)
    applied = _value(metrics, "tgnstream_ingest_events_total", result="applied")
    late = _value(metrics, "tgnstream_ingest_events_total", result="late_clamped")
    assert (applied, late) == (27, 3)
    assert int(loop.live.engine.events_applied) == applied + late == 30


def test_every_dead_letter_reason_is_exported_at_zero():
    metrics = ServerMetrics()
    for reason in DLQ_REASONS:
        assert metrics.registry.get_sample_value("tgnstream_ingest_dlq_total", {"reason": reason}) == 0.0


def test_snapshot_age_is_zero_when_the_snapshot_holds_the_state(tmp_path):
    metrics = ServerMetrics()
    store = SnapshotStore(tmp_path)
    loop = _loop(tmp_path, 20, metrics, store)
    feed_in_chunks(loop, [encode_event("a", "b", float(i)) for i in range(20)])
    time.sleep(0.3)
    loop._update_lag(None)
    assert _value(metrics, "tgnstream_snapshot_age_seconds") >= 0.3  # applied, not yet snapshotted
    assert loop.snapshot()
    time.sleep(0.3)
    loop._update_lag(None)  # idle: nothing changed since the snapshot
    assert _value(metrics, "tgnstream_snapshot_age_seconds") == 0.0
