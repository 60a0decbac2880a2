"""Bytes that are not a valid request message -> INVALID_ARGUMENT with a clear message, nothing
logged per request; auth still comes first; every service (LinkPrediction, health, reflection)."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tgnstream.model_server.config import GrpcConfig
from tgnstream.model_server.interceptors import UndecodableInterceptor
from tgnstream.rpc.v1 import link_prediction_pb2 as pb

from .conftest import TEST_CONFIG, serve, shutdown

GARBAGE = b"\xff\xff\xff"  # a field tag with an unterminated varint: never a valid message
LP = "tgnstream.rpc.v1.LinkPrediction"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
TOKEN = "s3cret-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]

LP_METHODS = [
    ("Score", "tgnstream.rpc.v1.ScoreRequest"),
    ("TopK", "tgnstream.rpc.v1.TopKRequest"),
    ("Embed", "tgnstream.rpc.v1.EmbedRequest"),
    ("GetModelInfo", "tgnstream.rpc.v1.GetModelInfoRequest"),
]


def _raw_unary(channel: grpc.Channel, method: str):
    # No serializers: bytes go to the server as they are, and come back as bytes.
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def _invalid(err: pytest.ExceptionInfo, message_type: str) -> None:
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == f"request body is not a valid {message_type} message"


@pytest.fixture
def quiet(caplog, capfd):
    """Yields a check that nothing was logged (any logger, any level) or written to stderr."""
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):

        def check() -> None:
            assert [r.getMessage() for r in caplog.records] == []
            err = capfd.readouterr().err
            assert "Traceback" not in err and "deserializ" not in err, err

        yield check


@pytest.fixture
def plain(served):
    s = serve(served.live, GrpcConfig(**TEST_CONFIG))
    yield s
    shutdown(s)


@pytest.mark.parametrize("method,message_type", LP_METHODS)
def test_undecodable_link_prediction_request(plain, quiet, method, message_type):
    with pytest.raises(grpc.RpcError) as err:
        _raw_unary(plain.channel, f"/{LP}/{method}")(GARBAGE, timeout=5)
    _invalid(err, message_type)
    quiet()
    value = plain.metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {"grpc_type": "unary", "grpc_service": LP, "grpc_method": method, "grpc_code": "INVALID_ARGUMENT"},
    )
    assert value == 1


def test_valid_bytes_through_the_same_raw_call_are_answered(plain):
    """Control: the raw call itself is fine; a well-formed body is answered as usual."""
    body = pb.ScoreRequest(pairs=[pb.Pair(src="user-0", dst="page-0")]).SerializeToString()
    reply = pb.ScoreResponse.FromString(_raw_unary(plain.channel, f"/{LP}/Score")(body, timeout=5))
    assert len(reply.probabilities) == 1


def test_many_undecodable_requests_log_nothing_and_server_keeps_serving(plain, quiet):
    call = _raw_unary(plain.channel, f"/{LP}/Score")
    for _ in range(20):
        with pytest.raises(grpc.RpcError) as err:
            call(GARBAGE, timeout=5)
        _invalid(err, "tgnstream.rpc.v1.ScoreRequest")
    quiet()
    reply = plain.stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src="user-0", dst="page-0")]), timeout=5)
    assert len(reply.probabilities) == 1


def test_auth_is_checked_before_decoding(served, quiet):
    s = serve(served.live, GrpcConfig(**TEST_CONFIG, auth_token=TOKEN))
    try:
        call = _raw_unary(s.channel, f"/{LP}/Score")
        with pytest.raises(grpc.RpcError) as err:
            call(GARBAGE, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            call(GARBAGE, metadata=AUTH, timeout=5)
        _invalid(err, "tgnstream.rpc.v1.ScoreRequest")
        quiet()

        def handled(code: str):
            labels = {"grpc_type": "unary", "grpc_service": LP, "grpc_method": "Score", "grpc_code": code}
            return s.metrics.registry.get_sample_value("grpc_server_handled_total", labels)

        assert handled("UNAUTHENTICATED") == 1
        assert handled("INVALID_ARGUMENT") == 1
        assert handled("INTERNAL") is None
    finally:
        shutdown(s)


def test_undecodable_health_check(plain, quiet):
    with pytest.raises(grpc.RpcError) as err:
        _raw_unary(plain.channel, f"/{HEALTH}/Check")(GARBAGE, timeout=5)
    _invalid(err, "grpc.health.v1.HealthCheckRequest")
    quiet()
    labels = {"grpc_type": "unary", "grpc_service": HEALTH, "grpc_method": "Check"}
    value = plain.metrics.registry.get_sample_value(
        "grpc_server_handled_total", {**labels, "grpc_code": "INVALID_ARGUMENT"}
    )
    assert value == 1
    status = health_pb2_grpc.HealthStub(plain.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_undecodable_health_watch_and_watch_stays_non_blocking(plain, quiet):
    call = plain.channel.unary_stream(f"/{HEALTH}/Watch", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        list(call(GARBAGE, timeout=5))
    _invalid(err, "grpc.health.v1.HealthCheckRequest")
    quiet()
    # A good Watch still streams (and, being callback-driven, is still not metered: it holds
    # no worker thread, which the wrapper must not change).
    stream = health_pb2_grpc.HealthStub(plain.channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    stream.cancel()
    started = plain.metrics.registry.get_sample_value(
        "grpc_server_started_total",
        {"grpc_type": "server_stream", "grpc_service": HEALTH, "grpc_method": "Watch"},
    )
    assert started is None


def test_undecodable_reflection_stream(plain, quiet):
    """Request-streaming: the bad message is refused when the servicer reads it, after the
    good ones before it were answered."""
    call = plain.channel.stream_stream(
        f"/{REFLECTION}/ServerReflectionInfo", request_serializer=None, response_deserializer=None
    )
    from grpc_reflection.v1alpha import reflection_pb2

    good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    replies = call(iter([good, GARBAGE]), timeout=5)
    first = reflection_pb2.ServerReflectionResponse.FromString(next(replies))
    assert LP in [s.name for s in first.list_services_response.service]
    with pytest.raises(grpc.RpcError) as err:
        next(replies)
    _invalid(err, "grpc.reflection.v1alpha.ServerReflectionRequest")
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([GARBAGE]), timeout=5))
    _invalid(err, "grpc.reflection.v1alpha.ServerReflectionRequest")
    quiet()
    labels = {"grpc_type": "bidi_stream", "grpc_service": REFLECTION, "grpc_method": "ServerReflectionInfo"}
    value = plain.metrics.registry.get_sample_value(
        "grpc_server_handled_total", {**labels, "grpc_code": "INVALID_ARGUMENT"}
    )
    assert value == 2


def test_handlers_without_deserializer_are_left_alone():
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    assert UndecodableInterceptor().wrap("/x.Y/Z", handler) is handler


def test_deserializer_returns_a_sentinel_and_never_raises():
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, context: request, request_deserializer=pb.ScoreRequest.FromString
    )
    wrapped = UndecodableInterceptor().wrap(f"/{LP}/Score", handler)
    good = pb.ScoreRequest(pairs=[pb.Pair(src="a", dst="b")])
    assert wrapped.request_deserializer(good.SerializeToString()) == good
    bad = wrapped.request_deserializer(GARBAGE)
    assert bad is wrapped.request_deserializer(b"\x0a")  # one shared sentinel per method
    assert not isinstance(bad, pb.ScoreRequest)

    class Aborted(Exception):
        pass

    class Context:
        def abort(self, code, details):
            self.got = (code, details)
            raise Aborted

    ctx = Context()
    with pytest.raises(Aborted):
        wrapped.unary_unary(bad, ctx)
    assert ctx.got == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "request body is not a valid tgnstream.rpc.v1.ScoreRequest message",
    )
    assert wrapped.unary_unary(good, ctx) is good
