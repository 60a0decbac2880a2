"""grpc_server_* metrics by code for every RPC kind; reflection lists the services; bind/stop."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tgnstream.model_server.config import GrpcConfig
from tgnstream.model_server.grpc_server import build_server
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc
from tgnstream.runtime.metrics import ServerMetrics

from .conftest import TEST_CONFIG, serve, shutdown

LP = "tgnstream.rpc.v1.LinkPrediction"


def test_handled_total_by_code(served):
    s = serve(served.live, GrpcConfig(**TEST_CONFIG))
    reg = s.metrics.registry

    def value(name, method, service=LP, **extra):
        labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method, **extra}
        return reg.get_sample_value(name, labels) or 0.0

    try:
        for _ in range(3):
            s.stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src="user-1", dst="page-1")]), timeout=5)
        for bad in (pb.ScoreRequest(), pb.ScoreRequest(pairs=[pb.Pair(src="", dst="x")])):
            with pytest.raises(grpc.RpcError):
                s.stub.Score(bad, timeout=5)
        s.stub.TopK(pb.TopKRequest(src="user-1", k=2), timeout=5)
        s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        health_pb2_grpc.HealthStub(s.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        with pytest.raises(grpc.RpcError):  # unknown health service -> NOT_FOUND (also counted)
            health_pb2_grpc.HealthStub(s.channel).Check(
                health_pb2.HealthCheckRequest(service="nope"), timeout=5
            )

        assert value("grpc_server_handled_total", "Score", grpc_code="OK") == 3
        assert value("grpc_server_handled_total", "Score", grpc_code="INVALID_ARGUMENT") == 2
        assert value("grpc_server_started_total", "Score") == 5
        assert value("grpc_server_handling_seconds_count", "Score") == 5
        assert value("grpc_server_handled_total", "TopK", grpc_code="OK") == 1
        assert value("grpc_server_handled_total", "GetModelInfo", grpc_code="OK") == 1
        assert value("grpc_server_handled_total", "Check", "grpc.health.v1.Health", grpc_code="OK") == 1
        assert (
            value("grpc_server_handled_total", "Check", "grpc.health.v1.Health", grpc_code="NOT_FOUND") == 1
        )
        assert reg.get_sample_value("tgnstream_grpc_inflight_requests") == 0

        services = ProtoReflectionDescriptorDatabase(s.channel).get_services()
        assert LP in services and "grpc.health.v1.Health" in services
        # grpc's reflection client ends its stream by cancelling it: counted when the server
        # notices, as CANCELLED.
        refl = {
            "grpc_type": "bidi_stream",
            "grpc_service": "grpc.reflection.v1alpha.ServerReflection",
            "grpc_method": "ServerReflectionInfo",
        }
        handled = lambda code: reg.get_sample_value("grpc_server_handled_total", {**refl, "grpc_code": code})
        deadline = time.monotonic() + 5
        while handled("CANCELLED") is None and handled("OK") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (handled("CANCELLED") or 0) + (handled("OK") or 0) == 1
        assert reg.get_sample_value("grpc_server_started_total", refl) == 1
    finally:
        shutdown(s)


def test_reflection_can_be_disabled(served):
    s = serve(served.live, GrpcConfig(**TEST_CONFIG, reflection=False))
    try:
        with pytest.raises(grpc.RpcError) as err:
            ProtoReflectionDescriptorDatabase(s.channel).get_services()
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        shutdown(s)


def test_graceful_stop_turns_health_not_serving(served):
    s = serve(served.live, GrpcConfig(**TEST_CONFIG))
    s.health.enter_graceful_shutdown()
    status = health_pb2_grpc.HealthStub(s.channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    shutdown(s)
    with grpc.insecure_channel(f"127.0.0.1:{s.port}") as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.LinkPredictionStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=1)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_port_in_use_fails_clearly(served):
    with pytest.raises(ValueError, match="cannot serve gRPC on 127.0.0.1.*port in use"):
        build_server(served.live, GrpcConfig(**{**TEST_CONFIG, "port": served.port}), ServerMetrics())
