"""Crashes at random moments and a long replay: exactly-once state, no orphans, flat memory."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from .conftest import produce, server_config, stream

pytestmark = pytest.mark.faults


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_sigkill_three_times_applies_every_event_exactly_once_and_leaves_no_orphans(
    broker, servers, tmp_path
):
    """SIGKILL at three random points of a 20,000-event replay: each restart resumes from the
    newest snapshot, the fetch process dies with its server, and the end state has applied
    every event exactly once. (The bit-for-bit comparison with an uninterrupted run is
    tests/integration/serving/test_crash_safety.py, in the default suite.)"""
    n = 20_000
    produce(broker.bootstrap, stream(n))
    config = server_config(tmp_path, broker.bootstrap, snapshots={"every_events": 2000})
    server = servers(config)
    rng = random.Random(7)
    for point in sorted(rng.sample(range(2_000, n - 2_000), 3)):
        server.start()
        server.wait_applied(point)
        children = server.children()
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        for pid in children:  # the fetch process notices its parent is gone and exits
            deadline = time.monotonic() + 15
            while (
                Path(f"/proc/{pid}").exists()
                and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
            ):
                assert time.monotonic() < deadline, f"orphan {pid} outlived its server"
                time.sleep(0.1)
    server.start()
    info = server.wait_offset(n)
    assert info.events_applied == n and dict(info.next_offsets) == {0: n}
    server.signal(signal.SIGTERM)
    assert server.wait_exit(60) == 0


def test_memory_stays_flat_over_a_long_replay(broker, servers, tmp_path):
    """150,000 events over a fixed set of nodes: the server's resident memory after the replay
    is within 64 MiB of what it was 30,000 events in (state does not grow; nothing leaks)."""
    n = 150_000
    produce(broker.bootstrap, stream(n))
    server = servers(server_config(tmp_path, broker.bootstrap, snapshots={"every_events": 20_000})).start()
    server.wait_applied(30_000)
    early = _rss_bytes(server.proc.pid)
    server.wait_applied(n, timeout=300)
    late = _rss_bytes(server.proc.pid)
    assert late - early < 64 * 2**20, (early, late)
