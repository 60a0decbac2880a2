"""Malformed records go to the DLQ with their reason and source position, valid ones are
applied exactly, the server keeps serving, and /metrics follows the data."""

from __future__ import annotations

import json
import random
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tgnstream.apps.serve import ServingProcess
from tgnstream.apps.serve_config import ServeConfig
from tgnstream.ingest.dlq import read_dead_letters
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc

from .conftest import apply_reference, event_values, fresh_engine, produce, serve_config

pytestmark = pytest.mark.kafka

BATCH = 200

# (value, expected reason): one kind of malformation each.
BAD = [
    (b"not json{", "invalid_json"),
    (b"[1, 2]", "not_an_object"),
    (b'{"dst": "p", "ts": 1.0}', "missing_field"),
    (b'{"src": "u", "dst": "p", "ts": "soon"}', "bad_type"),
    (b'{"src": "", "dst": "p", "ts": 1.0}', "empty_id"),
    (b'{"src": "u", "dst": "p", "ts": NaN}', "non_finite_ts"),
    (b'{"src": "u", "dst": "p", "ts": 1.0, "features": [0.5]}', "feature_length"),
    (b'{"src": "same", "dst": "same", "ts": 1.0}', "self_loop"),
    (None, "null_value"),
    (b'{"src": "u", "dst": "p", "ts": 1.0, "pad": "' + b"x" * 70_000 + b'"}', "oversized"),
    (b'{"src": "\xff\xfe", "dst": "p", "ts": 1.0}', "invalid_utf8"),
    (b'{"src": "u", "dst": "p", "ts": 1.0, "label": "yes"}', "bad_label"),
    (b'{"src": "' + b"a" * 600 + b'", "dst": "p", "ts": 1.0}', "id_too_long"),
    (b'{"src": "u", "dst": "p", "ts": -1e9}', "too_late"),
]


