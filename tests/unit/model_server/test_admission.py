"""Overload -> RESOURCE_EXHAUSTED quickly (never a hang), health still answers, then recovery."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tgnstream.model_server.admission import Admission
from tgnstream.model_server.config import GrpcConfig
from tgnstream.rpc.v1 import link_prediction_pb2 as pb

from .conftest import TEST_CONFIG, serve, shutdown

REQ = pb.ScoreRequest(pairs=[pb.Pair(src="user-0", dst="page-0")])
LP = {"grpc_type": "unary", "grpc_service": "tgnstream.rpc.v1.LinkPrediction", "grpc_method": "Score"}


def _wait_for(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def test_admission_semaphore_rules():
    adm = Admission(max_inflight=1, max_queued=1, queue_timeout_s=0.2)
    assert adm.acquire()
    t0 = time.monotonic()
    assert not adm.acquire(timeout_s=0.01), "queued wait is capped by the deadline"
    assert time.monotonic() - t0 < 0.15
    # One waiter queues; a second one finds the queue full and is refused at once.
    got = []
    waiter = threading.Thread(target=lambda: got.append(adm.acquire()))
    waiter.start()
    _wait_for(lambda: adm.queued == 1)
    t0 = time.monotonic()
    assert not adm.acquire()
    assert time.monotonic() - t0 < 0.05
    adm.release()  # the waiter gets the slot
    waiter.join()
    assert got == [True] and adm.queued == 0
    adm.release()
    with pytest.raises(ValueError):
        adm.release()  # bounded: more releases than acquires is a bug


def test_overload_is_resource_exhausted_then_recovers(served):
    cfg = GrpcConfig(
        **{**TEST_CONFIG, "max_workers": 5, "max_inflight": 2, "max_queued": 1, "queue_timeout_s": 0.3}
    )
    s = serve(served.live, cfg)
    reg = s.metrics.registry
    try:
        with s.live.write():  # every admitted query now blocks on the read lock ("slow requests")
            blocked = [s.stub.Score.future(REQ, timeout=20) for _ in range(2)]
            _wait_for(lambda: reg.get_sample_value("tgnstream_grpc_inflight_requests") == 2)
            t0 = time.monotonic()
            # no client deadline on these: the queue wait must still be bounded
            rejected = [s.stub.Score.future(REQ) for _ in range(4)]
            codes = []
            for f in rejected:
                with pytest.raises(grpc.RpcError) as err:
                    f.result()
                codes.append(err.value.code())
                assert "overloaded" in err.value.details()
            elapsed = time.monotonic() - t0
            assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
            assert elapsed < 2.0, f"rejections took {elapsed:.2f}s"
            # Health probes are not subject to admission.
            health = health_pb2_grpc.HealthStub(s.channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert not any(f.done() for f in blocked)
        # Writer gone: the blocked ones finish normally, new ones are admitted again.
        assert all(len(f.result().probabilities) == 1 for f in blocked)
        assert len(s.stub.Score(REQ, timeout=5).probabilities) == 1
        assert (
            reg.get_sample_value("grpc_server_handled_total", {**LP, "grpc_code": "RESOURCE_EXHAUSTED"}) == 4
        )
        assert reg.get_sample_value("grpc_server_handled_total", {**LP, "grpc_code": "OK"}) == 3
        assert reg.get_sample_value("tgnstream_grpc_inflight_requests") == 0
    finally:
        shutdown(s)
