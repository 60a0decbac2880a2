"""``tgnstream replay`` against the embedded broker: every record checked against the CSV file
itself (an independent reading of the dataset), order, pacing, failures; plus dead letters."""

from __future__ import annotations

import argparse
import csv
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from tgnstream.apps.replay import ReplayError, TokenBucket, add_parser, replay_events
from tgnstream.core.loaders import load_dataset
from tgnstream.ingest.dlq import (
    DLQ_HEADERS,
    DeadLetterError,
    DeadLetterPublisher,
    dlq_topic,
    read_dead_letters,
)
from tgnstream.stream.kafka_admin import create_topic
from tgnstream.stream.records import RecordDecoder

pytestmark = pytest.mark.kafka


def csv_rows(path: Path, start: int, count: int) -> list[tuple[str, str, float, int]]:
    """Rows ``start .. start+count`` of a JODIE CSV read with the csv module: (u, i, ts, label)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)  # header
        rows = []
        for k, row in enumerate(reader):
            if k >= start + count:
                break
            if k >= start:
                rows.append((row[0].strip(), row[1].strip(), float(row[2]), int(float(row[3]))))
    return rows


def consume(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list:
    """All records of partition 0 from the beginning (assign + seek: no group join)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    records: list = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            records.extend(consumer.poll(timeout_ms=200).get(tp, []))
            if len(records) >= expected and consumer.highwater(tp) == consumer.position(tp):
                break
    finally:
        consumer.close()
    return records


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tgnstream")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["replay", *argv])
    return args.func(args)


def fresh_topic(bootstrap: str) -> str:
    name = f"replay-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, name, partitions=1)
    return name


def test_replay_sends_every_event_in_time_order(kafka_bootstrap, kafka_topic, wikipedia_csv, capsys):
    assert cli("--data", str(wikipedia_csv), "--topic", kafka_topic, "--bootstrap", kafka_bootstrap,
               "--limit", "2000", "--no-progress") == 0  # fmt: skip
    assert "sent 2000 events" in capsys.readouterr().out
    records = consume(kafka_bootstrap, kafka_topic, 2000)
    rows = csv_rows(wikipedia_csv, 0, 2000)
    assert len(records) == len(rows) == 2000
    assert [r.offset for r in records] == list(range(2000))
    for rec, (u, i, ts, label) in zip(records, rows):
        assert rec.key == u.encode()
        # Exact bytes: compact JSON, ts as a float, label an int, no features (featureless file).
        assert rec.value == f'{{"src":"{u}","dst":"{i}","ts":{ts!r},"label":{label}}}'.encode()
    # And the ingest decoder reads them back as the same events, in the same order.
    out = RecordDecoder().decode([r.value for r in records])
    assert not out.rejected
    assert out.src == [r[0] for r in rows] and out.dst == [r[1] for r in rows]
    assert out.ts.tolist() == [r[2] for r in rows]
    assert np.all(np.diff(out.ts) >= 0)


def test_replay_start_and_protobuf(kafka_bootstrap, wikipedia_csv):
    topic = fresh_topic(kafka_bootstrap)
    argv = ["--data", str(wikipedia_csv), "--topic", topic, "--bootstrap", kafka_bootstrap]
    assert cli(*argv, "--start", "1000", "--limit", "300", "--encoding", "protobuf", "--no-progress") == 0
    records = consume(kafka_bootstrap, topic, 300)
    rows = csv_rows(wikipedia_csv, 1000, 300)
    assert len(records) == 300
    out = RecordDecoder(encoding="protobuf").decode([r.value for r in records])
    assert not out.rejected
    assert [r.key.decode() for r in records] == out.src == [r[0] for r in rows]
    assert out.dst == [r[1] for r in rows]
    assert out.ts.tolist() == [r[2] for r in rows]
    assert out.labels.tolist() == [r[3] for r in rows]


def test_replay_creates_a_missing_topic_only_when_asked(kafka_bootstrap, wikipedia_csv, capsys):
    topic = f"replay-new-{uuid.uuid4().hex[:8]}"
    common = ("--data", str(wikipedia_csv), "--topic", topic, "--bootstrap", kafka_bootstrap, "--no-progress")
    assert cli(*common, "--limit", "10") == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli(*common, "--limit", "10", "--create-topic", "--partitions", "1") == 0
    assert len(consume(kafka_bootstrap, topic, 10)) == 10


def test_rate_is_honoured(kafka_bootstrap, kafka_topic, wikipedia_csv):
    dataset = load_dataset(wikipedia_csv, limit=1000)
    started = time.perf_counter()
    sent = replay_events(kafka_bootstrap, kafka_topic, dataset, limit=1000, rate=500, progress=False)
    seconds = time.perf_counter() - started
    assert sent == 1000
    assert 1.6 <= seconds <= 3.0, seconds
    # The producer stamps each record when it is sent: the stamps show the pacing itself.
    stamps = np.array([r.timestamp for r in consume(kafka_bootstrap, kafka_topic, 1000)]) / 1000.0
    assert len(stamps) == 1000
    span = stamps[-1] - stamps[0]
    assert 1.8 <= span <= 2.3, span  # 999 intervals of 2 ms
    per_half_second = np.histogram(stamps - stamps[0], bins=np.arange(0.0, 2.01, 0.5))[0]
    assert np.all(np.abs(per_half_second - 250) <= 75), per_half_second


