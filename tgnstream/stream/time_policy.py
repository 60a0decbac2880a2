"""Which decoded events may reach the model, by time: a pure function of the events, their Kafka
record timestamps and the watermark, so a replay of the log makes the same decisions.

Rules, per event in log order, against the *running* watermark (the latest time among the
events already accepted, starting from the engine's watermark):

* ``too_late``: ``ts < running - max_lateness_s`` (when a lateness bound is set);
* ``too_far_ahead``: ``ts > running + max_future_s``: one event in milliseconds, or from a
  broken clock, would otherwise move the watermark years ahead and make every later valid event
  late. Before any event there is no watermark; the decoder's absolute range
  (``ts_out_of_range``) is then the only bound;
* ``too_far_ahead`` too when ``ts`` is more than ``max_ahead_of_record_time_s`` ahead of the
  record's own Kafka timestamp (a wall-clock bound that is part of the log, so replays agree;
  records without a timestamp are not checked).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TimePolicy", "TimeRejection"]


@dataclass(frozen=True)
class TimeRejection:
    index: int  # into the screened arrays
    reason: str  # too_late | too_far_ahead
    detail: str


@dataclass(frozen=True)
class TimePolicy:
    """Bounds in seconds; None disables a rule."""

    max_lateness_s: float | None = None
    max_future_s: float | None = 86_400.0
    max_ahead_of_record_time_s: float | None = None

    def screen(
        self, ts: np.ndarray, record_time_s: np.ndarray, watermark: float
    ) -> tuple[np.ndarray, list[TimeRejection]]:
        """``ts [n]`` float64 event times in log order, ``record_time_s [n]`` the records'
        Kafka timestamps in seconds (negative: none), ``watermark`` the engine's (-inf before
        any event). Returns the indices to apply (increasing) and the rejections."""
        n = ts.shape[0]
        everything = np.arange(n)
        rejected: list[TimeRejection] = []
        ahead = self.max_ahead_of_record_time_s
        keep = np.ones(n, dtype=bool)
        if ahead is not None:
            has_time = record_time_s >= 0
            bad = has_time & (ts > record_time_s + ahead)
            for i in np.flatnonzero(bad).tolist():
                rejected.append(
                    TimeRejection(
                        i,
                        "too_far_ahead",
                        f"ts {ts[i]!r} is more than {ahead} s ahead of its Kafka record time "
                        f"{record_time_s[i]!r}",
                    )
                )
            keep &= ~bad
        if self.max_lateness_s is None and self.max_future_s is None:
            return everything[keep], rejected
        if self._all_within(ts, keep, watermark):
            return everything[keep], rejected
        # Rare: some event breaks a bound, so the running watermark depends on earlier decisions.
        running = watermark
        for i in range(n):
            if not keep[i]:
                continue
            t = float(ts[i])
            reason = self._breaks(t, running)
            if reason is not None:
                keep[i] = False
                rejected.append(TimeRejection(i, reason[0], reason[1]))
            elif t > running:
                running = t
        rejected.sort(key=lambda r: r.index)
        return everything[keep], rejected

    def _all_within(self, ts: np.ndarray, keep: np.ndarray, watermark: float) -> bool:
        """True when no kept event breaks a bound if every kept event is accepted (then the
        running watermark is just the running maximum, and every event really is accepted)."""
        t = ts[keep]
        if t.size == 0:
            return True
        running = np.maximum.accumulate(np.concatenate([[watermark], t]))[:-1]
        known = np.isfinite(running)
        ok = True
        if self.max_future_s is not None:
            ok &= not bool((known & (t > running + self.max_future_s)).any())
        if self.max_lateness_s is not None:
            ok &= not bool((known & (t < running - self.max_lateness_s)).any())
        return ok

    def _breaks(self, t: float, running: float) -> tuple[str, str] | None:
        if running == float("-inf"):
            return None
        if self.max_future_s is not None and t > running + self.max_future_s:
            return (
                "too_far_ahead",
                f"ts {t!r} is more than max_future_s={self.max_future_s} s after the watermark {running!r}",
            )
        if self.max_lateness_s is not None and t < running - self.max_lateness_s:
            return (
                "too_late",
                f"ts {t!r} is more than max_lateness_s={self.max_lateness_s} s before the watermark "
                f"{running!r}",
            )
        return None
