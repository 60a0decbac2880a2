"""A real Prometheus (Debian's ``prometheus`` package; ``make test`` installs it) scrapes a running
server and trainer: ``promtool`` accepts their exposition and the alert rules; every dashboard
expression returns data through Prometheus' HTTP API; every alert expression is accepted and
the series it reads exist; stopping ingest (the broker goes away) makes TgnstreamIngestDown fire.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tgnstream.apps.broker import EmbeddedBroker, free_port
from tgnstream.client import LinkPredictionClient
from tgnstream.stream.kafka_admin import create_topic

from .serving.conftest import event_values, produce

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
WIKI = ROOT.parent / "shared" / "datasets" / "wikipedia.csv"
METRIC = re.compile(r"\b((?:tgnstream|grpc_server|process)_[a-zA-Z0-9_]+)")


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} not found: `make test` installs Debian's prometheus package (apt-get install prometheus)"
        )
    return path


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _query(prom: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    return json.loads(_get(url))


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = cond()
        except OSError:  # not listening yet
            got = None
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _start(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, **kw)


@pytest.mark.timeout(420)
def test_prometheus_scrapes_evaluates_the_dashboard_and_fires_ingest_down(tmp_path):
    prometheus, promtool = _need("prometheus"), _need("promtool")
    rules = DEPLOY / "prometheus" / "alerts.yml"
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    procs: list[subprocess.Popen] = []
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log")
    broker.start()
    try:
        create_topic(broker.bootstrap, "events", 1)
        produce(broker.bootstrap, "events", event_values(WIKI, 3000))
        models = tmp_path / "models"
        stream = {"batch_max_events": 200, "batch_max_wait_ms": 50}
        grpc_port = free_port()
        serve = {
            "model": {"preset": "tgn"},
            "ingest": {**stream, "kafka": {"bootstrap_servers": broker.bootstrap, "topic": "events"}},
            "grpc": {"port": grpc_port, "readers": 0},
            "snapshots": {"dir": str(tmp_path / "snapshots"), "every_events": 1000},
            "models": {"dir": str(models), "watch_interval_s": 0.5},
            "metrics_port": 0,
            "torch_threads": 1,
            "ready_file": str(tmp_path / "serve.ready"),
        }
        trainer = {
            "stream": {
                **stream,
                "kafka": {"bootstrap_servers": broker.bootstrap, "topic": "events", "group_id": None},
            },
            "start": {"memory_dim": 16},
            "training": {
                "window_events": 1600,
                "every_events": 800,
                "min_new_events": 400,
                "holdout_events": 400,
            },
            "publish": {"dir": str(models)},
            "checkpoints": {"dir": str(tmp_path / "trainer")},
            "metrics_port": 0,
            "torch_threads": 1,
            "progress": False,
            "ready_file": str(tmp_path / "trainer.ready"),
        }
        for name, cfg in (("trainer", trainer), ("serve", serve)):
            (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
            procs.append(
                _start(
                    [sys.executable, "-m", "tgnstream", name, "--config", str(tmp_path / f"{name}.json")],
                    tmp_path / f"{name}.log",
                )
            )
        ports = {}
        for name in ("serve", "trainer"):
            ready = tmp_path / f"{name}.ready"
            _wait(ready.exists, 120, f"{name} to start")
            ports[name] = json.loads(ready.read_text())["metrics_port"]
        # promtool lints what both processes expose.
        for name, port in ports.items():
            text = _get(f"http://127.0.0.1:{port}/metrics")
            lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
            assert lint.returncode == 0, f"{name}: {lint.stdout}{lint.stderr}"
        # Prometheus with the project's rules (TgnstreamIngestDown's `for` shortened to keep the test short).
        test_rules = yaml.safe_load(rules.read_text())
        for rule in test_rules["groups"][0]["rules"]:
            if rule["alert"] == "TgnstreamIngestDown":
                rule["for"] = "3s"
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(test_rules))
        prom_port = free_port()
        prom_cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "alerts.yml")],
            "scrape_configs": [
                {
                    "job_name": "tgnstream-server",
                    "static_configs": [{"targets": [f"127.0.0.1:{ports['serve']}"]}],
                },
                {
                    "job_name": "tgnstream-trainer",
                    "static_configs": [{"targets": [f"127.0.0.1:{ports['trainer']}"]}],
                },
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))
        prom_cmd = [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ]
        procs.append(_start(prom_cmd, tmp_path / "prometheus.log"))
        _wait(
            lambda: len(_query(prom_port, "up == 1").get("data", {}).get("result", [])) == 2,
            60,
            "both targets up",
        )
        # Traffic every panel shows: queries (Score and TopK) while events are applied and rounds run.
        produce(broker.bootstrap, "events", event_values(WIKI, 6000)[3000:])
        with LinkPredictionClient(f"127.0.0.1:{grpc_port}", retries=10) as client:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                client.score([("0", "8227")])
                client.top_k("0", 5)
                time.sleep(0.05)
        _wait(
            lambda: _query(prom_port, 'tgnstream_trainer_rounds_total{result="published"} > 0')["data"][
                "result"
            ],
            120,
            "a trainer round",
        )
        dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "tgnstream.json").read_text())
        empty, report = [], []
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                reply = _query(prom_port, target["expr"])
                assert reply["status"] == "success", (panel["title"], reply)
                result = reply["data"]["result"]
                if not result:
                    empty.append(panel["title"])
                report.append(
                    ("panel", panel["title"], len(result), result[0]["value"][1] if result else "-")
                )
        assert not empty, f"panels without data: {empty}"
        for rule in test_rules["groups"][0]["rules"]:
            reply = _query(prom_port, rule["expr"])
            assert reply["status"] == "success", (rule["alert"], reply)
            for name in set(METRIC.findall(rule["expr"])):
                assert _query(prom_port, name)["data"]["result"], (rule["alert"], name)
            report.append(
                (
                    "alert",
                    rule["alert"],
                    len(reply["data"]["result"]),
                    "firing now" if reply["data"]["result"] else "quiet",
                )
            )
        # What Prometheus answered, shown with `pytest -s` (the closing note quotes it).
        for kind, name, series, value in report:
            print(f"{kind:<6} {name:<48} series {series:>3}  {value}")
        # Stop ingest: the broker goes away, the server loses its connection, the alert fires.
        broker.stop()
        _wait(
            lambda: any(
                r["metric"]["alertname"] == "TgnstreamIngestDown" and r["metric"]["alertstate"] == "firing"
                for r in _query(prom_port, "ALERTS")["data"]["result"]
            ),
            90,
            "TgnstreamIngestDown to fire",
        )
        print("alert  TgnstreamIngestDown fired after the broker was stopped")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
