"""Liveness and readiness of a serving process, and the HTTP endpoints that expose them.

* **Liveness** (``/livez``, gRPC health service ``""``): the process runs and its ingest side is
  alive or being restarted. A process that cannot recover exits non-zero instead, so its
  supervisor (Kubernetes, systemd) restarts it.
* **Readiness** (``/readyz``, gRPC health service ``tgnstream.rpc.v1.LinkPrediction``): answers
  reflect the log. Not ready while restoring, before the fetch process reports the log end,
  while replaying a backlog larger than ``ready_max_lag_records``, while the broker is
  unreachable, and while the ingest side is down. Each reason is named in ``/readyz``'s body
  and in the log when it appears or clears.

Restoring is special: from start-up until the state first reflects the log (loaded, then caught
up with the log end once), the process does not answer queries at all (gRPC UNAVAILABLE; health
``""`` NOT_SERVING too), since a half-replayed state is not an answer (``Readiness.hold_until_ready``;
``health.serve_while_restoring`` answers anyway). After that, queries are answered while not ready
(from the last applied state, with its ``StateStamp``); readiness tells load balancers to prefer a
replica that is current.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["HealthConfig", "Readiness", "HealthHttpServer"]

log = logging.getLogger(__name__)


class HealthConfig(BaseModel):
    """When a serving process counts as ready, and how hard it tries to keep ingest alive."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ready_max_lag_records: int = Field(
        5_000, ge=0, description="not ready while any partition is more records than this behind its log end"
    )
    ingest_restart_initial_s: float = Field(1.0, gt=0, description="first wait before restarting ingest")
    ingest_restart_max_s: float = Field(30.0, gt=0, description="longest wait between restarts (doubling)")
    serve_while_restoring: bool = Field(
        False,
        description="answer queries before the state first reflects the log (restored, then caught up with "
        "the log end once; e.g. with the broker unreachable at start-up, from a stale snapshot); by "
        'default they get UNAVAILABLE meanwhile and gRPC health "" says NOT_SERVING',
    )
    ingest_max_failures: int = Field(
        5,
        ge=1,
        description="consecutive ingest failures (without a minute of healthy running between "
        "them) after which the process exits non-zero for its supervisor to restart it",
    )


class Readiness:
    """The set of reasons why the process is not ready (empty: ready). Thread-safe.

    ``listeners`` are called with ``(ready, reasons)`` whenever readiness flips.
    """

    def __init__(self, gauge: Gauge | None = None):
        self._lock = threading.Lock()
        self._reasons: dict[str, str] = {}
        self._listeners: list[Callable[[bool, dict[str, str]], None]] = []
        self._gauge = gauge
        self._held: dict[str, Callable[[], None]] = {}
        self._publish(True)

    def hold_until_ready(self, reason: str, detail: str, on_release: Callable[[], None]) -> None:
        """Set ``reason`` until it is the only one left: it then clears by itself (once) and
        ``on_release()`` is called. For a start-up phase that ends when everything else is
        fine (restoring ends when ingest has caught up with the log once)."""
        with self._lock:
            self._held[reason] = on_release
        self.set(reason, detail)
        self._release_held()

    def _release_held(self) -> None:
        with self._lock:
            if len(self._reasons) != 1 or next(iter(self._reasons)) not in self._held:
                return
            reason = next(iter(self._reasons))
            on_release = self._held.pop(reason)
        on_release()  # queries are accepted before health says SERVING, never the other way round
        self.set(reason, None)

    def add_listener(self, listener: Callable[[bool, dict[str, str]], None]) -> None:
        with self._lock:
            self._listeners.append(listener)
            ready, reasons = not self._reasons, dict(self._reasons)
        listener(ready, reasons)

    def set(self, reason: str, detail: str | None) -> None:
        """Mark ``reason`` as holding (``detail`` says how) or, with None, as cleared."""
        with self._lock:
            was_ready = not self._reasons
            had = reason in self._reasons
            if detail is None:
                if not had:
                    return
                del self._reasons[reason]
                log.info("readiness: %s cleared", reason)
            else:
                self._reasons[reason] = detail
                if not had:
                    log.warning("readiness: not ready: %s (%s)", reason, detail)
            ready, reasons = not self._reasons, dict(self._reasons)
            listeners = list(self._listeners) if ready != was_ready else []
        if ready != was_ready:
            self._publish(ready)
            log.info("readiness: %s", "READY" if ready else "NOT READY")
        for listener in listeners:
            listener(ready, reasons)
        if self._held:
            self._release_held()

    def _publish(self, ready: bool) -> None:
        if self._gauge is not None:
            self._gauge.set(1 if ready else 0)

    @property
    def ready(self) -> bool:
        with self._lock:
            return not self._reasons

    def reasons(self) -> dict[str, str]:
        with self._lock:
            return dict(self._reasons)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # probes every few seconds would flood the log
        pass


class HealthHttpServer:
    """``/metrics`` (Prometheus), ``/livez`` and ``/readyz`` on one port, in a daemon thread.

    ``/livez``: 200 while ``alive()`` is true, else 503. ``/readyz``: 200 when ready, else 503;
    the body is JSON ``{"ready": bool, "reasons": {...}}`` either way.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: Readiness,
        alive: Callable[[], bool],
    ):
        metrics_app = make_wsgi_app(registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "")
            if path in ("/livez", "/readyz"):
                if path == "/livez":
                    ok = alive()
                    body = {"alive": ok}
                else:
                    reasons = readiness.reasons()
                    ok = not reasons
                    body = {"ready": ok, "reasons": reasons}
                status = "200 OK" if ok else "503 Service Unavailable"
                data = json.dumps(body).encode()
                headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
                start_response(status, headers)
                return [data]
            return metrics_app(environ, start_response)

        class Server(ThreadingWSGIServer):
            daemon_threads = True

        if ":" in host:
            Server.address_family = socket.AF_INET6
        try:
            self._httpd = make_server(host, port, app, Server, handler_class=_QuietHandler)
        except OSError as e:
            raise ValueError(
                f"cannot serve /metrics on {host}:{port}: {e.strerror} (is the port in use?)"
            ) from None
        self.port = int(self._httpd.server_port)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
