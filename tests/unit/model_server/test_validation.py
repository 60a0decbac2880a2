"""Every bad request -> INVALID_ARGUMENT with a message; bugs -> INTERNAL; the server stays up."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tgnstream.rpc.v1 import link_prediction_pb2 as pb

P = pb.Pair
OK_PAIR = P(src="user-0", dst="page-0")
NAN, INF = float("nan"), float("inf")

BAD = [
    ("Score", pb.ScoreRequest(), "pairs is empty"),
    ("Score", pb.ScoreRequest(pairs=[OK_PAIR, P(src="", dst="page-1")]), "pairs[1].src is empty"),
    ("Score", pb.ScoreRequest(pairs=[P(src="user-1", dst="")]), "pairs[0].dst is empty"),
    ("Score", pb.ScoreRequest(pairs=[OK_PAIR], time=NAN), "time must be a finite"),
    ("Score", pb.ScoreRequest(pairs=[OK_PAIR], time=-INF), "time must be a finite"),
    ("Score", pb.ScoreRequest(pairs=[OK_PAIR] * 51), "too many pairs: 51 > max_pairs 50"),
    ("TopK", pb.TopKRequest(k=3), "src is empty"),
    ("TopK", pb.TopKRequest(src="user-0", k=0), "k must be in [1, 20], got 0"),
    ("TopK", pb.TopKRequest(src="user-0", k=-4), "got -4"),
    ("TopK", pb.TopKRequest(src="user-0", k=21), "k must be in [1, 20], got 21"),
    ("TopK", pb.TopKRequest(src="user-0", k=3, time=INF), "time must be a finite"),
    (
        "TopK",
        pb.TopKRequest(src="user-0", k=3, candidates=[f"page-{i}" for i in range(31)]),
        "too many candidates",
    ),
    ("TopK", pb.TopKRequest(src="user-0", k=3, candidates=["page-1", ""]), "candidates[1] is empty"),
    (
        "TopK",
        pb.TopKRequest(src="user-0", k=3, candidates=["page-1", "page-2", "page-1"]),
        "'page-1' appears more",
    ),
    (
        "TopK",
        pb.TopKRequest(src="user-0", k=3, candidates=["page-1", "ghost", "spook"], strict=True),
        "unknown candidate ids with strict=true: 'ghost', 'spook'",
    ),
    ("Embed", pb.EmbedRequest(), "nodes is empty"),
    ("Embed", pb.EmbedRequest(nodes=["user-1", ""]), "nodes[1] is empty"),
    ("Embed", pb.EmbedRequest(nodes=["user-1"] * 41), "too many nodes: 41 > max_embed_nodes 40"),
    ("Embed", pb.EmbedRequest(nodes=["user-1"], time=NAN), "time must be a finite"),
]


def _healthy(served) -> None:
    stub = health_pb2_grpc.HealthStub(served.channel)
    for name in ("", "tgnstream.rpc.v1.LinkPrediction"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
    assert len(served.stub.Score(pb.ScoreRequest(pairs=[OK_PAIR]), timeout=5).probabilities) == 1


@pytest.mark.parametrize("method,request_,message", BAD, ids=[f"{m}-{msg[:24]}" for m, _, msg in BAD])
def test_bad_request_is_invalid_argument(served, method, request_, message):
    with pytest.raises(grpc.RpcError) as err:
        getattr(served.stub, method)(request_, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_server_healthy_after_bad_requests(served):
    for method, request_, _ in BAD:
        with pytest.raises(grpc.RpcError):
            getattr(served.stub, method)(request_, timeout=5)
    _healthy(served)


def test_strict_unknown_candidates_from_config(served):
    """With strict off, unknown candidates are served as cold starts."""
    reply = served.stub.TopK(pb.TopKRequest(src="user-0", k=3, candidates=["page-1", "ghost"]))
    assert {r.id: r.unknown for r in reply.results} == {"page-1": False, "ghost": True}


def test_unexpected_error_is_internal_and_server_survives(served, monkeypatch):
    def boom(*_a, **_k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(served.engine, "embed", boom)
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Embed(pb.EmbedRequest(nodes=["user-1"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error in Embed (RuntimeError)"
    monkeypatch.undo()
    assert served.stub.Embed(pb.EmbedRequest(nodes=["user-1"]), timeout=5).dim == 16
    _healthy(served)


def test_oversized_message_is_refused_by_grpc(served):
    """Beyond max_message_bytes grpc itself answers RESOURCE_EXHAUSTED (no hang, no crash)."""
    from tgnstream.model_server.config import GrpcConfig

    from .conftest import TEST_CONFIG, serve, shutdown

    small = serve(served.live, GrpcConfig(**{**TEST_CONFIG, "max_message_bytes": 1024}))
    try:
        with pytest.raises(grpc.RpcError) as err:
            small.stub.Embed(pb.EmbedRequest(nodes=["x" * 2000]), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        _healthy(small)
    finally:
        shutdown(small)