def test_unreachable_broker_fails_loudly(wikipedia_csv, capsys):
    assert cli("--data", str(wikipedia_csv), "--topic", "x", "--bootstrap", "127.0.0.1:1",
               "--limit", "5", "--create-topic", "--no-progress") == 1  # fmt: skip
    assert "error" in capsys.readouterr().err


# ---------------------------------------------------------------------------- fakes (no broker)
class FakeFuture:
    def __init__(self, error: BaseException | None):
        self.error = error

    def add_errback(self, fn, *args):
        if self.error is not None:
            fn(*args, self.error)
        return self


class FakeProducer:
    """Fails the sends whose index is in ``fail``; records what was sent."""

    def __init__(self, fail: set[int] = frozenset()):
        self.fail = set(fail)
        self.sent: list[dict] = []
        self.config = {"max_request_size": 1048576}

    def partitions_for(self, topic):
        return {0}

    def send(self, topic, **record):
        self.sent.append({"topic": topic, **record})
        return FakeFuture(RuntimeError("broker said no") if len(self.sent) - 1 in self.fail else None)

    def flush(self, timeout=None):
        pass


def test_a_failed_delivery_fails_the_replay(wikipedia_csv):
    dataset = load_dataset(wikipedia_csv, limit=50)
    with pytest.raises(ReplayError, match="could not be delivered"):
        replay_events(FakeProducer(fail={30}), "t", dataset, progress=False)
    producer = FakeProducer()
    assert replay_events(producer, "t", dataset, start=10, limit=5, progress=False) == 5
    assert [p["key"] for p in producer.sent] == [r[0].encode() for r in csv_rows(wikipedia_csv, 10, 5)]
    assert all(p["partition"] == 0 for p in producer.sent)


def test_token_bucket_paces_exactly_over_a_run():
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    bucket = TokenBucket(1000.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(5000):
        bucket.take()
        now[0] += 0.00001  # 10 µs of work per event
    assert 4.99 <= now[0] <= 5.01  # 4999 intervals of 1 ms, whatever the sleep granularity
    assert min(sleeps) >= 0.001  # never busy-sleeps in microseconds
    # After a stall, at most `burst` events go out at once, then the pace resumes.
    now[0] += 10.0
    before = len(sleeps)
    for _ in range(100):
        bucket.take()
    assert len(sleeps) == before  # 100 <= burst (0.1 s worth = 100 tokens)
    bucket.take()
    assert len(sleeps) == before + 1


# ---------------------------------------------------------------------------- dead letters
def test_dead_letters_round_trip(kafka_bootstrap, kafka_topic):
    create_topic(kafka_bootstrap, dlq_topic(kafka_topic), partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    publisher = DeadLetterPublisher(producer, kafka_topic, max_value_bytes=100)
    common = {"source_topic": kafka_topic, "partition": 0}
    publisher.publish(key=b"k1", value=b'{"src":', reason="invalid_json", detail="EOF", offset=7,
                      timestamp_ms=1700000000123, **common)  # fmt: skip
    publisher.publish(key=None, value=None, reason="null_value", detail="tombstone", offset=8,
                      timestamp_ms=None, **common)  # fmt: skip
    publisher.publish(key=b"k3", value=b"x" * 150, reason="oversized", detail="big", offset=9,
                      timestamp_ms=1700000000999, **common)  # fmt: skip
    publisher.flush(timeout=30)
    producer.close()
    letters = read_dead_letters(kafka_bootstrap, dlq_topic(kafka_topic), timeout=30)
    assert [(d["reason"], d["offset"], d["partition"], d["source_topic"]) for d in letters] == [
        ("invalid_json", 7, 0, kafka_topic),
        ("null_value", 8, 0, kafka_topic),
        ("oversized", 9, 0, kafka_topic),
    ]
    first, tomb, big = letters
    assert (first["key"], first["value"], first["detail"], first["timestamp_ms"]) == (
        b"k1",
        b'{"src":',
        "EOF",
        1700000000123,
    )
    assert set(first["headers"]) <= set(DLQ_HEADERS)
    assert tomb["key"] is None and tomb["value"] == b"" and tomb["timestamp_ms"] is None
    assert big["value"] == b"x" * 100 and big["truncated_from"] == 150


def test_dead_letter_flush_raises_until_every_letter_is_delivered():
    producer = FakeProducer(fail={0, 1})  # the first two sends fail, re-sends succeed
    publisher = DeadLetterPublisher(producer, "events")
    for offset in (1, 2):
        publisher.publish(key=b"k", value=b"v", reason="invalid_json", detail="d", source_topic="events",
                          partition=0, offset=offset, timestamp_ms=5)  # fmt: skip
    assert publisher.pending_failures() == 2
    publisher.flush()  # re-sends both; they succeed now
    assert publisher.pending_failures() == 0
    assert [s["topic"] for s in producer.sent] == ["events.dlq"] * 4
    producer.fail = {4, 5}  # the next letter fails, and its re-send fails too
    publisher.publish(key=b"k", value=b"v", reason="bad_type", detail="d", source_topic="events",
                      partition=0, offset=3, timestamp_ms=None)  # fmt: skip
    with pytest.raises(DeadLetterError, match="could not be delivered"):
        publisher.flush()
    assert publisher.pending_failures() == 1  # kept: a later flush retries it
    publisher.flush()
    assert publisher.pending_failures() == 0
    headers = dict(producer.sent[-1]["headers"])
    assert headers["tgnstream.source.offset"] == b"3" and headers["tgnstream.dlq.reason"] == b"bad_type"
