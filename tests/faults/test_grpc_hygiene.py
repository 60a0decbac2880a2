"""Hostile or broken gRPC clients, tokens and TLS files, against a real server process."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest

from tgnstream.rpc.v1 import link_prediction_pb2 as pb

from .conftest import LINK_PREDICTION, SERVING, produce, server_config, stream, wait_for

pytestmark = pytest.mark.faults

TOKEN = "s3cret-token"


def _raw_call(channel: grpc.Channel, method: str, body: bytes, metadata=None):
    call = channel.unary_unary(
        f"/{LINK_PREDICTION}/{method}", request_serializer=None, response_deserializer=None
    )
    return call(body, timeout=10, metadata=metadata)


def test_undecodable_bytes_are_invalid_argument_and_leave_no_trace_in_the_log(broker, servers, tmp_path):
    """Bytes that are not a protobuf: INVALID_ARGUMENT, nothing logged (with a token configured,
    a client without one gets UNAUTHENTICATED, also silently). (Before: INTERNAL and a 6-line
    traceback per request, token or not.)"""
    produce(broker.bootstrap, stream(500))
    server = servers(server_config(tmp_path, broker.bootstrap, grpc={"auth_token": TOKEN})).start()
    server.token = TOKEN
    server.wait_offset(500)
    before = len(server.log())
    with server.channel() as ch:
        for method in ("Score", "TopK", "Embed", "GetModelInfo"):
            for metadata, code in (
                (server.metadata(), grpc.StatusCode.INVALID_ARGUMENT),
                (None, grpc.StatusCode.UNAUTHENTICATED),
            ):
                for _ in range(20):
                    with pytest.raises(grpc.RpcError) as err:
                        _raw_call(ch, method, b"\xff\xff\xff\x07garbage", metadata)
                    assert err.value.code() == code, method
        assert "not a valid tgnstream.rpc.v1.ScoreRequest" in _details(ch, server)
    after = server.log()[before:]
    assert "Traceback" not in after and "deserializ" not in after, after[-2000:]
    assert server.health(LINK_PREDICTION) == SERVING


def _details(ch, server) -> str:
    with pytest.raises(grpc.RpcError) as err:
        _raw_call(ch, "Score", b"\xff\xff", server.metadata())
    return err.value.details()


def test_ids_longer_than_ingest_accepts_are_invalid_argument(broker, servers, tmp_path):
    """A 10 MB node id (and a 513-byte one) is refused like ingest refuses it; a 512-byte id is
    answered as an unknown node. (Before: accepted without limit.)"""
    produce(broker.bootstrap, stream(500))
    server = servers(server_config(tmp_path, broker.bootstrap)).start()
    server.wait_offset(500)
    with server.channel() as ch:
        stub = server.stub(ch)
        for size in (513, 10_000_000):
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src="u1", dst="x" * size)]), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "more than the 512 allowed" in err.value.details()
        reply = stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src="u1", dst="x" * 512)]), timeout=10)
        assert list(reply.dst_unknown) == [True]


def test_bad_requests_and_missing_tokens_get_the_right_codes(broker, servers, tmp_path):
    """Malformed requests are INVALID_ARGUMENT with a message, a missing or wrong token is
    UNAUTHENTICATED, health needs no token; the server keeps serving."""
    produce(broker.bootstrap, stream(500))
    server = servers(server_config(tmp_path, broker.bootstrap, grpc={"auth_token": TOKEN})).start()
    server.token = TOKEN
    server.wait_offset(500)
    with server.channel() as ch:
        stub = server.stub(ch)
        md = server.metadata()
        for call in (
            lambda: stub.Score(pb.ScoreRequest(), timeout=10, metadata=md),
            lambda: stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src="", dst="p1")]), timeout=10, metadata=md),
            lambda: stub.TopK(pb.TopKRequest(src="u1", k=0), timeout=10, metadata=md),
            lambda: stub.TopK(
                pb.TopKRequest(src="u1", k=2, candidates=["p1", "p1"]), timeout=10, metadata=md
            ),
            lambda: stub.Embed(pb.EmbedRequest(), timeout=10, metadata=md),
            lambda: stub.Score(
                pb.ScoreRequest(pairs=[pb.Pair(src="u1", dst="p1")], time=float("nan")), metadata=md
            ),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details()
        for metadata in (None, [("authorization", "Bearer wrong")]):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=md).events_applied == 500
    server.wait_ready()
    assert server.health(LINK_PREDICTION) == SERVING


def _self_signed(d, name):
    key, cert = d / f"{name}-key.pem", d / f"{name}-cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest.fixture
def certs(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make self-signed certificates")
    return _self_signed(tmp_path, "a"), _self_signed(tmp_path, "b")


def test_tls_is_enforced_and_a_mismatched_key_is_named_at_start(broker, servers, tmp_path, certs):
    """With a matching pair, TLS clients are served and plaintext ones are not; with a key that
    does not belong to the certificate the server exits non-zero saying so. (Before: "cannot
    bind".)"""
    (key_a, cert_a), (key_b, _) = certs
    produce(broker.bootstrap, stream(200))
    tls = {"tls_cert_file": str(cert_a), "tls_key_file": str(key_a)}
    server = servers(server_config(tmp_path, broker.bootstrap, grpc=tls)).start()
    wait_for(lambda: server.metric("tgnstream_events_applied") == 200, 60, "200 events applied")
    creds = grpc.ssl_channel_credentials(root_certificates=cert_a.read_bytes())
    with grpc.secure_channel(f"localhost:{server.ports['grpc_port']}", creds) as ch:
        assert server.stub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10).events_applied == 200
    with server.channel() as ch, pytest.raises(grpc.RpcError):
        server.stub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    server.kill()

    bad = {"tls_cert_file": str(cert_a), "tls_key_file": str(key_b)}
    broken = servers(server_config(tmp_path, broker.bootstrap, grpc=bad), name="mismatch")
    broken.start(wait=False)
    assert broken.wait_exit(60) != 0
    assert "does not match the certificate" in broken.log()


@pytest.mark.parametrize("readers", [0, 2])
@pytest.mark.parametrize("problem", ["missing certificate", "key of another certificate"])
def test_tls_errors_are_one_line_and_exit_2_with_or_without_readers(
    broker, servers, tmp_path, certs, readers, problem
):
    """With reader processes (the default) a TLS problem was found only inside each reader: exit 1
    and 3-5 tracebacks with the message buried. Now the serving process checks before spawning
    any reader: one line, exit 2, no traceback, as without readers."""
    (key_a, cert_a), (key_b, _) = certs
    if problem == "missing certificate":
        tls = {"tls_cert_file": str(tmp_path / "nope.pem"), "tls_key_file": str(key_a)}
        expected = "cannot read TLS key/certificate"
    else:
        tls = {"tls_cert_file": str(cert_a), "tls_key_file": str(key_b)}
        expected = "does not match the certificate"
    name = f"tls-{readers}-{problem.split()[0]}"
    server = servers(server_config(tmp_path, broker.bootstrap, grpc={**tls, "readers": readers}), name=name)
    server.start(wait=False)
    assert server.wait_exit(60) == 2
    log = server.log()
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and expected in errors[0], log
    assert "Traceback" not in log and "reader" not in log.lower(), log
