"""Serve settings: TOML/JSON files, nested environment overrides that win over the file."""

from __future__ import annotations

import json

import pytest

from tgnstream.apps.serve_config import load_serve_config


def test_toml_file_with_nested_environment_override(tmp_path, monkeypatch):
    path = tmp_path / "serve.toml"
    path.write_text(
        '[ingest]\nbatch_max_events = 250\n[ingest.kafka]\ntopic = "clicks"\nbootstrap_servers = "k:1"\n'
        "[grpc]\nport = 6000\n[snapshots]\nevery_events = 1000\n"
    )
    monkeypatch.setenv("TGNSTREAM_SERVE_INGEST__KAFKA__BOOTSTRAP_SERVERS", "kafka-0:9092,kafka-1:9092")
    monkeypatch.setenv("TGNSTREAM_SERVE_GRPC__PORT", "7000")
    cfg = load_serve_config(path)
    assert cfg.ingest.kafka.topic == "clicks" and cfg.ingest.batch_max_events == 250
    assert cfg.ingest.kafka.bootstrap_servers == "kafka-0:9092,kafka-1:9092"
    assert cfg.grpc.port == 7000 and cfg.snapshots.every_events == 1000
    assert cfg.ingest.kafka.client_kwargs()["bootstrap_servers"] == ["kafka-0:9092", "kafka-1:9092"]


def test_json_file_and_clear_errors(tmp_path):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"ingest": {"batch_max_events": 0}}))
    with pytest.raises(ValueError, match="batch_max_events"):
        load_serve_config(path)
    path.write_text(json.dumps({"ingest": {"unknown_knob": 1}}))
    with pytest.raises(ValueError, match="unknown_knob"):
        load_serve_config(path)
    bad = tmp_path / "serve.yaml"
    bad.write_text("x: 1")
    with pytest.raises(ValueError, match=".toml or .json"):
        load_serve_config(bad)


def test_the_example_config_in_deploy_parses():
    from pathlib import Path

    cfg = load_serve_config(Path(__file__).resolve().parents[3] / "deploy" / "serve.toml")
    assert cfg.ingest.kafka.topic == "events" and cfg.grpc.port == 50051 and cfg.model.pair_features


def test_config_errors_name_the_file_and_say_what_is_wrong(tmp_path):
    import pytest

    from tgnstream.apps.serve_config import load_serve_config
    from tgnstream.runtime.sysinfo import resolve_device

    bad = tmp_path / "serve.toml"
    bad.write_text("[model\n")
    with pytest.raises(ValueError, match=f"{bad}: Expected"):
        load_serve_config(bad)
    bad.write_text("[grpc]\nprot = 1\n")
    with pytest.raises(ValueError, match=f"(?s){bad}:.*grpc.prot"):
        load_serve_config(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_serve_config(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_a_metrics_port_in_use_is_a_clear_error():
    import socket

    import pytest
    from prometheus_client import CollectorRegistry

    from tgnstream.runtime.health import HealthHttpServer, Readiness

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot serve /metrics on 127.0.0.1:{port}.*in use"):
            HealthHttpServer("127.0.0.1", port, CollectorRegistry(), Readiness(), lambda: True)
