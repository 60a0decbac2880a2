"""A reader process: answers gRPC from the writer's state in shared memory.

Started by the serving process (``tgnstream.apps.serve``) once per ``grpc.readers``, with the
``torch.multiprocessing`` spawn method. Every reader binds the same port with SO_REUSEPORT, so
the kernel spreads connections over them; each has its own interpreter (no lock shared with
ingest or with the other readers), its own admission control, auth and health service, and
sends its metrics to the serving process every ``metrics_interval_s`` (exported there with a
``reader`` label). It stops when the serving process asks (or dies).
"""

from __future__ import annotations

import logging
import os
import time

import torch
from grpc_health.v1 import health_pb2

from tgnstream.model_server.config import GrpcConfig
from tgnstream.model_server.grpc_server import SERVICE_NAME, build_server, stop_server
from tgnstream.model_server.servicer import LinkPredictionServicer
from tgnstream.runtime.metrics import ServerMetrics, reader_families
from tgnstream.runtime.shared_state import Layout, SharedHandles, SharedLiveView

__all__ = ["run_reader"]

log = logging.getLogger(__name__)


def run_reader(
    index: int,
    handles: SharedHandles,
    layout: Layout,
    layout_queue,
    metrics_queue,
    config: GrpcConfig,
    port: int,
    torch_threads: int,
    parent_pid: int,
    log_level: str = "INFO",
    metrics_interval_s: float = 1.0,
) -> None:
    """Process entry point (spawned): serve until the writer sets ``stopping`` or exits."""
    fmt = f"%(asctime)s reader-{index} %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=log_level, format=fmt)
    torch.set_num_threads(torch_threads)
    view = SharedLiveView(handles, layout, layout_queue)
    metrics = ServerMetrics()
    cfg = config.model_copy(update={"port": port})
    servicer = LinkPredictionServicer(view, cfg, metrics=metrics)
    server, health, bound = build_server(view, cfg, metrics, servicer=servicer, reuse_port=True)
    health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    metrics_queue.put((index, "bound"))
    log.info("reader %d (pid %d) answering on port %d", index, os.getpid(), bound)
    status = health_pb2.HealthCheckResponse
    was_ready = None
    next_metrics = 0.0
    counted = [0] * 6  # retries, fallbacks, cache builds, copies, candidates computed, reused
    try:
        while not view.stopping and os.getppid() == parent_pid:
            ready = (view.ready, view.restoring)
            if ready != was_ready:
                health.set(SERVICE_NAME, status.SERVING if ready[0] else status.NOT_SERVING)
                # Liveness too: a process that is still restoring answers no query (UNAVAILABLE).
                health.set("", status.NOT_SERVING if ready[1] else status.SERVING)
                was_ready = ready
            now = time.monotonic()
            if now >= next_metrics:
                cache = servicer.cache
                now_counts = [
                    view.retries,
                    view.fallbacks,
                    cache.builds,
                    cache.shared_hits,
                    cache.computed,
                    cache.reused,
                ]
                metrics.reader_retries.inc(now_counts[0] - counted[0])
                metrics.reader_fallbacks.inc(now_counts[1] - counted[1])
                metrics.topk_cache_entries.labels("computed").inc(now_counts[2] - counted[2])
                metrics.topk_cache_entries.labels("shared").inc(now_counts[3] - counted[3])
                metrics.topk_candidates_embedded.labels("computed").inc(now_counts[4] - counted[4])
                metrics.topk_candidates_embedded.labels("reused").inc(now_counts[5] - counted[5])
                counted = now_counts
                metrics_queue.put((index, reader_families(metrics.registry)))
                next_metrics = now + metrics_interval_s
            time.sleep(0.05)
    finally:
        stop_server(server, health, cfg.shutdown_grace_s)
        metrics_queue.put((index, reader_families(metrics.registry)))
        log.info("reader %d stopped", index)
