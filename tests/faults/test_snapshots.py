"""Snapshots that fail loudly and cheaply, and restores that trust only what they should."""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest

from tgnstream.runtime.snapshots import SnapshotStore

from .conftest import produce, server_config, stream, wait_for

pytestmark = pytest.mark.faults


def test_full_disk_backs_off_logs_once_cleans_up_and_fails_the_exit_code(broker, servers, tmp_path):
    """Snapshots cannot be written (files are capped at 256 KiB, like a full disk): ingest goes
    on, attempts back off exponentially, the log has one line for the streak and no
    traceback, no half-written directory is left, snapshot age counts from the first change no
    snapshot holds, and
    SIGTERM exits 1 because the final snapshot failed. (Before: ~10 tries/s, a traceback each,
    a directory per try, age 0, exit 0.)"""
    produce(broker.bootstrap, stream(5000))
    config = server_config(tmp_path, broker.bootstrap, snapshots={"every_events": 500})
    server = servers(config).start(file_size_limit=256 * 1024)
    started = time.monotonic()
    server.wait_offset(5000)
    time.sleep(max(0.0, 8.0 - (time.monotonic() - started)))
    errors = server.metric("tgnstream_snapshots_total", result="error")
    assert 2 <= errors <= 6, errors  # 1 s, 2 s, 4 s ... apart
    assert server.metric("tgnstream_snapshots_total", result="ok") == 0
    assert server.metric("tgnstream_snapshot_age_seconds") >= 5.0
    log = server.log()
    assert log.count("snapshot failed") == 1 and "Traceback" not in log
    assert "File too large" in log
    assert not list((tmp_path / "snapshots").glob("snap-*"))
    assert server.info().events_applied == 5000
    server.signal(signal.SIGTERM)
    assert server.wait_exit(60) == 1
    assert "final snapshot failed" in server.log()


def _two_snapshots(broker, servers, tmp_path):
    """A server that wrote snapshots at 2000 and 4000 events, then stopped (4000 is the final)."""
    produce(broker.bootstrap, stream(4000))
    config = server_config(tmp_path, broker.bootstrap, snapshots={"every_events": 2000})
    server = servers(config).start()
    server.wait_offset(4000)
    server.signal(signal.SIGTERM)
    assert server.wait_exit(60) == 0
    snaps = SnapshotStore(tmp_path / "snapshots").complete()
    assert [s.events_applied for s in snaps][-2:] == [2000, 4000]
    return server, snaps


def test_an_edited_manifest_offset_is_refused_and_the_older_snapshot_used(broker, servers, tmp_path):
    """Someone edits next_offsets in the newest manifest: its checksum no longer matches, the
    server says so and restores the older snapshot, and ends with every event applied exactly
    once. (Before: the edited offset was trusted and events were re-applied.)"""
    server, snaps = _two_snapshots(broker, servers, tmp_path)
    manifest = snaps[-1].path / "manifest.json"
    m = json.loads(manifest.read_text())
    m["next_offsets"] = {"0": 1000}
    manifest.write_text(json.dumps(m))
    server.start()
    info = server.wait_offset(4000)
    assert info.events_applied == 4000
    assert "manifest checksum does not match" in server.log()


def test_a_snapshot_of_another_topic_is_skipped_not_fatal(broker, servers, tmp_path):
    """The newest snapshot in the directory belongs to another topic: the server falls back to
    this topic's newest snapshot with a warning. (Before: it refused to start.)"""
    server, snaps = _two_snapshots(broker, servers, tmp_path)
    store = SnapshotStore(tmp_path / "snapshots", keep=5)
    other = snaps[-1].load()
    store.write(other, "v-other", {0: 9999}, "another-topic")
    server.start()
    assert server.wait_offset(4000).events_applied == 4000
    assert "is of topic 'another-topic', not 'events'" in server.log()


def test_a_damaged_state_file_falls_back_to_the_older_snapshot(broker, servers, tmp_path):
    """The newest state.pt is truncated: its checksum fails, the older snapshot is restored and
    the events after it are re-read from Kafka: the end state holds every event once."""
    server, snaps = _two_snapshots(broker, servers, tmp_path)
    state = snaps[-1].path / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    server.start()
    assert server.wait_offset(4000).events_applied == 4000
    assert "is damaged" in server.log()


def test_leftovers_of_a_crashed_write_are_ignored_and_removed(broker, servers, tmp_path):
    """A directory without a manifest (a write cut by a crash) is never loaded and is removed
    by the next successful snapshot."""
    server, snaps = _two_snapshots(broker, servers, tmp_path)
    crashed = tmp_path / "snapshots" / "snap-000000009999-1"
    shutil.copytree(snaps[-1].path, crashed)
    (crashed / "manifest.json").unlink()
    server.start()
    assert server.wait_offset(4000).events_applied == 4000
    produce(broker.bootstrap, stream(2000, start_ts=4000.0, offset=4000))
    server.wait_offset(6000)
    wait_for(lambda: not crashed.exists(), 30, "the crashed write's directory removed")
