"""The plumbing around reader processes: the shared port and the merged metrics exposition."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tgnstream.metrics import ReaderMetrics, ServerMetrics, reader_families
from tgnstream.reader_pool import reserve_port


def test_a_port_another_server_answers_on_is_refused():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(RuntimeError, match="another server already answers"):
            reserve_port("127.0.0.1", busy.getsockname()[1])
    finally:
        busy.close()


def test_a_free_port_is_reserved_for_the_readers_and_can_be_shared():
    sock = reserve_port("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port > 0
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))  # what a reader's grpc server does
        other.close()
    finally:
        sock.close()


def test_reader_series_are_merged_into_one_family_per_name_with_a_reader_label():
    own = ServerMetrics()
    readers = [ServerMetrics(), ServerMetrics()]
    for i, m in enumerate(readers):
        m.grpc_handled.labels("unary", "svc", "Score", "OK").inc(10 + i)
        m.nonfinite.labels("score").inc(i)
        m.ingest_events.labels("applied").inc(99)  # not a reader's: never exported from it
    merged = ReaderMetrics(own.registry)
    for i, m in enumerate(readers):
        merged.update(i, reader_families(m.registry))
    exposition = CollectorRegistry()
    exposition.register(merged)
    text = generate_latest(exposition).decode()
    assert text.count("# TYPE grpc_server_handled_total counter") == 1
    assert (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Score",grpc_service="svc",'
        'grpc_type="unary",reader="1"} 11.0' in text
    )
    assert 'tgnstream_nonfinite_total{reader="1",where="score"} 1.0' in text
    assert 'tgnstream_nonfinite_total{reader="0",where="ingest"}' not in text
    assert 'tgnstream_ingest_events_total{reader="0"' not in text and "reader=" not in "".join(
        line for line in text.splitlines() if line.startswith("tgnstream_ingest_events_total")
    )
