"""Reader processes (grpc.readers = 2) under faults: a reader killed mid-load is restarted while
the other keeps answering; a killed serving process takes its readers with it."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import grpc
import pytest

from tgnstream.rpc.v1 import link_prediction_pb2 as pb

from .conftest import produce, server_config, stream

pytestmark = pytest.mark.faults


def _reader_pids(log: str) -> dict[int, int]:
    """reader index -> pid, from the readers' start-up lines (the newest per index)."""
    return {int(i): int(pid) for i, pid in re.findall(r"reader (\d+) \(pid (\d+)\) answering", log)}


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" in status.read_text().lower()


def _score(server, attempts: int = 1) -> pb.ScoreResponse:
    """One Score on a new connection; ``attempts`` > 1 retries UNAVAILABLE as clients should."""
    for attempt in range(attempts):
        try:
            with server.channel() as ch:
                request = pb.ScoreRequest(pairs=[pb.Pair(src="u1", dst="p1")])
                return server.stub(ch).Score(request, timeout=10)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def test_a_killed_reader_is_restarted_and_a_killed_server_takes_its_readers_along(broker, servers, tmp_path):
    produce(broker.bootstrap, stream(3000))
    server = servers(server_config(tmp_path, broker.bootstrap, grpc={"readers": 2})).start()
    server.wait_applied(3000)
    readers = _reader_pids(server.log())
    assert sorted(readers) == [0, 1], server.log()[-2000:]
    assert _score(server).state.events_applied == 3000

    server_pid = server.proc.pid
    assert readers[0] in server.children() and readers[1] in server.children()
    os.kill(readers[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _gone(readers[0]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # The other reader keeps answering meanwhile. (A connection the kernel had already queued
    # on the dead reader's socket is reset: UNAVAILABLE, which clients retry.)
    for _ in range(5):
        assert _score(server, attempts=3).state.events_applied == 3000
    deadline = time.monotonic() + 30
    while (
        server.metric("tgnstream_reader_restarts_total") != 1 or server.metric("tgnstream_readers_alive") != 2
    ):
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)
    assert "reader 0 died" in server.log()
    deadline = time.monotonic() + 30
    while _reader_pids(server.log()).get(0) == readers[0]:
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)
    restarted = _reader_pids(server.log())
    for _ in range(10):  # every new connection lands on a working reader
        assert _score(server).state.events_applied == 3000

    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    deadline = time.monotonic() + 15
    for pid in restarted.values():
        while not _gone(pid):
            assert time.monotonic() < deadline, f"reader {pid} outlived its server {server_pid}"
            time.sleep(0.1)
    with pytest.raises(grpc.RpcError):
        _score(server)
