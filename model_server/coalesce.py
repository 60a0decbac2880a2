"""Request coalescing: concurrent queries answered by one batched engine call.

A Score of 1 pair costs about as much as a Score of 4 (the engine's cost is per-op overhead,
~100 small tensor ops), so under load the server combines concurrent requests ("flat
combining", leader/follower): a request that finds nobody computing becomes the *leader*,
takes every queued request (up to ``max_batch`` units), computes them in one call, hands each
its result, and promotes the next queued request (if any) to leader. Followers just wait. At
low load a request is alone and pays nothing extra; there is no timer and no added delay.

The batch function decides what may share a call (e.g. only queries at the same time).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

Q = TypeVar("Q")
R = TypeVar("R")


class _Job(Generic[Q, R]):
    __slots__ = ("item", "size", "wake", "done", "result")

    def __init__(self, item: Q, size: int):
        self.item = item
        self.size = size
        self.wake = threading.Event()
        self.done = False
        self.result: R | BaseException | None = None


class Coalescer(Generic[Q, R]):
    """``submit(item)`` returns ``run([.., item, ..])``'s entry for ``item`` (raising it if it
    is an exception).

    Args:
        run: computes a batch; returns one result or exception per item, in order. It should
            not raise (an exception it raises is given to every item of the batch).
        max_batch: most units per batch (a single larger item still runs, alone).
        size: units of one item (e.g. pairs of a Score request); default 1.
    """

    def __init__(
        self,
        run: Callable[[list[Q]], Sequence[R | BaseException]],
        max_batch: int,
        size: Callable[[Q], int] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._run = run
        self._max = max_batch
        self._size = size or (lambda _item: 1)
        self._lock = threading.Lock()
        self._queue: list[_Job[Q, R]] = []
        self._busy = False
        self.batches = 0  # batches run (tests, metrics)
        self.items = 0  # items answered

    def submit(self, item: Q) -> R:
        job: _Job[Q, R] = _Job(item, self._size(item))
        with self._lock:
            self._queue.append(job)
            lead = not self._busy
            self._busy = True
        if not lead:
            job.wake.wait()  # woken with a result, or promoted to leader
        if not job.done:
            self._lead()
        if isinstance(job.result, BaseException):
            raise job.result
        return job.result  # type: ignore[return-value]

    def _take(self) -> list[_Job[Q, R]]:
        """The queue's head, up to ``max_batch`` units (at least one job). Under ``_lock``."""
        total, n = 0, 0
        for job in self._queue:
            if n and total + job.size > self._max:
                break
            total += job.size
            n += 1
        batch, self._queue = self._queue[:n], self._queue[n:]
        return batch

    def _lead(self) -> None:
        with self._lock:
            batch = self._take()  # the leader is the queue's head, so it is in its own batch
        try:
            results = list(self._run([j.item for j in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # never leave followers waiting
            results = [exc] * len(batch)
        for job, res in zip(batch, results):
            job.result, job.done = res, True
            job.wake.set()
        with self._lock:
            self.batches += 1
            self.items += len(batch)
            if self._queue:
                self._queue[0].wake.set()  # not done: it leads the next batch
            else:
                self._busy = False
