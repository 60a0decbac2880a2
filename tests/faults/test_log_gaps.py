"""The broker goes away, comes back empty, or the topic is recreated: nothing is skipped
silently, and an unreachable broker is visible."""

from __future__ import annotations

import re
import time

import pytest

from .conftest import LINK_PREDICTION, NOT_SERVING, SERVING, produce, server_config, stream, wait_for

pytestmark = pytest.mark.faults


def _replace_broker(broker, records: int) -> None:
    """Stop the broker and start an empty one on the same port with ``records`` new events."""
    broker.stop()
    broker.start()
    produce(broker.bootstrap, stream(records, start_ts=10_000.0, offset=7))


def test_broker_replaced_empty_stops_the_server_with_a_clear_message(broker, servers, tmp_path):
    """Policy fail (default): the log now ends before the applied offset. The server exits 1
    saying what happened, and does so again on restart: it never reads the new log from the
    old offset. (Before: it kept the old offsets, skipped the new records, lag 0, no log line.)"""
    produce(broker.bootstrap, stream(3000))
    server = servers(server_config(tmp_path, broker.bootstrap)).start()
    server.wait_offset(3000)
    _replace_broker(broker, 100)
    assert server.wait_exit(90) == 1
    log = server.log()
    assert "Refusing to skip or re-read records silently" in log and "events[0] at offset 3000" in log
    server.start(wait=False)
    assert server.wait_exit(90) == 1
    assert "Refusing to skip" in server.log()


def test_broker_replaced_empty_with_policy_reset_reads_the_new_log_from_its_start(broker, servers, tmp_path):
    """Policy reset: the position moves to the new log's start with a loud log line and a metric,
    and the new records are applied on top of the state."""
    produce(broker.bootstrap, stream(3000))
    config = server_config(tmp_path, broker.bootstrap, ingest={"on_log_gap": "reset"})
    server = servers(config).start()
    server.wait_offset(3000)
    _replace_broker(broker, 100)
    wait_for(lambda: server.info().events_applied == 3100, 90, "the new log's 100 events")
    info = server.info()
    assert dict(info.next_offsets) == {0: 100}
    assert server.metric("tgnstream_ingest_log_resets_total", topic="events", partition="0") == 1
    assert "LOG GAP on events[0]" in server.log()
    server.wait_ready()


def test_topic_recreated_with_more_records_than_the_position_is_not_read_from_the_old_offset(
    broker, servers, tmp_path
):
    """The topic is recreated and refilled past the old position while the broker is away: the
    topic id changed (or the log end moved back), so the server refuses to continue."""
    produce(broker.bootstrap, stream(3000))
    server = servers(server_config(tmp_path, broker.bootstrap)).start()
    server.wait_offset(3000)
    _replace_broker(broker, 5000)
    assert server.wait_exit(90) == 1
    assert re.search(r"topic was recreated|log now ends at offset", server.log())


def test_broker_down_is_visible_in_gauge_readiness_lag_and_a_quiet_log(broker, servers, tmp_path):
    """While the broker is unreachable: tgnstream_ingest_connected 0, /readyz 503 naming
    broker_unreachable, LinkPrediction health NOT_SERVING, /livez 200, lag measured against the
    last known log end (not 0) while records are still being applied, and connection errors
    logged a few times with backoff, not once per attempt. It all recovers when the broker
    returns (here with policy reset, since the embedded broker comes back empty)."""
    produce(broker.bootstrap, stream(30_000))
    config = server_config(
        tmp_path,
        broker.bootstrap,
        # One event per batch and quality scored on each: slow enough to still be applying
        # records (fetched before the outage) while the broker is away.
        ingest={"batch_max_events": 1, "on_log_gap": "reset", "quality": {"min_interval_ms": 0}},
        health={"ready_max_lag_records": 1_000_000},
    )
    server = servers(config).start()
    server.wait_applied(2000)
    started_outage = len(server.log())
    broker.stop()
    wait_for(lambda: server.metric("tgnstream_ingest_connected") == 0, 20, "connected gauge 0")
    status, body = server.http("/readyz")
    assert status == 503 and "broker_unreachable" in body
    assert server.health(LINK_PREDICTION) == NOT_SERVING
    assert server.http("/livez")[0] == 200
    before = server.info().next_offsets[0]  # still applying records fetched before the outage
    lag = server.metric("tgnstream_ingest_lag_records", topic="events", partition="0")
    after = server.info().next_offsets[0]
    assert after < 30_000 and 30_000 - after <= lag <= 30_000 - before, (before, lag, after)
    time.sleep(12)
    outage_log = server.log()[started_outage:]
    noisy = [
        line
        for line in outage_log.splitlines()
        if re.search(r"Connect to|[Cc]onnection refused|ECONNREFUSED|brokers are down", line)
    ]
    assert len(noisy) <= 15, "\n".join(noisy[:40])
    broker.start()
    produce(broker.bootstrap, stream(10, start_ts=50_000.0))
    wait_for(lambda: server.metric("tgnstream_ingest_connected") == 1, 60, "connected again")
    server.wait_ready()
    assert server.health(LINK_PREDICTION) == SERVING
