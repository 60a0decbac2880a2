"""``tgnstream.client`` and ``tgnstream.aio_client`` against an in-process fake server on
loopback: the receive limit, which errors are retried (and which never are), per-call deadlines,
TLS with a CA file, with the system's roots, and with a client certificate (mTLS).

The same calls against a real ``tgnstream serve``: tests/integration/serving/test_client.py and
test_aio_client.py."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tgnstream.aio_client import AsyncLinkPredictionClient
from tgnstream.client import (
    SERVICE,
    LinkPredictionClient,
    RetryPolicy,
    channel_credentials,
    is_retryable,
    system_root_certificates,
)
from tgnstream.model_server.config import GrpcConfig
from tgnstream.rpc.limits import MAX_MESSAGE_BYTES
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc

DIM = 128  # 10,000 embeddings: ~5.2 MB, over gRPC's 4 MiB default


class Fake(pb_grpc.LinkPredictionServicer):
    """Counts calls; sheds the next ``overloaded`` calls as the server's admission does;
    GetModelInfo takes ``delay_s``."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.overloaded = 0
        self.delay_s = 0.0
        self.metadata: list[tuple] = []
        self._lock = threading.Lock()

    def _enter(self, name, context):
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.metadata.append(tuple(context.invocation_metadata()))
            shed = self.overloaded > 0
            self.overloaded -= int(shed)
        if shed:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server overloaded; retry with backoff")

    def Embed(self, request, context):
        self._enter("Embed", context)
        values = [0.25] * DIM
        return pb.EmbedResponse(
            dim=DIM, embeddings=[pb.Embedding(id=n, values=values) for n in request.nodes]
        )

    def GetModelInfo(self, request, context):
        self._enter("GetModelInfo", context)
        time.sleep(self.delay_s)
        return pb.ModelInfo(model_version="v7", events_applied=42)

    def Score(self, request, context):
        self._enter("Score", context)
        return pb.ScoreResponse(probabilities=[0.5] * len(request.pairs))


class FakeServer:
    def __init__(self, credentials: grpc.ServerCredentials | None = None, max_receive: int | None = None):
        self.fake = Fake()
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if max_receive is not None:
            options.append(("grpc.max_receive_message_length", max_receive))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
        pb_grpc.add_LinkPredictionServicer_to_server(self.fake, self.server)
        hs = health.HealthServicer()
        hs.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(hs, self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.stop()


NODES = [f"n{i}" for i in range(10_000)]


# ------------------------------------------------------------------------------- limits
def test_the_client_limit_covers_the_servers_default():
    assert GrpcConfig().max_message_bytes <= MAX_MESSAGE_BYTES
    assert MAX_MESSAGE_BYTES > 4 * 1024 * 1024  # gRPC's default, too small for an Embed of 10,000


def test_embed_of_10000_nodes_is_received(server):
    with LinkPredictionClient(server.target, retries=0) as client:
        reply = client.embed(NODES)
    assert reply.ByteSize() > 4 * 1024 * 1024 and len(reply.embeddings) == 10_000


def test_a_reply_over_the_receive_limit_is_not_retried(server):
    with LinkPredictionClient(server.target, retries=3, backoff_s=5.0, max_message_bytes=1 << 20) as client:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.embed(NODES)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.details() and not is_retryable(err.value)
    assert server.fake.calls == {"Embed": 1} and time.monotonic() - t0 < 2.0


def test_a_request_over_the_servers_limit_is_not_retried():
    s = FakeServer(max_receive=16 * 1024)
    try:
        with LinkPredictionClient(s.target, retries=3, backoff_s=5.0) as client:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                client.embed(NODES)  # ~80 KB of ids
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert "larger than max" in err.value.details() and not is_retryable(err.value)
        assert time.monotonic() - t0 < 2.0 and "Embed" not in s.fake.calls
    finally:
        s.stop()


# ------------------------------------------------------------------------------ retries
def test_overload_is_retried_with_backoff(server):
    server.fake.overloaded = 2
    with LinkPredictionClient(server.target, retries=3, backoff_s=0.01, token="t0k") as client:
        assert client.model_info().model_version == "v7"
    assert server.fake.calls == {"GetModelInfo": 3}
    assert all(("authorization", "Bearer t0k") in m for m in server.fake.metadata)


def test_retries_stop_after_the_last_attempt(server):
    server.fake.overloaded = 10
    with LinkPredictionClient(server.target, retries=2, backoff_s=0.01) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.model_info()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and server.fake.calls == {"GetModelInfo": 3}


def test_retry_policy_waits():
    waits = list(RetryPolicy(retries=6, backoff_s=0.1, max_backoff_s=0.4).waits())
    assert len(waits) == 6
    for wait, base in zip(waits, [0.1, 0.2, 0.4, 0.4, 0.4, 0.4], strict=True):
        assert 0.5 * base <= wait < 1.5 * base
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)


