"""``KafkaSource`` never skips silently: a log that moved behind the applied position is
detected (log end before the position, records deleted by retention, a recreated topic, the
broker saying out of range) and the policy applied. Against a fake client over an in-memory log,
checked against the offsets each case must produce."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tgnstream.ingest.config import IngestConfig
from tgnstream.stream import source as source_module
from tgnstream.stream.consumers import Columns, OffsetOutOfRange
from tgnstream.stream.source import KafkaSource, LogGapError


class FakeLog:
    """One partition: offsets ``start..end-1`` exist; ``topic_id`` names this incarnation."""

    def __init__(self, start: int, end: int, topic_id: str = "t-1"):
        self.start, self.end, self.topic_id = start, end, topic_id
        self.connected = True
        self.out_of_range = False


class FakeClient:
    def __init__(self, log: FakeLog):
        self.log = log
        self.pos = 0
        self.hw: int | None = None
        self.seeks: list[dict] = []

    def partitions(self):
        return [0]

    def assign(self, start_offsets):
        self.pos = self.log.start if start_offsets[0] is None else start_offsets[0]
        return {0: self.pos}

    def poll(self, timeout_ms):
        if self.log.out_of_range:
            self.log.out_of_range = False
            raise OffsetOutOfRange(0, "Broker: Offset out of range")
        self.hw = self.log.end
        got = [SimpleNamespace(offset=o) for o in range(self.pos, min(self.pos + 10, self.log.end))]
        if got:
            self.pos = got[-1].offset + 1
        return got

    def position(self, partition):
        return self.pos

    def highwater(self, partition):
        return self.hw

    def columns(self, records):
        n = len(records)
        return Columns(
            values=[b"{}"] * n,
            keys=[None] * n,
            partitions=np.zeros(n, np.int32),
            offsets=np.array([r.offset for r in records], np.int64),
            timestamps_ms=np.zeros(n, np.int64),
        )

    def seek(self, positions):
        self.seeks.append(dict(positions))
        self.pos = positions[0]

    def log_start(self, partition):
        return self.log.start

    def topic_id(self):
        return self.log.topic_id

    def connected(self):
        return self.log.connected

    def commit(self, offsets):
        pass

    def close(self):
        pass


def _source(monkeypatch, log: FakeLog, policy: str, start: dict | None, topic_id: str | None = None):
    client = FakeClient(log)
    monkeypatch.setattr(source_module, "open_consumer", lambda config: client)
    config = IngestConfig(batch_max_events=10, batch_max_wait_ms=1, poll_timeout_ms=1, on_log_gap=policy)
    return KafkaSource(config, start, topic_id), client


def _drain(src: KafkaSource) -> list[int]:
    offsets = []
    for _ in range(100):
        batch = src.next_batch()
        if batch is not None:
            offsets += batch.records.offsets.tolist()
    return offsets


def test_a_clean_log_is_read_without_any_reset(monkeypatch):
    src, _ = _source(monkeypatch, FakeLog(0, 35), "fail", {0: 5}, "t-1")
    assert _drain(src) == list(range(5, 35)) and src.resets == []


@pytest.mark.parametrize("policy", ["fail", "reset"])
def test_log_end_behind_the_position(monkeypatch, policy):
    log = FakeLog(0, 30)
    src, client = _source(monkeypatch, log, policy, {0: 0})
    assert _drain(src) == list(range(30))
    log.end = 12  # the broker came back with a shorter log (same topic id: an empty broker)
    if policy == "fail":
        with pytest.raises(
            LogGapError, match=r"log now ends at offset 12, before the 30 records already read"
        ):
            _drain(src)
        return
    assert _drain(src) == list(range(12))  # the new log from its start, nothing else
    assert [(r.old, r.new) for r in src.resets] == [(30, 0)]
    assert src.next_offsets == {0: 12}


@pytest.mark.parametrize("policy", ["fail", "reset"])
def test_records_deleted_by_retention_before_they_were_applied(monkeypatch, policy):
    log = FakeLog(100, 130)
    if policy == "fail":
        with pytest.raises(LogGapError, match=r"records 40\.\.99 were deleted"):
            _source(monkeypatch, log, policy, {0: 40})
        return
    src, _ = _source(monkeypatch, log, policy, {0: 40})
    assert [(r.old, r.new) for r in src.resets] == [(40, 100)]
    assert _drain(src) == list(range(100, 130))


@pytest.mark.parametrize("policy", ["fail", "reset"])
def test_a_recreated_topic_is_not_read_from_the_old_offset(monkeypatch, policy):
    log = FakeLog(0, 500, topic_id="t-2")  # longer than the old position: only the id tells
    if policy == "fail":
        with pytest.raises(
            LogGapError, match="topic was recreated: its id is t-2, the state was built from topic id t-1"
        ):
            _source(monkeypatch, log, policy, {0: 300}, "t-1")
        return
    src, _ = _source(monkeypatch, log, policy, {0: 300}, "t-1")
    assert [(r.old, r.new) for r in src.resets] == [(300, 0)] and src.topic_id == "t-2"


def test_a_topic_recreated_while_the_broker_was_away_is_detected_on_reconnect(monkeypatch):
    log = FakeLog(0, 20)
    src, _ = _source(monkeypatch, log, "fail", {0: 0})
    assert _drain(src) == list(range(20))
    log.connected = False
    _drain(src)
    log.connected, log.topic_id, log.end = True, "t-9", 400
    with pytest.raises(LogGapError, match=r"recreated while unreachable \(id t-1 -> t-9\)"):
        _drain(src)


def test_out_of_range_from_the_broker_applies_the_policy(monkeypatch):
    log = FakeLog(0, 20)
    src, client = _source(monkeypatch, log, "reset", {0: 0})
    assert _drain(src) == list(range(20))
    log.start, log.end, log.out_of_range = 50, 60, True
    assert _drain(src) == list(range(50, 60))
    assert [(r.old, r.new) for r in src.resets] == [(20, 50)] and client.seeks[-1] == {0: 50}
