"""Hostile records and query times: nothing non-finite or absurd reaches the model."""

from __future__ import annotations

import math
import signal

import grpc
import pytest

from tgnstream.ingest.dlq import read_dead_letters
from tgnstream.rpc.v1 import link_prediction_pb2 as pb

from .conftest import LINK_PREDICTION, SERVING, event, produce, server_config, stream

pytestmark = pytest.mark.faults


def _all_finite_answers(server) -> None:
    """Score/TopK/Embed at the default time are OK and finite, and health is SERVING."""
    server.wait_ready()
    with server.channel() as ch:
        stub = server.stub(ch)
        pairs = [pb.Pair(src=f"u{i}", dst=f"p{i % 20}") for i in range(50)]
        probs = list(stub.Score(pb.ScoreRequest(pairs=pairs), timeout=10).probabilities)
        assert len(probs) == 50 and all(math.isfinite(p) and 0 < p < 1 for p in probs), probs[:5]
        top = stub.TopK(pb.TopKRequest(src="u1", k=5), timeout=10)
        assert len(top.results) == 5 and all(math.isfinite(r.probability) for r in top.results)
        emb = stub.Embed(pb.EmbedRequest(nodes=["u1", "p1"]), timeout=10)
        assert all(math.isfinite(v) for e in emb.embeddings for v in e.values)
    assert server.health(LINK_PREDICTION) == SERVING, server.http("/readyz")


def test_an_event_at_1e300_is_dead_lettered_and_answers_stay_finite_across_a_restart(
    broker, servers, tmp_path
):
    """A finite but absurd ts (1e300) goes to the DLQ as ts_out_of_range; every answer stays
    finite, also after a restart from the snapshot. (Before: every Score NaN, TopK empty, OK.)"""
    produce(broker.bootstrap, stream(2000) + [event("u1", "p1", 1e300)] + stream(500, 2000, 2000))
    server = servers(server_config(tmp_path, broker.bootstrap)).start()
    server.wait_offset(2501)
    assert server.info().events_applied == 2500
    assert server.info().watermark == 2499.0
    _all_finite_answers(server)
    letters = read_dead_letters(broker.bootstrap, "events.dlq", timeout=30)
    assert [(d["offset"], d["reason"]) for d in letters] == [(2000, "ts_out_of_range")]
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    server.start()
    server.wait_offset(2501)
    _all_finite_answers(server)


def test_a_millisecond_timestamp_cannot_move_the_watermark(broker, servers, tmp_path):
    """One event with ts in milliseconds (the next valid second x 1000) is dead-lettered as
    too_far_ahead; the valid events after it are applied at their own times, none clamped.
    (Before: the watermark jumped ahead and every later valid event was clamped.)"""
    produce(broker.bootstrap, stream(2000) + [event("u1", "p1", 2000 * 1000.0)] + stream(500, 2000, 2000))
    server = servers(server_config(tmp_path, broker.bootstrap)).start()
    server.wait_offset(2501)
    info = server.info()
    assert info.events_applied == 2500 and info.watermark == 2499.0
    assert server.metric("tgnstream_ingest_events_total", result="late_clamped") == 0
    assert server.metric("tgnstream_ingest_dlq_total", reason="too_far_ahead") == 1
    letters = read_dead_letters(broker.bootstrap, "events.dlq", timeout=30)
    assert [(d["offset"], d["reason"]) for d in letters] == [(2000, "too_far_ahead")]
    _all_finite_answers(server)


