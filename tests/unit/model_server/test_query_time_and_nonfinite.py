"""Query times outside what the state can answer for are INVALID_ARGUMENT; a NaN/inf result is
never sent as OK (INTERNAL, counted). Against a real gRPC server on loopback."""

from __future__ import annotations

import grpc
import pytest
import torch

from tgnstream.model_server.config import GrpcConfig
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.runtime.live import LiveEngine

from .conftest import TEST_CONFIG, feed, make_engine, make_stream, node_name, serve, shutdown

SLACK = 100.0


@pytest.fixture(scope="module")
def timed():
    engine = make_engine()
    feed(engine, make_stream())
    s = serve(LiveEngine(engine, "v-time", {0: 600}), GrpcConfig(**TEST_CONFIG, query_time_slack_s=SLACK))
    yield s
    shutdown(s)


def _calls(stub, t):
    pair = pb.Pair(src=node_name(0), dst=node_name(45))
    return {
        "Score": lambda: stub.Score(pb.ScoreRequest(pairs=[pair], time=t)),
        "TopK": lambda: stub.TopK(pb.TopKRequest(src=node_name(0), k=3, time=t)),
        "TopK explicit": lambda: stub.TopK(
            pb.TopKRequest(src=node_name(0), k=2, candidates=[node_name(41), node_name(42)], time=t)
        ),
        "Embed": lambda: stub.Embed(pb.EmbedRequest(nodes=[node_name(0)], time=t)),
    }


def test_times_within_the_span_are_answered(timed):
    first, wm = float(timed.engine.first_event_time), float(timed.engine.watermark)
    assert first < wm
    for t in (first - SLACK, first, (first + wm) / 2, wm, wm + SLACK):
        for name, call in _calls(timed.stub, t).items():
            reply = call()
            assert reply.state.events_applied == 600, name


@pytest.mark.parametrize("shift", ["before", "after", "huge", "enormous"])
def test_times_outside_the_span_are_invalid_argument(timed, shift):
    first, wm = float(timed.engine.first_event_time), float(timed.engine.watermark)
    t = {"before": first - SLACK - 1, "after": wm + SLACK + 1, "huge": 1e39, "enormous": -1e300}[shift]
    for name, call in _calls(timed.stub, t).items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "time" in err.value.details(), name


def test_an_empty_state_answers_any_time_within_the_absolute_bound():
    s = serve(LiveEngine(make_engine(), "v-empty", {}), GrpcConfig(**TEST_CONFIG, query_time_slack_s=SLACK))
    try:
        pair = pb.Pair(src="a", dst="b")
        reply = s.stub.Score(pb.ScoreRequest(pairs=[pair], time=1e9))
        assert len(reply.probabilities) == 1
        with pytest.raises(grpc.RpcError) as err:
            s.stub.Score(pb.ScoreRequest(pairs=[pair], time=1e12))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        shutdown(s)


def test_a_nan_result_is_internal_and_counted_never_ok():
    engine = make_engine()
    feed(engine, make_stream())
    with torch.no_grad():
        engine.model.decoder.lin_out.bias.fill_(float("nan"))  # a damaged checkpoint
    s = serve(LiveEngine(engine, "v-nan", {0: 600}), GrpcConfig(**TEST_CONFIG))
    try:
        for name, call in _calls(s.stub, None).items():
            if name == "Embed":
                continue  # the embedding does not use the decoder: it stays finite and is answered
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INTERNAL, name
            assert "non-finite" in err.value.details(), name
        assert s.stub.Embed(pb.EmbedRequest(nodes=[node_name(0)])).dim == 16
        nonfinite = s.metrics.nonfinite
        assert nonfinite.labels("score")._value.get() == 1
        assert nonfinite.labels("topk")._value.get() == 2
        with torch.no_grad():
            engine.memory.memory[0].fill_(float("inf"))
        with pytest.raises(grpc.RpcError) as err:
            s.stub.Embed(pb.EmbedRequest(nodes=[node_name(0)]))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert nonfinite.labels("embed")._value.get() == 1
    finally:
        shutdown(s)
