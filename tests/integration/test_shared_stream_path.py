"""One Kafka -> batch path for every consumer of the stream (real embedded broker).

The server's ingest loop (fetch process + ``BatchAssembler``), an in-process reader from offset 0
(what the trainer uses) and an in-process reader started at a later batch boundary (what a hot
swap's catch-up does) must get the same batches: the same events in the same order, the same
boundaries, the same rejections. All three are checked against a naive per-record reference
computed from the produced list (fixed-size record batches, bad records dropped, the future
bound against a running maximum, a stable sort by time inside each batch).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from kafka import KafkaProducer

from tgnstream.apps.replay import encode_event
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.idmap import IdMap
from tgnstream.ingest.config import IngestConfig
from tgnstream.ingest.loop import IngestLoop
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.metrics import ServerMetrics
from tgnstream.runtime.snapshots import SnapshotConfig
from tgnstream.stream.batcher import ClosedBatch
from tgnstream.stream.prefetch import Prefetcher
from tgnstream.stream.reader import BatchReader
from tgnstream.stream.records import RecordDecoder

pytestmark = pytest.mark.kafka

BATCH = 150
FUTURE_S = 10_000.0


def _log(n: int = 1_000):
    """(value, reference kind, src, dst, ts) per record: mostly valid events with some out of
    order, plus records every reader must reject."""
    rng = random.Random(11)
    out, t = [], 0.0
    for i in range(n):
        t += rng.random() * 5
        s, d = f"user-{rng.randrange(40)}", f"item-{rng.randrange(25)}"
        ts = t - rng.random() * 30 if i % 9 == 0 else t  # some arrive late (applied, time-sorted)
        if i % 97 == 5:
            out.append((b"{not json", "bad", None, None, None))
        elif i % 89 == 7:
            out.append((encode_event(s, s, ts), "bad", None, None, None))  # self loop
        elif i % 83 == 3:
            far = t + 50 * FUTURE_S  # a broken clock: too far ahead of the running watermark
            out.append((encode_event(s, d, far), "ok", s, d, far))
        else:
            out.append((encode_event(s, d, round(ts, 3)), "ok", s, d, round(ts, 3)))
    return out


def _reference(log, start: int, watermark: float) -> list[list[tuple[str, str, float]]]:
    batches, running = [], watermark
    for b0 in range(start, len(log) - BATCH + 1, BATCH):
        events = []
        for _, kind, s, d, ts in log[b0 : b0 + BATCH]:
            if kind != "ok":
                continue
            if running != float("-inf") and ts > running + FUTURE_S:
                continue
            running = max(running, ts)
            events.append((s, d, ts))
        batches.append(sorted(events, key=lambda e: e[2]))  # sorted() is stable
    return batches


def _named(batch: ClosedBatch, ids: IdMap) -> list[tuple[str, str, float]]:
    e = batch.events
    return list(zip(ids.names(e.src), ids.names(e.dst), e.t.tolist(), strict=True))


def _produce(bootstrap: str, topic: str, log) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    for value, *_ in log:
        producer.send(topic, value=value, partition=0)
    producer.flush(60)
    producer.close()


def _read_all(reader: BatchReader, expected: int) -> list[ClosedBatch]:
    out: list[ClosedBatch] = []
    for _ in range(200):
        out.extend(reader.poll())
        if len(out) >= expected:
            break
    return out


def test_ingest_trainer_and_catch_up_readers_get_the_same_batches(kafka_bootstrap, kafka_topic):
    log = _log()
    _produce(kafka_bootstrap, kafka_topic, log)
    config = IngestConfig(
        kafka={"bootstrap_servers": kafka_bootstrap, "topic": kafka_topic, "group_id": None},
        batch_max_events=BATCH,
        batch_max_wait_ms=50,
        poll_timeout_ms=200,
        max_future_s=FUTURE_S,
        quality={"enabled": False},
    )
    expected = _reference(log, 0, float("-inf"))
    full = len(expected)
    assert full == len(log) // BATCH

    # 1. The server's ingest loop, through its fetch process, applying to a live engine.
    engine = MemoryEngine(ModelConfig.preset("tgn", width=8), 0).eval()
    live = LiveEngine(engine, "v", {})
    fetcher = Prefetcher(config, {0: 0})
    fetcher.start()
    loop = IngestLoop(
        config,
        live,
        fetcher,
        RecordDecoder.from_config(config, 0),
        None,
        None,
        SnapshotConfig(),
        ServerMetrics(),
    )
    applied: list[ClosedBatch] = []
    close = loop._close

    def record_and_apply(batch: ClosedBatch) -> int:
        applied.append(batch)
        return close(batch)

    loop._close = record_and_apply
    try:
        for _ in range(200):
            loop.step()
            if len(applied) == full:
                break
    finally:
        fetcher.stop()
    assert [_named(b, engine.ids) for b in applied] == expected
    assert live.next_offsets == {0: full * BATCH}

    # 2. An in-process reader from offset 0 with its own id map (the trainer's way).
    trainer_ids = IdMap()

    def register(ids: IdMap):
        return lambda names: ids.lookup(names, create=True)[0]

    trainer = BatchReader(config, {0: 0}, 0, float("-inf"), register(trainer_ids))
    try:
        got = _read_all(trainer, full)
    finally:
        trainer.close()
    assert [_named(b, trainer_ids) for b in got] == expected
    # Same names in the same order -> the same dense ids as the server's.
    for a, b in zip(got, applied, strict=True):
        assert torch.equal(a.events.src, b.events.src) and torch.equal(a.events.dst, b.events.dst)
        assert torch.equal(a.events.t, b.events.t) and a.next_offsets == b.next_offsets
    assert trainer.next_offsets == {0: full * BATCH}
    bad = sum(1 for _, kind, *_ in log[: full * BATCH] if kind == "bad")
    too_far = sum(1 for _, kind, *_ in log[: full * BATCH] if kind == "ok") - sum(len(b) for b in expected)
    assert too_far > 0 and bad > 0
    assert sum(trainer.rejected.values()) == bad + too_far
    assert trainer.rejected["too_far_ahead"] == too_far

    # 3. A catch-up from a later batch boundary, starting at that prefix's watermark.
    start = 2 * BATCH
    watermark = max(t for batch in expected[:2] for _, _, t in batch)
    catch_up_ids = IdMap()
    catch_up = BatchReader(config, {0: start}, 0, watermark, register(catch_up_ids))
    try:
        later = _read_all(catch_up, full - 2)
    finally:
        catch_up.close()
    assert [_named(b, catch_up_ids) for b in later] == expected[2:] == _reference(log, start, watermark)
    assert [b.next_offsets for b in later] == [b.next_offsets for b in applied[2:]]
    assert Counter(b.records for b in later) == Counter({BATCH: full - 2})


def test_a_reader_names_where_it_stands(kafka_bootstrap, kafka_topic):
    log = _log(400)
    _produce(kafka_bootstrap, kafka_topic, log)
    config = IngestConfig(
        kafka={"bootstrap_servers": kafka_bootstrap, "topic": kafka_topic, "group_id": None},
        batch_max_events=BATCH,
        poll_timeout_ms=200,
        max_future_s=FUTURE_S,
    )
    ids = IdMap()
    reader = BatchReader(config, {0: 0}, 0, float("-inf"), lambda names: ids.lookup(names, create=True)[0])
    try:
        got = _read_all(reader, 2)
        assert len(got) == 2 and reader.next_offsets == {0: 2 * BATCH}
        for _ in range(5):  # the last 100 records never fill a batch: nothing more closes
            assert reader.poll() == []
        assert reader.fetcher.highwater == {0: 400}
        assert reader.lag() == 400 - 2 * BATCH
        assert reader.assembler.open.records == 400 - 2 * BATCH
    finally:
        reader.close()
