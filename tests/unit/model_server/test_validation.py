"""Every bad request -> INVALID_ARGUMENT with a message; bugs -> INTERNAL; the server stays up."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tgnstream.core.idmap import MAX_ID_BYTES
from tgnstream.model_server import convert
from tgnstream.model_server.config import GrpcConfig
from tgnstream.rpc.v1 import link_prediction_pb2 as pb

P = pb.Pair
OK_PAIR = P(src="user-0", dst="page-0")
NAN, INF = float("nan"), float("inf")
LONG = "x" * 2000
EMOJI = "\U0001f600"  # 4 bytes of UTF-8
assert MAX_ID_BYTES == 512  # the messages below spell it out

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
    # Ids longer than ingest accepts (MAX_ID_BYTES bytes of UTF-8).
    (
        "Score",
        pb.ScoreRequest(pairs=[OK_PAIR] * 3 + [P(src="user-1", dst=LONG)]),
        "pairs[3].dst is 2000 bytes of UTF-8, more than the 512 allowed",
    ),
    (
        "Score",
        pb.ScoreRequest(pairs=[P(src="x" * 513, dst="page-1")]),
        "pairs[0].src is 513 bytes of UTF-8, more than the 512 allowed",
    ),
    ("TopK", pb.TopKRequest(src=LONG, k=3), "src is 2000 bytes of UTF-8, more than the 512 allowed"),
    (
        "TopK",
        pb.TopKRequest(src="user-0", k=3, candidates=["page-1", "page-2", "\u20ac" * 200]),
        "candidates[2] is 600 bytes of UTF-8, more than the 512 allowed",
    ),
    (
        "Embed",
        pb.EmbedRequest(nodes=["user-1", EMOJI * 129]),
        "nodes[1] is 516 bytes of UTF-8, more than the 512 allowed",
    ),
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


CFG = GrpcConfig(max_pairs=10, max_k=5, max_candidates=10, max_embed_nodes=10)


def _parse_all(ident: str) -> None:
    """The id in every id field of every request kind."""
    convert.parse_score(pb.ScoreRequest(pairs=[P(src=ident, dst="b")]), CFG)
    convert.parse_score(pb.ScoreRequest(pairs=[P(src="a", dst=ident)]), CFG)
    convert.parse_topk(pb.TopKRequest(src=ident, k=1), CFG)
    convert.parse_topk(pb.TopKRequest(src="a", k=1, candidates=["b", ident]), CFG)
    convert.parse_embed(pb.EmbedRequest(nodes=["a", ident]), CFG)


@pytest.mark.parametrize(
    "ident",
    [
        "x" * 512,  # ASCII at the limit
        "\u00e9" * 256,  # 2-byte characters: 512 bytes
        EMOJI * 128,  # 4-byte characters, as many as the cheap screen lets through unmeasured
        "\u20ac" * 170 + "ab",  # 3-byte characters: 512 bytes
    ],
)
def test_id_of_exactly_max_id_bytes_is_accepted(ident):
    assert len(ident.encode()) == MAX_ID_BYTES
    _parse_all(ident)


@pytest.mark.parametrize(
    "ident,size",
    [
        ("x" * 513, 513),
        ("\u00e9" * 256 + "x", 513),
        ("\u20ac" * 200, 600),  # 200 characters, more than 512 bytes
        (EMOJI * 129, 516),  # just past the screen: measured, refused
        ("x" * 10_000_000, 10_000_000),
    ],
    ids=["ascii-513", "2byte-513", "3byte-200chars", "4byte-129chars", "10MB"],
)
def test_id_longer_than_max_id_bytes_is_refused_in_every_field(ident, size):
    too_long = f"is {size} bytes of UTF-8, more than the 512 allowed"
    cases = [
        (
            convert.parse_score,
            pb.ScoreRequest(pairs=[P(src="a", dst="b"), P(src=ident, dst="b")]),
            "pairs[1].src",
        ),
        (
            convert.parse_score,
            pb.ScoreRequest(pairs=[P(src="a", dst="b"), P(src="a", dst=ident)]),
            "pairs[1].dst",
        ),
        (convert.parse_topk, pb.TopKRequest(src=ident, k=1), "src"),
        (convert.parse_topk, pb.TopKRequest(src="a", k=1, candidates=["b", "c", ident]), "candidates[2]"),
        (convert.parse_embed, pb.EmbedRequest(nodes=[ident]), "nodes[0]"),
    ]
    for parse, request_, field in cases:
        with pytest.raises(convert.RequestError) as err:
            parse(request_, CFG)
        assert str(err.value) == f"{field} {too_long}"


def test_ids_at_the_limit_are_served(served):
    """End to end: a 512-byte id is a valid (unknown, cold-start) node id, not an error."""
    ident = "\u00e9" * 256
    reply = served.stub.Score(pb.ScoreRequest(pairs=[P(src=ident, dst="page-0")]), timeout=5)
    assert list(reply.src_unknown) == [True]
    other = "x" * 512
    topk = served.stub.TopK(pb.TopKRequest(src=ident, k=2, candidates=["page-0", other]), timeout=5)
    assert {r.id: r.unknown for r in topk.results} == {"page-0": False, other: True}
    embed = served.stub.Embed(pb.EmbedRequest(nodes=[ident]), timeout=5)
    assert [e.id for e in embed.embeddings] == [ident] and embed.embeddings[0].unknown