def _scrape(port: int) -> dict[tuple, float]:
    """Prometheus text format -> {(name, frozenset(labels)): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        pairs = frozenset(
            tuple(item.split("=", 1)) for item in labels.rstrip("}").replace('"', "").split(",") if item
        )
        out[(name, pairs)] = float(value)
    return out


def _metric(scraped: dict, name: str, **labels) -> float:
    return scraped[(name, frozenset((k, str(v)) for k, v in labels.items()))]


@pytest.mark.parametrize("client", ["confluent-kafka", "kafka-python"])
def test_bad_records_are_dead_lettered_valid_ones_applied_and_metrics_move(
    client, kafka_bootstrap, kafka_topic, wikipedia_csv, tmp_path
):
    valid = event_values(wikipedia_csv, 2_000)
    records = list(valid)
    rng = random.Random(7)
    # Interleave: each bad record at a random position after the first batch (so the
    # watermark is finite and the too-late one is judged against it).
    for value, _ in BAD:
        records.insert(rng.randrange(BATCH + 1, len(records)), (b"k", value))
    produce(kafka_bootstrap, kafka_topic, records)
    bad_offsets = {
        i: reason for i, (k, v) in enumerate(records) for value, reason in BAD if k == b"k" and v is value
    }

    kafka = {"bootstrap_servers": kafka_bootstrap, "topic": kafka_topic, "client": client}
    cfg = serve_config(
        tmp_path,
        kafka_bootstrap,
        kafka_topic,
        ingest={"batch_max_events": BATCH, "max_lateness_s": 1e6, "kafka": kafka},
    )
    proc = ServingProcess(ServeConfig(**cfg))
    proc.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}")
        stub = pb_grpc.LinkPredictionStub(channel)
        deadline = time.monotonic() + 60
        while stub.GetModelInfo(pb.GetModelInfoRequest()).next_offsets.get(0, 0) < len(records):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.events_applied == len(valid)

        # Every bad record is in the DLQ, with its reason and source offset.
        letters = read_dead_letters(kafka_bootstrap, f"{kafka_topic}.dlq", timeout=30)
        got = {d["offset"]: d["reason"] for d in letters}
        assert got == bad_offsets
        assert all(d["partition"] == 0 for d in letters)

        # Valid ones applied exactly: same state as applying only them, with the same boundaries.
        batches = []
        for start in range(0, len(records), BATCH):
            chunk = []
            for k, v in records[start : start + BATCH]:
                if k == b"k":
                    continue
                e = json.loads(v)
                chunk.append((e["src"], e["dst"], e["ts"]))
            batches.append(chunk)
        # Full batches are applied to memory; the last, partial one is the open batch: its ids
        # are registered (in log order) and its events are query context, not yet memory.
        full, open_batch = (batches[:-1], batches[-1]) if len(records) % BATCH else (batches, [])
        ref = apply_reference(fresh_engine(), full)
        ref.ids.lookup([name for s, d, _ in open_batch for name in (s, d)])
        with proc.live.read() as engine:
            n = len(ref.ids)
            torch.testing.assert_close(engine.memory.memory[:n], ref.memory.memory[:n], rtol=0, atol=1e-6)
            assert engine.ids._index == ref.ids._index
            assert len(proc.live.context) == len(open_batch) and int(engine.events_applied) == sum(
                map(len, full)
            )

        # Still serving, still healthy.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reply = stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src=json.loads(valid[0][1])["src"], dst="nobody")]))
        assert len(reply.probabilities) == 1 and list(reply.dst_unknown) == [True]

        deadline = time.monotonic() + 10
        while (after := _scrape(proc.metrics_port)).get(("tgnstream_online_mrr", frozenset()), 0) == 0:
            assert time.monotonic() < deadline, "online quality gauges never published"
            time.sleep(0.05)
        events = "tgnstream_ingest_events_total"
        # Applied to memory: the closed batches; the open batch's events count when it closes.
        assert _metric(after, events, result="applied") == sum(map(len, full))
        assert _metric(after, events, result="dlq") == len(BAD)
        for _, reason in BAD:
            assert _metric(after, "tgnstream_ingest_dlq_total", reason=reason) == 1
        assert _metric(after, "tgnstream_events_applied") == len(valid)
        assert _metric(after, "tgnstream_memory_nodes") == len(ref.ids)
        assert _metric(after, "tgnstream_memory_device_bytes") > 0
        assert _metric(after, "tgnstream_ingest_lag_records", topic=kafka_topic, partition=0) == 0
        assert _metric(after, "tgnstream_ingest_batch_seconds_count") == len(records) // BATCH
        grpc_labels = dict(
            grpc_service="tgnstream.rpc.v1.LinkPrediction", grpc_method="Score", grpc_type="unary"
        )
        assert _metric(after, "grpc_server_handled_total", grpc_code="OK", **grpc_labels) == 1
        assert _metric(after, "grpc_server_handling_seconds_count", **grpc_labels) == 1
        assert (
            0 < _metric(after, "tgnstream_online_mrr") <= 1 and 0 < _metric(after, "tgnstream_online_ap") <= 1
        )
        assert (
            "tgnstream_model_info",
            frozenset({("version", "init-tgn-s0"), ("model", "tgn+pair"), ("device", "cpu")}),
        ) in after
        channel.close()
    finally:
        proc.stop()
    assert (tmp_path / "snapshots").is_dir() and any((tmp_path / "snapshots").iterdir()), "final snapshot"
    # The group's committed offset mirrors the durable snapshot (for lag monitoring).
    from kafka import KafkaConsumer, TopicPartition

    monitor = KafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id="tgnstream-server", enable_auto_commit=False
    )
    try:
        # The snapshot holds the closed batches; the open batch's records are re-read on restart.
        assert monitor.committed(TopicPartition(kafka_topic, 0)) == len(records) // BATCH * BATCH
    finally:
        monitor.close()
