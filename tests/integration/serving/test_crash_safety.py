"""Exactly-once state: SIGKILL the server at random moments; the end state equals an
uninterrupted run's and every event is applied exactly once."""

from __future__ import annotations

import random

import pytest
import torch

from tgnstream.runtime.snapshots import SnapshotStore

from .conftest import event_values, produce, reference_engine, serve_config

pytestmark = pytest.mark.kafka

EVENTS = 50_000
BATCH = 500


def test_sigkill_three_times_then_state_equals_uninterrupted_run(
    kafka_bootstrap, kafka_topic, wikipedia_csv, tmp_path, server_factory
):
    produce(kafka_bootstrap, kafka_topic, event_values(wikipedia_csv, EVENTS))
    config = serve_config(tmp_path, kafka_bootstrap, kafka_topic)
    server = server_factory(config)
    rng = random.Random(20261122)
    kill_points = sorted(rng.sample(range(2_000, EVENTS - 2_000), 3))
    seen_after_restart = []
    for point in kill_points:
        server.start()
        seen_after_restart.append(server.info().events_applied)
        server.wait_applied(point)
        server.kill()
    server.start()
    restored_from = server.info().events_applied
    final = server.wait_applied(EVENTS)
    assert final.events_applied == EVENTS, "an event was applied twice"
    assert dict(final.next_offsets) == {0: EVENTS}
    assert server.terminate() == 0
    # The restarts resumed from snapshots, not from scratch (except possibly the first).
    assert max(seen_after_restart[1:] + [restored_from]) > 0

    snap, served = SnapshotStore(tmp_path / "snapshots").restore_latest()
    assert snap.events_applied == EVENTS and snap.next_offsets == {0: EVENTS}
    reference = reference_engine(wikipedia_csv, EVENTS, BATCH)
    assert_same_state(served, reference)


def assert_same_state(served, reference) -> None:
    """Every buffer and weight equal; per-node buffers compared over the nodes in use (the two
    engines may have grown their capacity at different moments)."""
    n = len(reference.ids)
    assert len(served.ids) == n
    got, want = served.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for key in want:
        a, b = got[key], want[key]
        if a.dim() and a.shape[0] in (served.capacity,) and b.shape[0] == reference.capacity:
            a, b = a[:n], b[:n]
        if b.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=key)
        else:
            assert torch.equal(a, b), key
