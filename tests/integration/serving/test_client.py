"""``tgnstream.client.LinkPredictionClient`` and ``tgnstream query`` against a live server:
replies equal the raw stub's, the token is sent, errors that retrying cannot fix are raised at
once, and a call made while the server restarts succeeds once it is back; an Embed of the most
nodes a request may ask for is received (over gRPC's 4 MiB default), and a reply over the
client's own limit fails once, without retries."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tgnstream.apps.broker import free_port
from tgnstream.apps.testing import serve_config_dict
from tgnstream.client import LinkPredictionClient
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc

from .conftest import SMALL_MODEL, event_values, produce, serve_config

pytestmark = pytest.mark.kafka

WIKI = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "wikipedia.csv"


def test_client_calls_and_retry_across_a_restart(tmp_path, kafka_bootstrap, kafka_topic, server_factory):
    produce(kafka_bootstrap, kafka_topic, event_values(WIKI, 500))
    port = free_port()
    cfg = serve_config(
        tmp_path, kafka_bootstrap, kafka_topic, grpc={"port": port, "readers": 0, "auth_token": "s3cret"}
    )
    server = server_factory(cfg).start()
    target = f"127.0.0.1:{port}"
    with LinkPredictionClient(target, token="s3cret", retries=3) as client:
        deadline = time.monotonic() + 60
        while client.model_info().events_applied < 500:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert client.health() == "SERVING"
        reply = client.score([("0", "8227"), ("nobody", "8227")], time=2_000.0)
        with grpc.insecure_channel(target) as ch:
            raw = pb_grpc.LinkPredictionStub(ch).Score(
                pb.ScoreRequest(
                    pairs=[pb.Pair(src="0", dst="8227"), pb.Pair(src="nobody", dst="8227")], time=2_000.0
                ),
                metadata=(("authorization", "Bearer s3cret"),),
                timeout=10,
            )
        assert list(reply.probabilities) == list(raw.probabilities) and list(reply.src_unknown) == [
            False,
            True,
        ]
        top = client.top_k("0", k=3, exclude_seen=True)
        assert len(top.results) == 3 and "8227" not in [r.id for r in top.results]
        emb = client.embed(["0", "8227"])
        assert emb.dim > 0 and len(emb.embeddings[0].values) == emb.dim

    # Errors that retrying cannot fix come back at once.
    with LinkPredictionClient(target, retries=5, backoff_s=1.0) as anonymous:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            anonymous.model_info()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() - t0 < 1.0

    # A call made while the server is down succeeds once it is back on the same port.
    assert server.terminate() == 0
    result: dict = {}
    client = LinkPredictionClient(
        target, token="s3cret", retries=30, backoff_s=0.2, max_backoff_s=0.5, timeout_s=2
    )

    def call():
        try:
            result["info"] = client.model_info()
        except grpc.RpcError as e:  # reported below
            result["error"] = e

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(1.0)
    assert caller.is_alive(), "the call should be retrying while the server is down"
    server_factory(cfg).start()
    caller.join(60)
    client.close()
    assert "error" not in result, result.get("error")
    assert result["info"].events_applied == 500


def test_query_command_prints_tables_and_json(tmp_path, kafka_bootstrap, kafka_topic, server_factory):
    produce(kafka_bootstrap, kafka_topic, event_values(WIKI, 600))  # one batch of 500 applied
    server = server_factory(serve_config(tmp_path, kafka_bootstrap, kafka_topic)).start()
    server.wait_applied(600)
    target = f"127.0.0.1:{server.ports['grpc_port']}"
    cli = [sys.executable, "-m", "tgnstream", "query", "--target", target]
    out = subprocess.run(
        [*cli, "--json", "score", "0", "8227", "nobody", "8227"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert len(reply["probabilities"]) == 2 and reply["src_unknown"] == [False, True]
    table = subprocess.run([*cli, "topk", "0", "-k", "3"], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["rank", "dst", "probability", "note"] and len(lines) == 2 + 3 + 1
    info = subprocess.run([*cli, "info"], capture_output=True, text=True, timeout=60)
    assert "events_applied" in info.stdout and "600" in info.stdout
    # Options after the query's name (the README's `tgnstream query info --json`).
    info_json = subprocess.run(
        [sys.executable, "-m", "tgnstream", "query", "info", "--json", "--target", target],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert info_json.returncode == 0, info_json.stderr
    assert json.loads(info_json.stdout)["events_applied"] == "600"  # int64 in JSON: a string
    # Exit status 3: the server cannot be reached.
    down = subprocess.run(
        [sys.executable, "-m", "tgnstream", "query", "--target", "127.0.0.1:1", "--retries", "0", "info"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 3 and "UNAVAILABLE" in down.stderr and "Traceback" not in down.stderr


class CountingInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Counts the attempts the client makes (each goes through the interceptor)."""

    def __init__(self):
        self.methods: list[str] = []

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self.methods.append(client_call_details.method.rsplit("/", 1)[-1])
        return continuation(client_call_details, request)


def test_embed_of_10000_nodes_and_no_retry_of_a_local_error(
    tmp_path, kafka_bootstrap, kafka_topic, server_factory
):
    produce(kafka_bootstrap, kafka_topic, event_values(WIKI, 600))
    model = {**SMALL_MODEL, "memory_dim": 172}  # the reply of 10,000 is ~7 MB, as in the issue
    server = server_factory(serve_config_dict(tmp_path, kafka_bootstrap, kafka_topic, model)).start()
    server.wait_applied(600)
    target = f"127.0.0.1:{server.ports['grpc_port']}"
    nodes = [str(i) for i in range(10_000)]  # the server's max_embed_nodes
    with LinkPredictionClient(target, retries=3, timeout_s=60) as client:
        reply = client.embed(nodes)
    assert len(reply.embeddings) == 10_000 and reply.ByteSize() > 4 * 1024 * 1024

    # A client whose limit is below the reply: RESOURCE_EXHAUSTED from this process, once.
    attempts = CountingInterceptor()
    with LinkPredictionClient(
        target,
        retries=3,
        backoff_s=5.0,
        timeout_s=60,
        max_message_bytes=4 * 1024 * 1024,
        interceptors=[attempts],
    ) as small:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            small.embed(nodes)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in info.value.details()
        assert attempts.methods == ["Embed"] and time.monotonic() - t0 < 5.0
        assert small.model_info(timeout_s=10).events_applied >= 600  # the channel still works
