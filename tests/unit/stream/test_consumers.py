"""Consumer client selection and librdkafka's names for the connection settings."""

from __future__ import annotations

import builtins

import pytest

from tgnstream.ingest.config import IngestConfig, KafkaConfig
from tgnstream.stream.confluent_client import librdkafka_settings
from tgnstream.stream.consumers import resolve_client


def test_security_settings_map_to_librdkafka_names():
    k = KafkaConfig(
        bootstrap_servers="a:9093,b:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username="svc",
        sasl_plain_password="s3cret",
        ssl_cafile="/etc/ca.pem",
        ssl_certfile="/etc/client.pem",
        ssl_keyfile="/etc/client.key",
    )
    assert librdkafka_settings(k) == {
        "bootstrap.servers": "a:9093,b:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ca.pem",
        "ssl.certificate.location": "/etc/client.pem",
        "ssl.key.location": "/etc/client.key",
    }


def test_plaintext_passes_nothing_else():
    assert librdkafka_settings(KafkaConfig(bootstrap_servers="h:1")) == {
        "bootstrap.servers": "h:1",
        "security.protocol": "PLAINTEXT",
    }


def test_auto_prefers_confluent_and_falls_back_to_kafka_python(monkeypatch):
    assert resolve_client("auto") == "confluent-kafka"
    assert resolve_client("kafka-python") == "kafka-python"
    real_import = builtins.__import__

    def no_confluent(name, *args, **kwargs):
        if name == "confluent_kafka":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_confluent)
    assert resolve_client("auto") == "kafka-python"
    assert resolve_client("confluent-kafka") == "confluent-kafka"  # explicit choice is kept


def test_client_is_validated():
    assert IngestConfig().kafka.client == "auto"
    with pytest.raises(ValueError):
        KafkaConfig(client="rdkafka")
