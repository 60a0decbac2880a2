"""Readiness bookkeeping, the /livez and /readyz endpoints, and the connection-log throttle."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Gauge

from tgnstream.runtime.health import HealthHttpServer, Readiness
from tgnstream.stream.consumers import ConnectionLogThrottle


def test_readiness_is_the_absence_of_reasons_and_notifies_flips_only():
    gauge = Gauge("ready_test", "", registry=CollectorRegistry())
    r = Readiness(gauge)
    flips = []
    r.add_listener(lambda ready, reasons: flips.append((ready, sorted(reasons))))
    r.set("restoring", "loading")
    r.set("catching_up", "500 behind")
    r.set("catching_up", "400 behind")  # detail changes: no flip
    r.set("restoring", None)
    assert not r.ready and r.reasons() == {"catching_up": "400 behind"} and gauge._value.get() == 0
    r.set("catching_up", None)
    r.set("never_set", None)
    assert r.ready and gauge._value.get() == 1
    assert flips == [(True, []), (False, ["restoring"]), (True, [])]


def test_a_held_reason_clears_once_when_it_is_the_only_one_left():
    r = Readiness()
    released, order = [], []
    r.add_listener(lambda ready, reasons: order.append(("ready", ready)))
    r.set("ingest_down", "starting")
    r.hold_until_ready(
        "restoring", "replaying", lambda: (released.append(r.reasons()), order.append("released"))
    )
    r.set("catching_up", "log end unknown")
    r.set("ingest_down", None)
    assert not released  # catching_up still holds
    r.set("catching_up", None)
    # Released while "restoring" was still set (queries open before health says ready), then cleared.
    assert released == [{"restoring": "replaying"}] and r.ready
    assert order[-2:] == ["released", ("ready", True)]
    r.set("catching_up", "behind again")
    r.set("catching_up", None)
    assert released == [{"restoring": "replaying"}] and r.reasons() == {}  # once only


def _get(port: int, path: str):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_http_endpoints_report_liveness_readiness_and_metrics():
    registry = CollectorRegistry()
    Gauge("some_metric", "help", registry=registry).set(3)
    readiness, alive = Readiness(), [True]
    server = HealthHttpServer("127.0.0.1", 0, registry, readiness, lambda: alive[0])
    server.start()
    try:
        assert _get(server.port, "/readyz") == (200, json.dumps({"ready": True, "reasons": {}}))
        readiness.set("broker_unreachable", "no connection to k:9092")
        status, body = _get(server.port, "/readyz")
        assert status == 503 and json.loads(body)["reasons"] == {
            "broker_unreachable": "no connection to k:9092"
        }
        assert _get(server.port, "/livez")[0] == 200
        alive[0] = False
        assert _get(server.port, "/livez")[0] == 503
        status, text = _get(server.port, "/metrics")
        assert status == 200 and "some_metric 3.0" in text
    finally:
        server.stop()


def test_connection_log_throttle_passes_the_first_line_then_backs_off():
    now = [0.0]
    throttle = ConnectionLogThrottle(max_interval_s=8.0, quiet_reset_s=100.0, clock=lambda: now[0])
    passed = []
    for step in range(400):  # a failure line every 50 ms for 20 s
        now[0] = step * 0.05
        line = throttle.filter("Connect to x failed")
        if line is not None:
            passed.append((now[0], line))
    times = [round(t, 2) for t, _ in passed]
    assert times == [0.0, 1.0, 3.0, 7.0, 15.0]  # 1, 2, 4, 8 (the cap), 8 s apart
    assert passed[1][1].endswith("(and 19 similar lines suppressed)")
    throttle.reset()  # connected again: the next failure is logged at once
    now[0] = 20.01
    assert throttle.filter("Connect to x failed") == "Connect to x failed"  # a new streak