def test_query_times_outside_the_stream_are_invalid_argument(broker, servers, tmp_path):
    """time >= 1e39, or far before the first event, is INVALID_ARGUMENT with a message; a time
    an hour past the watermark is answered. (Before: OK with NaN, or silently time 0.)"""
    produce(broker.bootstrap, stream(1000, start_ts=1_700_000_000.0))
    server = servers(server_config(tmp_path, broker.bootstrap)).start()
    server.wait_offset(1000)
    pair = [pb.Pair(src="u1", dst="p1")]
    with server.channel() as ch:
        stub = server.stub(ch)
        for t in (1e39, 1e300, 1_700_000_000.0 - 3 * 86_400, 0.0):
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(pb.ScoreRequest(pairs=pair, time=t), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, t
            assert "time" in err.value.details()
        reply = stub.Score(pb.ScoreRequest(pairs=pair, time=1_700_000_999.0 + 3600), timeout=10)
        assert math.isfinite(reply.probabilities[0])
    assert server.health(LINK_PREDICTION) == SERVING


def test_every_kind_of_malformed_record_is_dead_lettered_with_its_reason(broker, servers, tmp_path):
    """One record per rejection reason between valid ones: each lands in the DLQ with its
    reason and offset; the valid ones are all applied; the server stays SERVING."""
    bad = {
        "null_value": None,
        "invalid_json": b"{nope",
        "invalid_utf8": b'{"src":"\xff","dst":"b","ts":1}',
        "not_an_object": b"[1,2]",
        "missing_field": b'{"src":"a","dst":"b"}',
        "bad_type": b'{"src":["a"],"dst":"b","ts":1}',
        "empty_id": b'{"src":"","dst":"b","ts":1}',
        "id_too_long": event("x" * 600, "b", 1.0),
        "non_finite_ts": b'{"src":"a","dst":"b","ts":NaN}',
        "ts_out_of_range": event("a", "b", 1.7e12),
        "feature_length": b'{"src":"a","dst":"b","ts":1,"features":[1.0]}',
        "bad_label": b'{"src":"a","dst":"b","ts":1,"label":"x"}',
        "self_loop": event("a", "a", 1.0),
        "oversized": b'{"src":"a","dst":"b","ts":1,"pad":"' + b"x" * 70_000 + b'"}',
        "too_late": event("u1", "p1", -1_000_000.0),
        "too_far_ahead": event("u1", "p1", 10_000_000.0),
    }
    values, expected, at = [], {}, 0
    for reason, value in bad.items():
        values += stream(100, start_ts=at * 1.0, offset=at)
        at += 100
        expected[len(values)] = reason
        values.append(value)
    values += stream(100, start_ts=at * 1.0, offset=at)
    produce(broker.bootstrap, values)
    config = server_config(tmp_path, broker.bootstrap, ingest={"max_lateness_s": 3600.0})
    server = servers(config).start()
    server.wait_offset(len(values))
    assert server.info().events_applied == len(values) - len(bad)
    letters = read_dead_letters(broker.bootstrap, "events.dlq", timeout=30)
    assert {d["offset"]: d["reason"] for d in letters} == expected
    for reason in bad:
        assert server.metric("tgnstream_ingest_dlq_total", reason=reason) == 1, reason
    _all_finite_answers(server)


def test_new_nodes_past_ingest_max_nodes_are_dead_lettered_and_the_state_stays_bounded(
    broker, servers, tmp_path
):
    """ingest.max_nodes = 60 with 70 distinct ids in the stream (u0..u49, p0..p19): every event
    that would add a node past 60 goes to the DLQ as node_limit, counted; events between known
    nodes are applied; the same decisions after a restart (a function of the log)."""
    produce(broker.bootstrap, stream(2000))
    server = servers(server_config(tmp_path, broker.bootstrap, ingest={"max_nodes": 60})).start()
    server.wait_offset(2000)
    info = server.info()
    limited = int(server.metric("tgnstream_ingest_dlq_total", reason="node_limit"))
    assert info.num_nodes == 60 and limited > 0 and info.events_applied == 2000 - limited
    letters = read_dead_letters(broker.bootstrap, "events.dlq", timeout=30)
    assert {d["reason"] for d in letters} == {"node_limit"} and len(letters) == limited
    # Offline, in log order: the ids of the first 60 distinct nodes; an event is kept iff both
    # of its ids are among them once it is reached (the stream adds one new id at a time here).
    seen, kept = [], 0
    for i in range(2000):
        pair = [f"u{i % 50}", f"p{i % 20}"]
        fresh = [n for n in pair if n not in seen]
        if len(seen) + len(fresh) <= 60:
            seen += fresh
            kept += 1
    assert info.events_applied == kept
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    server.start()
    server.wait_offset(2000)
    again = server.info()
    assert (again.num_nodes, again.events_applied) == (60, kept)
