"""Overload control: RESOURCE_EXHAUSTED quickly, never a hang.

Why not just grpc's ``maximum_concurrent_rpcs``: grpc refuses those calls before any
interceptor runs (so they are missing from ``grpc_server_handled_total``), and it counts every
RPC, so a burst of queries would also refuse Kubernetes health probes. It stays configured as a
far-away backstop (``GrpcConfig.hard_limit_rpcs``).

Design: ``max_inflight`` LinkPrediction calls compute at once; up to ``max_queued`` more wait
for a slot, each at most ``queue_timeout_s`` (capped by the client's deadline); anything beyond
is refused at once. Waiting holds a worker thread, so the config guarantees
``max_inflight + max_queued <= max_workers - 2``: health checks, reflection and the rejections
themselves always find a free thread. Only the services in ``guarded`` are admitted this way.
"""

from __future__ import annotations

import threading

import grpc

from tgnstream.model_server.interceptors import Behaviour, CachingInterceptor, rewrap, split_method

__all__ = ["Admission", "AdmissionInterceptor"]


class Admission:
    """Counting semaphore with a bounded, time-limited wait."""

    def __init__(self, max_inflight: int, max_queued: int, queue_timeout_s: float):
        if max_inflight < 1 or max_queued < 0 or queue_timeout_s <= 0:
            raise ValueError("need max_inflight >= 1, max_queued >= 0, queue_timeout_s > 0")
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._lock = threading.Lock()
        self._queued = 0

    @property
    def queued(self) -> int:
        return self._queued

    def acquire(self, timeout_s: float | None = None) -> bool:
        """Take a slot: at once, or after queueing at most ``min(queue_timeout_s, timeout_s)``.
        False when the queue is full or the wait timed out."""
        if self._slots.acquire(blocking=False):
            return True
        with self._lock:
            if self._queued >= self.max_queued:
                return False
            self._queued += 1
        try:
            wait = self.queue_timeout_s if timeout_s is None else min(self.queue_timeout_s, timeout_s)
            return wait > 0 and self._slots.acquire(timeout=wait)
        finally:
            with self._lock:
                self._queued -= 1

    def release(self) -> None:
        self._slots.release()


class AdmissionInterceptor(CachingInterceptor):
    """Admits calls to ``guarded`` services through ``admission``; others pass untouched."""

    def __init__(self, admission: Admission, guarded: tuple[str, ...]):
        super().__init__()
        self._admission = admission
        self._guarded = frozenset(guarded)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if split_method(method)[0] not in self._guarded:
            return handler
        if handler.response_streaming:
            raise TypeError(f"admission only wraps single-reply methods, not {method}")
        adm = self._admission

        def admitted(inner: Behaviour) -> Behaviour:
            def call(request, context):
                if not adm.acquire(context.time_remaining()):
                    context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"server overloaded ({adm.max_inflight} requests in flight, up to "
                        f"{adm.max_queued} queued); retry with backoff",
                    )
                try:
                    return inner(request, context)
                finally:
                    adm.release()

            return call

        return rewrap(handler, admitted)