# ---------------------------------------------------------------------------- deadlines
def test_a_call_takes_its_own_deadline(server):
    server.fake.delay_s = 0.5
    with LinkPredictionClient(server.target, timeout_s=5, retries=3, backoff_s=1.0) as client:
        assert client.model_info().events_applied == 42  # the client's 5 s
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.model_info(timeout_s=0.1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 0.45
        with pytest.raises(ValueError):
            client.model_info(timeout_s=0)


def test_unreachable_server_is_retried_then_raised():
    with LinkPredictionClient("127.0.0.1:1", retries=2, backoff_s=0.01) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.health()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and is_retryable(err.value)


# ---------------------------------------------------------------------------------- TLS
def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate, both signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make certificates")
    d = tmp_path_factory.mktemp("pki")
    f = {n: d / n for n in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")}
    ca, ca_key = str(f["ca.pem"]), str(f["ca.key"])
    _openssl("req", "-x509", *EC, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=test CA")
    extensions = {
        "server": "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "client": "extendedKeyUsage=clientAuth",
    }
    for name, ext in extensions.items():
        csr, extfile = d / f"{name}.csr", d / f"{name}.ext"
        extfile.write_text(ext + "\n")
        key, cert = str(f[f"{name}.key"]), str(f[f"{name}.pem"])
        _openssl("req", "-new", *EC, "-keyout", key, "-out", str(csr), "-subj", f"/CN={name}")
        sign = ["-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1", "-extfile", str(extfile)]
        _openssl("x509", "-req", "-in", str(csr), *sign, "-out", cert)
    return f


def _tls_server(pki, require_client_cert: bool) -> FakeServer:
    creds = grpc.ssl_server_credentials(
        [(pki["server.key"].read_bytes(), pki["server.pem"].read_bytes())],
        root_certificates=pki["ca.pem"].read_bytes() if require_client_cert else None,
        require_client_auth=require_client_cert,
    )
    return FakeServer(creds)


def test_tls_with_a_ca_file_and_with_the_system_roots(pki, monkeypatch):
    s = _tls_server(pki, require_client_cert=False)
    target = f"localhost:{s.port}"
    try:
        with LinkPredictionClient(target, tls_ca_file=pki["ca.pem"], retries=0) as client:
            assert client.health() == "SERVING"
        # No CA file: the system's roots, which SSL_CERT_FILE points at here.
        monkeypatch.delenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", raising=False)
        monkeypatch.setenv("SSL_CERT_FILE", str(pki["ca.pem"]))
        assert system_root_certificates() == pki["ca.pem"].read_bytes()
        with LinkPredictionClient(target, tls=True, retries=0) as client:
            assert client.model_info().model_version == "v7"
        # ... and a server whose CA is not among them is refused.
        monkeypatch.setenv("SSL_CERT_FILE", str(pki["client.pem"]))
        with LinkPredictionClient(target, tls=True, retries=0, timeout_s=3) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.model_info()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


def test_mutual_tls(pki):
    s = _tls_server(pki, require_client_cert=True)
    target = f"localhost:{s.port}"
    try:
        with LinkPredictionClient(
            target, tls_ca_file=pki["ca.pem"], tls_cert_file=pki["client.pem"], tls_key_file=pki["client.key"]
        ) as client:
            assert client.model_info().events_applied == 42
        with LinkPredictionClient(target, tls_ca_file=pki["ca.pem"], retries=0, timeout_s=3) as anonymous:
            with pytest.raises(grpc.RpcError) as err:
                anonymous.model_info()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


def test_tls_arguments_are_checked(pki):
    assert channel_credentials() is None  # plaintext
    with pytest.raises(ValueError, match="both"):
        channel_credentials(cert_file=pki["client.pem"])
    with pytest.raises(FileNotFoundError):
        LinkPredictionClient("localhost:1", tls_ca_file=pki["ca.pem"].with_name("missing.pem"))


# ---------------------------------------------------------------------------------- asyncio
def test_async_client_calls_limits_retries_and_deadlines(server):
    async def main():
        async with AsyncLinkPredictionClient(server.target, retries=3, backoff_s=0.01, token="t0k") as client:
            server.fake.overloaded = 2
            assert (await client.model_info()).model_version == "v7"
            assert server.fake.calls == {"GetModelInfo": 3}
            replies = await asyncio.gather(
                client.embed(NODES), client.score([("a", "b")] * 3), client.health()
            )
            assert len(replies[0].embeddings) == 10_000 and len(replies[1].probabilities) == 3
            assert replies[2] == "SERVING"
            server.fake.delay_s = 0.5
            with pytest.raises(grpc.RpcError) as err:
                await client.model_info(timeout_s=0.1)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            server.fake.delay_s = 0.0
        async with AsyncLinkPredictionClient(
            server.target, retries=3, backoff_s=5.0, max_message_bytes=1 << 20
        ) as small:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                await small.embed(NODES)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 2.0
        assert server.fake.calls["Embed"] == 2  # one each: the local size error was not retried

    asyncio.run(main())


def test_async_client_mutual_tls(pki):
    s = _tls_server(pki, require_client_cert=True)

    async def main():
        async with AsyncLinkPredictionClient(
            f"localhost:{s.port}",
            tls_ca_file=pki["ca.pem"],
            tls_cert_file=pki["client.pem"],
            tls_key_file=pki["client.key"],
        ) as client:
            return await client.health()

    try:
        assert asyncio.run(main()) == "SERVING"
    finally:
        s.stop()
