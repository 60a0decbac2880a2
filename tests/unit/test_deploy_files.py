"""deploy/: the compose file, the Kubernetes manifests, the Prometheus configuration and the
Grafana dashboard parse; every file, port, setting and metric they reference exists (metrics:
in what a server and a trainer actually export)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from tgnstream.apps.serve_config import load_serve_config
from tgnstream.runtime.metrics import ServerMetrics
from tgnstream.trainer.continual_config import load_trainer_config
from tgnstream.trainer.metrics import TrainerMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\b((?:tgnstream|grpc_server|process|python)_[a-zA-Z0-9_]+)")


def _exported() -> set[str]:
    """Every series name a server and a trainer can export (labelled families included)."""
    names = {"up"}
    for metrics in (ServerMetrics(), TrainerMetrics()):
        for fam in metrics.registry.collect():
            names.add(fam.name)
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "info": ("_info",),
            }.get(fam.type, ())
            names.update(fam.name + s for s in suffixes)
        names.update(
            line.split("{")[0].split(" ")[0]
            for line in generate_latest(metrics.registry).decode().splitlines()
            if line and not line.startswith("#")
        )
    return names


def _expressions() -> list[tuple[str, str]]:
    out = []
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        out += [(f"alert {r['alert']}", r["expr"]) for r in group["rules"]]
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "tgnstream.json").read_text())
    out += [(f"panel {p['title']}", t["expr"]) for p in dash["panels"] for t in p["targets"]]
    return out


def test_every_metric_the_dashboard_and_alerts_query_is_exported():
    exported = _exported()
    exprs = _expressions()
    assert len(exprs) >= 25
    missing = [(where, m) for where, e in exprs for m in METRIC.findall(e) if m not in exported]
    assert not missing, missing


def test_the_dashboard_covers_what_operators_watch():
    text = " ".join(e for _, e in _expressions())
    for needed in (
        "tgnstream_ingest_events_total",
        "tgnstream_ingest_lag_records",
        "tgnstream_ingest_dlq_total",
        "grpc_server_handling_seconds_bucket",
        "grpc_server_handled_total",
        "tgnstream_online_ap",
        "tgnstream_online_mrr",
        "tgnstream_model_info",
        "tgnstream_trainer_loss",
        "tgnstream_trainer_train_events_per_second",
        "tgnstream_trainer_pipeline_staleness_batches",
        "tgnstream_trainer_rounds_total",
        "tgnstream_snapshot_age_seconds",
        "tgnstream_memory_nodes",
        "tgnstream_memory_device_bytes",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert needed in text, needed
    alerts = {
        r["alert"]
        for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    assert alerts == {
        "TgnstreamIngestDown",
        "TgnstreamIngestLagGrowing",
        "TgnstreamOnlineAPDrop",
        "TgnstreamSnapshotStale",
        "TgnstreamGrpcErrorRatio",
        "TgnstreamModelSwapRefused",
        "TgnstreamModelLineageChanged",
        "TgnstreamTrainerNotPublishing",
    }


def test_compose_files_ports_and_settings_exist(monkeypatch):
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"kafka", "topic", "server", "trainer", "feeder", "prometheus", "grafana"}
    for name, svc in services.items():
        for mount in svc.get("volumes", []):
            src = mount.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src}"
        if "build" in svc:
            assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    serve = load_serve_config(DEPLOY / "serve.toml")
    trainer = load_trainer_config(DEPLOY / "trainer.toml")
    assert f"{serve.grpc.port}:{serve.grpc.port}" in services["server"]["ports"]
    assert f"{serve.metrics_port}:{serve.metrics_port}" in services["server"]["ports"]
    assert f"{trainer.metrics_port}:{trainer.metrics_port}" in services["trainer"]["ports"]
    # The environment overrides name real settings (a typo would be an error, not ignored).
    for var, value in services["server"]["environment"].items():
        monkeypatch.setenv(var, value)
    for var, value in services["trainer"]["environment"].items():
        monkeypatch.setenv(var, value)
    serve = load_serve_config(DEPLOY / "serve.toml")
    trainer = load_trainer_config(DEPLOY / "trainer.toml")
    assert serve.ingest.kafka.bootstrap_servers == "kafka:9092" and str(serve.models.dir) == "/models"
    assert trainer.stream.kafka.bootstrap_servers == "kafka:9092" and str(trainer.publish.dir) == "/models"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"server:{serve.metrics_port}", f"trainer:{trainer.metrics_port}"}


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_copy_what_exists(dockerfile):
    text = (DEPLOY / "docker" / dockerfile).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    for line in text.splitlines():
        if line.startswith("COPY ") and not line.startswith("COPY --from="):
            for src in line.split()[1:-1]:
                src = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], src)
                assert (ROOT / src).exists(), src
    # Everything the package build reads is copied (setup.py finds the packages).
    copied = " ".join(line for line in text.splitlines() if line.startswith("COPY "))
    needs = ("pyproject.toml", "setup.py", "README.md", "tgnstream", "ingest", "model_server", "trainer")
    for needed in needs:
        assert needed in copied, needed
    assert "ARG BASE=" in text and "FROM ${BASE}" in text and "AS builder" in text
    assert "HEALTHCHECK" in text and "/readyz" in text and "USER 1000:1000" in text


def test_deploy_configs_use_the_image_volumes():
    serve = load_serve_config(DEPLOY / "serve.toml")
    trainer = load_trainer_config(DEPLOY / "trainer.toml")
    assert str(serve.snapshots.dir) == "/data/snapshots" and str(serve.models.dir) == "/models"
    assert str(trainer.publish.dir) == "/models" and str(trainer.checkpoints.dir) == "/data/trainer"


def test_compose_runs_the_loop_and_survives_down_up():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "kafka:/var/lib/kafka/data" in services["kafka"]["volumes"] and "kafka" in compose["volumes"]
    for name in ("kafka", "server", "trainer", "prometheus", "grafana"):
        assert services[name]["restart"] == "unless-stopped", name
    for name in ("server", "trainer"):
        grace = services[name]["stop_grace_period"]
        assert grace.endswith("s") and int(grace[:-1]) > 8, name  # above the server's default grace
        assert "/readyz" in " ".join(services[name]["healthcheck"]["test"]) or "readyz" in str(
            services[name]["environment"]
        )
    assert services["feeder"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert services["feeder"]["volumes"][0].endswith(":/datasets:ro")

    class ComposeLoader(yaml.SafeLoader):  # Compose's merge tags (!override, !reset)
        pass

    ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node))
    local = yaml.load((DEPLOY / "compose.local.yml").read_text(), Loader=ComposeLoader)["services"]
    assert set(local) <= set(services)
    assert local["kafka"]["image"].startswith("tgnstream:")
    assert "tgnstream broker" in local["kafka"]["entrypoint"][-1]
    assert local["server"]["environment"]["TGNSTREAM_SERVE_INGEST__ON_LOG_GAP"] == "reset"
    assert local["prometheus"]["profiles"] == ["monitoring"] == local["grafana"]["profiles"]


def test_kubernetes_manifests(tmp_path):
    docs = [
        d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d
    ]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("StatefulSet", "tgnstream-server"),
        ("Deployment", "tgnstream-trainer"),
        ("Service", "tgnstream-server"),
        ("Service", "tgnstream-trainer"),
        ("ConfigMap", "tgnstream-config"),
    } <= kinds
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    (tmp_path / "serve.toml").write_text(config["data"]["serve.toml"])
    (tmp_path / "trainer.toml").write_text(config["data"]["trainer.toml"])
    serve = load_serve_config(tmp_path / "serve.toml")
    trainer = load_trainer_config(tmp_path / "trainer.toml")
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for d in docs:
        if d["kind"] not in ("StatefulSet", "Deployment"):
            continue
        spec = d["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        want = serve.metrics_port if d["kind"] == "StatefulSet" else trainer.metrics_port
        assert ports["metrics"] == want
        if d["kind"] == "StatefulSet":
            assert ports["grpc"] == serve.grpc.port
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["config"] == "/etc/tgnstream" and container["args"][-1].startswith("/etc/tgnstream/")
        assert mounts["models"] == "/models" == str(serve.models.dir) == str(trainer.publish.dir)
        for vol in spec["volumes"]:
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims
    trainer_deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert trainer_deployment["spec"]["replicas"] == 1  # one writer of the models directory
