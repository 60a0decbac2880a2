"""The embedded broker speaks enough Kafka for tgnstream: produce/consume with keys and headers,
assign + seek, the fetch high watermark, group offsets committed without a group join, clean
start/stop, clear start-up errors, the ``broker`` subcommand."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from tgnstream.apps.broker import BrokerError, EmbeddedBroker, add_parser
from tgnstream.apps.testing import consume_records, free_port
from tgnstream.stream.kafka_admin import create_topic

pytestmark = pytest.mark.kafka

N = 1000


def _value(i: int) -> bytes:
    return json.dumps({"src": f"u{i % 37}", "dst": f"p{i % 11}", "ts": 1000.0 + i}).encode()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_produce_then_seek_and_consume(kafka_bootstrap: str, kafka_topic: str) -> None:
    # linger + a small batch size make the producer send many multi-record batches.
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=20, batch_size=4096)
    futures = [
        producer.send(
            kafka_topic,
            key=f"u{i % 37}".encode(),
            value=_value(i),
            headers=[("seq", str(i).encode()), ("kind", b"event")],
        )
        for i in range(N)
    ]
    producer.flush()
    offsets = [f.get(timeout=10).offset for f in futures]
    producer.close()
    assert offsets == list(range(N))  # one partition: offsets are the send order

    start = 250
    records = consume_records(kafka_bootstrap, kafka_topic, N - start, offset=start)
    assert [r.offset for r in records] == list(range(start, N))
    for r in records:
        i = r.offset
        assert r.key == f"u{i % 37}".encode()
        assert json.loads(r.value) == {"src": f"u{i % 37}", "dst": f"p{i % 11}", "ts": 1000.0 + i}
        assert r.headers == [("seq", str(i).encode()), ("kind", b"event")]

    # The high watermark of a fetch response is the log end; end_offsets() is not reliable on
    # Tansu after batched produces (design §9), so lag must come from highwater().
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    tp = TopicPartition(kafka_topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, N - 1)
    deadline = time.monotonic() + 10
    got = []
    while not got and time.monotonic() < deadline:
        got = consumer.poll(timeout_ms=500).get(tp, [])
    assert [r.offset for r in got] == [N - 1]
    assert consumer.highwater(tp) == N
    consumer.close()


def test_commit_offsets_without_group_join(kafka_bootstrap: str, kafka_topic: str) -> None:
    group = f"{kafka_topic}-group"
    tp = TopicPartition(kafka_topic, 0)
    writer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    writer.assign([tp])
    t0 = time.monotonic()
    writer.commit({tp: OffsetAndMetadata(123, "snapshot-7", -1)})
    commit_s = time.monotonic() - t0
    writer.close()
    # A group join takes ~20 s on Tansu; an assign-only commit must not go through one.
    assert commit_s < 5.0, f"commit took {commit_s:.1f} s"

    reader = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    t0 = time.monotonic()
    assert reader.committed(tp) == 123
    # (Tansu 0.6.0 drops the commit's metadata string: committed(tp, metadata=True) has None.)
    assert time.monotonic() - t0 < 5.0
    other = KafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=group + "-other", enable_auto_commit=False
    )
    assert other.committed(tp) is None  # offsets are per group
    reader.close()
    other.close()


def test_create_topic(kafka_bootstrap: str, kafka_topic: str) -> None:
    name = kafka_topic + "-p3"
    assert create_topic(kafka_bootstrap, name, partitions=3) == 3
    assert create_topic(kafka_bootstrap, name, partitions=1) == 3  # exists: keeps its 3
    with pytest.raises(TopicAlreadyExistsError):
        create_topic(kafka_bootstrap, name, exist_ok=False)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    assert name in admin.list_topics()
    admin.close()
    with pytest.raises(ValueError, match="illegal Kafka topic name"):
        create_topic(kafka_bootstrap, "bad name")
    with pytest.raises(ValueError, match="partitions"):
        create_topic(kafka_bootstrap, name + "-zero", partitions=0)


def test_start_stop_leaves_nothing_behind() -> None:
    with EmbeddedBroker() as broker:
        pid, port, log = broker.pid, broker.port, broker.log_path
        assert pid is not None and log is not None
        assert broker.bootstrap == f"127.0.0.1:{port}"
        assert _pid_alive(pid) and log.is_file()
        assert create_topic(broker.bootstrap, "t") == 1
    assert not broker.running
    assert not _pid_alive(pid)  # terminated and reaped (no zombie either)
    assert not log.exists()  # the temporary log goes with it
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    broker.stop()  # idempotent


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BrokerError, match=f"127.0.0.1:{port} is already in use"):
            EmbeddedBroker(port=port).start()


def _fake_binary(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-tansu"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_broker_dying_at_start_reports_its_log(tmp_path: Path) -> None:
    binary = _fake_binary(tmp_path, 'echo "Error: Storage(FeatureNotEnabled)" >&2; exit 3')
    with pytest.raises(BrokerError, match=r"(?s)exited with status 3.*FeatureNotEnabled"):
        EmbeddedBroker(binary=binary).start()


def test_broker_never_ready_times_out_and_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    binary = _fake_binary(tmp_path, f'echo $$ > {pid_file}; echo "starting..."; exec sleep 60')
    t0 = time.monotonic()
    with pytest.raises(BrokerError, match=r"(?s)not ready on .* after 1 s.*starting\.\.\."):
        EmbeddedBroker(binary=binary, startup_timeout=1.0).start()
    assert time.monotonic() - t0 < 10
    assert not _pid_alive(int(pid_file.read_text()))


def test_cli_subcommand_parses() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["broker"])
    assert (args.host, args.port, args.topic, args.partitions) == ("127.0.0.1", 9092, [], 1)
    args = parser.parse_args(
        ["broker", "--port", "1234", "--topic", "a", "--topic", "b", "--partitions", "4"]
    )
    assert (args.port, args.topic, args.partitions) == (1234, ["a", "b"], 4)
    assert args.func.__name__ == "run"


def test_cli_runs_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "broker.log"
    script = (
        "import argparse, sys\n"
        "from tgnstream.apps.broker import add_parser\n"
        "p = argparse.ArgumentParser(); add_parser(p.add_subparsers())\n"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            "broker",
            "--port",
            str(port),
            "--topic",
            "events",
            "--topic",
            "events.dlq",
            "--partitions",
            "2",
            "--log-file",
            str(log),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the broker is ready (or the run failed)
        assert line.startswith(f"embedded broker ready: bootstrap 127.0.0.1:{port}"), line
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(["events", "events.dlq"])}
        admin.close()
        assert described == {"events": 2, "events.dlq": 2}
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out
        assert "stopping embedded broker" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(ConnectionRefusedError):  # the broker went with it
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert "listening on: tcp://127.0.0.1:" in log.read_text()
