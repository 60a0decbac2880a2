"""Reader processes of a serving process: spawned, supervised, stopped (composition level).

``ReaderPool`` moves the live engine's state into shared memory (``StateBoard``), reserves the
gRPC port, spawns ``grpc.readers`` processes running ``tgnstream.model_server.reader`` on it
(SO_REUSEPORT), restarts one that dies (with backoff), forwards their metrics into the serving
process's ``/metrics`` (``reader`` label) and their count into readiness (``readers_down`` while
none runs).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time

import torch.multiprocessing as tmp

from tgnstream.model_server.config import GrpcConfig
from tgnstream.model_server.reader import run_reader
from tgnstream.runtime.health import Readiness
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.metrics import ReaderMetrics, ServerMetrics
from tgnstream.runtime.shared_state import StateBoard

__all__ = ["ReaderPool", "reserve_port"]

log = logging.getLogger(__name__)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with SO_REUSEPORT: it fixes the port (an
    OS-picked one when ``port`` is 0) that the readers then bind too. Raises RuntimeError when a
    server already answers there (readers must not silently share a port with a stale one)."""
    if port:
        probe = "127.0.0.1" if host in ("0.0.0.0", "", "[::]", "::") else host.strip("[]")
        try:
            with socket.create_connection((probe, port), timeout=0.5):
                pass
        except OSError:
            pass
        else:
            raise RuntimeError(f"cannot serve gRPC on {host}:{port}: another server already answers there")
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot bind gRPC server to {host}:{port}: {exc}") from exc
    return sock


class ReaderPool:
    """``count`` reader processes answering gRPC from ``live``'s state (see module docstring).

    After construction ``live.board`` is set: every write section of the ingest loop is then
    published to the readers. ``port``: the port they share.
    """

    def __init__(
        self,
        live: LiveEngine,
        config: GrpcConfig,
        count: int,
        metrics: ServerMetrics,
        readiness: Readiness | None = None,
        collector: ReaderMetrics | None = None,
        open_capacity: int = 1024,
        node_capacity: int = 0,
        pair_capacity: int = 0,
        torch_threads: int = 1,
        log_level: str = "INFO",
        restart_initial_s: float = 0.5,
        restart_max_s: float = 30.0,
    ):
        if count < 1:
            raise ValueError(f"a reader pool needs at least one reader, got {count}")
        self.live, self.config, self.count = live, config, count
        self.metrics, self.readiness = metrics, readiness
        self.torch_threads, self.log_level = torch_threads, log_level
        self._restart = (restart_initial_s, restart_max_s)
        self._ctx = tmp.get_context("spawn")
        with live.write():
            self.board = StateBoard(
                live.engine, live.model_version, open_capacity, self._ctx, node_capacity, pair_capacity
            )
            live.board = self.board
        self._reservation = reserve_port(config.host, config.port)
        self.port = self._reservation.getsockname()[1]
        self.collector = collector if collector is not None else ReaderMetrics(metrics.registry)
        self._metrics_queue = self._ctx.Queue()
        self._procs: list = [None] * count
        self._layout_queues: list = [None] * count
        self._bound: set[int] = set()
        self._bound_cond = threading.Condition()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._drain_metrics, name="reader-metrics", daemon=True),
            threading.Thread(target=self._supervise, name="reader-supervisor", daemon=True),
        ]

    # ------------------------------------------------------------------------------ processes
    def _spawn(self, index: int) -> None:
        if self._layout_queues[index] is not None:
            self.board.drop_reader_queue(self._layout_queues[index])
        layout_queue = self.board.new_reader_queue()
        # The queue exists before the layout is read, so a reallocation in between reaches the
        # reader by queue; no write section needed (it would invalidate every reader's query).
        layout = self.board.layout
        proc = self._ctx.Process(
            target=run_reader,
            args=(
                index,
                self.board.handles,
                layout,
                layout_queue,
                self._metrics_queue,
                self.config,
                self.port,
                self.torch_threads,
                os.getpid(),
                self.log_level,
            ),
            name=f"tgnstream-reader-{index}",
            daemon=True,
        )
        proc.start()
        self._procs[index], self._layout_queues[index] = proc, layout_queue

    def start(self, timeout_s: float = 120.0) -> None:
        """Spawn every reader and wait until each has bound the port."""
        for i in range(self.count):
            self._spawn(i)
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + timeout_s
        with self._bound_cond:
            while len(self._bound) < self.count:
                dead = [i for i, p in enumerate(self._procs) if p.exitcode is not None]
                if dead:
                    code = self._procs[dead[0]].exitcode
                    raise RuntimeError(f"reader process {dead[0]} exited with code {code}")
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = self.count - len(self._bound)
                    raise RuntimeError(f"{missing} reader(s) did not start in {timeout_s:g} s")
                self._bound_cond.wait(min(left, 0.5))
        self.metrics.readers_alive.set(self.count)
        log.info("%d reader processes answer gRPC on port %d", self.count, self.port)

    def _drain_metrics(self) -> None:
        while True:
            try:
                index, payload = self._metrics_queue.get(timeout=0.5)
            except queue.Empty:
                if self._stopping.is_set() and not any(p is not None and p.is_alive() for p in self._procs):
                    return
                continue
            except (EOFError, OSError):
                return
            if payload == "bound":
                with self._bound_cond:
                    self._bound.add(index)
                    self._bound_cond.notify_all()
            else:
                self.collector.update(index, payload)

    def _supervise(self) -> None:
        initial, most = self._restart
        delay = [initial] * self.count
        restart_at = [0.0] * self.count
        while not self._stopping.wait(0.25):
            alive = 0
            for i, proc in enumerate(self._procs):
                if proc is not None and proc.is_alive():
                    alive += 1
                    continue
                now = time.monotonic()
                if restart_at[i] == 0.0:
                    code = proc.exitcode
                    log.error("reader %d died (exit code %s); restarting in %.1f s", i, code, delay[i])
                    restart_at[i] = now + delay[i]
                elif now >= restart_at[i]:
                    self.metrics.reader_restarts.inc()
                    with self._bound_cond:
                        self._bound.discard(i)
                    self._spawn(i)
                    restart_at[i] = 0.0
                    delay[i] = min(2 * delay[i], most)
            self.metrics.readers_alive.set(alive)
            if self.readiness is not None:
                self.readiness.set("readers_down", None if alive else "no reader process is running")

    def set_ready(self, ready: bool) -> None:
        self.board.set_ready(ready)

    def begin_stop(self) -> None:
        """Ask every reader to drain and stop (health NOT_SERVING, in-flight RPCs finish); returns
        at once, so the drain overlaps the writer's final snapshot."""
        self._stopping.set()
        self.board.request_stop()

    def stop(self, grace_s: float, deadline: float | None = None) -> None:
        """Ask every reader to drain and stop; waits ``grace_s`` (+ a margin), or until
        ``deadline`` (``time.monotonic()``) when that comes first, then kills."""
        self.begin_stop()
        deadline = min(time.monotonic() + grace_s + 10, float("inf") if deadline is None else deadline)
        for proc in self._procs:
            if proc is not None:
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.is_alive():
                    log.warning("reader pid %d did not stop in time; killing it", proc.pid)
                    proc.kill()
                    proc.join(5)
        for t in self._threads:
            t.join(timeout=2)
        self._reservation.close()
