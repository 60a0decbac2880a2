"""KafkaSource over both consumer clients, against the records as produced: batch boundaries,
values, keys, offsets, timestamps, next offsets, log ends, starting offsets, several
partitions, and committed offsets."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from tgnstream.ingest.config import IngestConfig
from tgnstream.stream.kafka_admin import create_topic
from tgnstream.stream.source import KafkaSource

pytestmark = pytest.mark.kafka

CLIENTS = ["confluent-kafka", "kafka-python"]


def _produce(bootstrap: str, topic: str, records: list[tuple[int, bytes | None, bytes | None, int]]) -> None:
    """(partition, key, value, timestamp_ms) each; offsets are then 0.. per partition."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    for partition, key, value, ts in records:
        producer.send(topic, key=key, value=value, partition=partition, timestamp_ms=ts)
    producer.flush(60)
    producer.close()


def _drain(source: KafkaSource, n: int) -> list:
    batches, got = [], 0
    while got < n:
        batch = source.next_batch()
        assert batch is not None, f"only {got} of {n} records arrived"
        batches.append(batch)
        got += len(batch.records.values)
    return batches


def _config(bootstrap: str, topic: str, client: str, **kw) -> IngestConfig:
    kafka = {
        "bootstrap_servers": bootstrap,
        "topic": topic,
        "client": client,
        "group_id": kw.pop("group", None),
    }
    return IngestConfig(kafka=kafka, batch_max_wait_ms=100, poll_timeout_ms=200, **kw)


@pytest.mark.parametrize("client", CLIENTS)
def test_batches_carry_the_records_as_produced(client, kafka_bootstrap, kafka_topic):
    n = 1_234
    # Some keys and some values are null (never both: Kafka needs one).
    produced = [
        (
            0,
            f"k{i}".encode() if i % 7 or not i % 11 else None,
            f"v{i}".encode() if i % 11 else None,
            1_000 + i,
        )
        for i in range(n)
    ]
    _produce(kafka_bootstrap, kafka_topic, produced)
    source = KafkaSource(_config(kafka_bootstrap, kafka_topic, client, batch_max_events=500), {0: 0})
    try:
        batches = _drain(source, n)
        # A backlog gives full batches; only the last, caught-up one is short.
        assert [len(b.records.values) for b in batches] == [500, 500, 234]
        values = [v for b in batches for v in b.records.values]
        keys = [k for b in batches for k in b.records.keys]
        offsets = [int(o) for b in batches for o in b.records.offsets]
        stamps = [int(t) for b in batches for t in b.records.timestamps_ms]
        assert values == [v for _, _, v, _ in produced]
        assert keys == [k for _, k, _, _ in produced]
        assert offsets == list(range(n))
        assert stamps == [t for _, _, _, t in produced]
        assert [b.next_offsets for b in batches] == [{0: 500}, {0: 1000}, {0: n}]
        assert source.highwaters() == {0: n}
        assert source.caught_up()
        assert source.next_batch() is None  # idle: nothing more within the poll timeout
    finally:
        source.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_starts_at_the_given_offset_and_commits(client, kafka_bootstrap, kafka_topic):
    produced = [(0, b"k", f"v{i}".encode(), 5_000 + i) for i in range(300)]
    _produce(kafka_bootstrap, kafka_topic, produced)
    group = f"g-{uuid.uuid4().hex[:8]}"
    cfg = _config(kafka_bootstrap, kafka_topic, client, batch_max_events=1_000, group=group)
    source = KafkaSource(cfg, {0: 120})
    try:
        assert source.next_offsets == {0: 120}
        (batch,) = _drain(source, 180)
        assert batch.records.values == [v for _, _, v, _ in produced[120:]]
        assert batch.next_offsets == {0: 300}
        source.commit({0: 250})
    finally:
        source.close()
    check = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    try:
        assert check.committed(TopicPartition(kafka_topic, 0)) == 250
    finally:
        check.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_several_partitions_from_the_start_or_from_offsets(client, kafka_bootstrap):
    topic = f"parts-{uuid.uuid4().hex[:8]}"
    create_topic(kafka_bootstrap, topic, partitions=3)
    produced = [(i % 3, None, f"p{i % 3}-{i}".encode(), 10_000 + i) for i in range(600)]
    _produce(kafka_bootstrap, topic, produced)
    source = KafkaSource(_config(kafka_bootstrap, topic, client, batch_max_events=10_000), {1: 150})
    try:
        assert source.partitions == [0, 1, 2]
        assert source.next_offsets == {0: 0, 1: 150, 2: 0}
        expected = [r for r in produced if r[0] != 1] + [r for r in produced if r[0] == 1][150:]
        batches = _drain(source, len(expected))
        cols = [b.records for b in batches]
        got = [(int(p), v) for c in cols for p, v in zip(c.partitions, c.values)]
        assert sorted(got) == sorted((p, v) for p, _, v, _ in expected)
        for part in range(3):  # each partition's records stay in log order
            mine = [int(o) for c in cols for p, o in zip(c.partitions, c.offsets) if p == part]
            assert mine == sorted(mine)
        assert batches[-1].next_offsets == {0: 200, 1: 200, 2: 200}
        assert source.highwaters() == {0: 200, 1: 200, 2: 200}
    finally:
        source.close()


def test_unknown_client_name_is_rejected():
    with pytest.raises(ValueError, match="client"):
        IngestConfig(kafka={"client": "librdkafka-turbo"})


@pytest.mark.parametrize("client", CLIENTS)
def test_a_missing_topic_is_reported_within_seconds_with_what_to_do(client, kafka_bootstrap):
    from tgnstream.stream.consumers import TopicNotFoundError

    topic = f"missing-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    with pytest.raises(TopicNotFoundError) as raised:
        KafkaSource(_config(kafka_bootstrap, topic, client))
    assert time.monotonic() - started < 15  # not the 30 s an unanswered metadata request waits
    message = str(raised.value)
    assert f"topic {topic!r} does not exist on {kafka_bootstrap}" in message
    assert f"tgnstream broker --topic {topic}" in message
