"""The time policy against a naive per-event reference, and the cases that motivated it."""

from __future__ import annotations

import numpy as np
import pytest

from tgnstream.stream.time_policy import TimePolicy


def naive(ts, rec, wm, lateness, future, ahead):
    """One event at a time, straight from the rules in the module docstring."""
    keep, reasons = [], {}
    running = wm
    for i, (t, r) in enumerate(zip(ts.tolist(), rec.tolist())):
        if ahead is not None and r >= 0 and t > r + ahead:
            reasons[i] = "too_far_ahead"
            continue
        if running != float("-inf"):
            if future is not None and t > running + future:
                reasons[i] = "too_far_ahead"
                continue
            if lateness is not None and t < running - lateness:
                reasons[i] = "too_late"
                continue
        keep.append(i)
        running = max(running, t)
    return keep, reasons


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_per_event_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    ts = np.cumsum(rng.exponential(10.0, n)) + rng.normal(0, 30, n)
    spikes = rng.random(n) < 0.1
    ts[spikes] += rng.choice([1e4, 1e6, -1e5], spikes.sum())
    rec = ts + rng.normal(0, 50, n)
    rec[rng.random(n) < 0.2] = -0.001
    wm = float("-inf") if seed % 3 == 0 else float(ts[0] - rng.uniform(-100, 100))
    lateness = None if seed % 4 == 1 else float(rng.uniform(10, 200))
    future = None if seed % 5 == 2 else float(rng.uniform(100, 5000))
    ahead = None if seed % 2 else float(rng.uniform(0, 100))
    policy = TimePolicy(lateness, future, ahead)
    keep, rejected = policy.screen(ts, rec, wm)
    want_keep, want_reasons = naive(ts, rec, wm, lateness, future, ahead)
    assert keep.tolist() == want_keep
    assert {r.index: r.reason for r in rejected} == want_reasons
    assert [r.index for r in rejected] == sorted(want_reasons)


def test_a_millisecond_event_cannot_move_the_watermark():
    ts = np.array([100.0, 100_500.0, 101.0, 102.0])  # the second is 100.5 s written in milliseconds
    keep, rejected = TimePolicy(max_future_s=86_400).screen(ts, np.full(4, -1.0), 99.0)
    assert keep.tolist() == [0, 2, 3]
    assert [(r.index, r.reason) for r in rejected] == [(1, "too_far_ahead")]
    assert "max_future_s" in rejected[0].detail


def test_the_first_event_ever_has_no_relative_bound_but_the_next_ones_do():
    ts = np.array([5e9, 1.0, 5e9 + 10])
    policy = TimePolicy(max_lateness_s=60, max_future_s=60)
    keep, rejected = policy.screen(ts, np.full(3, -1.0), float("-inf"))
    assert keep.tolist() == [0, 2] and [(r.index, r.reason) for r in rejected] == [(1, "too_late")]


def test_record_time_bound_uses_the_kafka_timestamp():
    ts = np.array([1000.0, 1000.0 + 3600, 5000.0])
    rec = np.array([1000.0, 1000.0, -1.0])  # the last record has no timestamp: not checked
    keep, rejected = TimePolicy(max_future_s=None, max_ahead_of_record_time_s=60).screen(ts, rec, 900.0)
    assert keep.tolist() == [0, 2] and [(r.index, r.reason) for r in rejected] == [(1, "too_far_ahead")]
