"""Bearer-token auth (health exempt) and TLS with a self-signed certificate made in the test."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tgnstream.model_server.config import GrpcConfig
from tgnstream.model_server.grpc_server import build_server, stop_server
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc
from tgnstream.runtime.metrics import ServerMetrics

from .conftest import TEST_CONFIG, serve, shutdown

TOKEN = "s3cret-token"
REQ = pb.ScoreRequest(pairs=[pb.Pair(src="user-0", dst="page-0")])


def test_bearer_token(served):
    s = serve(served.live, GrpcConfig(**TEST_CONFIG, auth_token=TOKEN))
    try:
        for metadata in (
            None,
            [("authorization", "Bearer wrong")],
            [("authorization", TOKEN)],
            [("authorization", f"Basic {TOKEN}")],
        ):
            with pytest.raises(grpc.RpcError) as err:
                s.stub.Score(REQ, metadata=metadata, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in err.value.details()
        good = [("authorization", f"Bearer {TOKEN}")]
        assert len(s.stub.Score(REQ, metadata=good, timeout=5).probabilities) == 1
        assert s.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=good, timeout=5).events_applied == 600
        # Health is exempt (k8s probes send no metadata); reflection is not.
        health = health_pb2_grpc.HealthStub(s.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        with pytest.raises(grpc.RpcError) as err:
            ProtoReflectionDescriptorDatabase(s.channel).get_services()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        unauth = s.metrics.registry.get_sample_value(
            "grpc_server_handled_total",
            {
                "grpc_type": "unary",
                "grpc_service": "tgnstream.rpc.v1.LinkPrediction",
                "grpc_method": "Score",
                "grpc_code": "UNAUTHENTICATED",
            },
        )
        assert unauth == 4
    finally:
        shutdown(s)


def test_token_is_secret_in_config():
    cfg = GrpcConfig(auth_token=TOKEN)
    assert TOKEN not in repr(cfg) and TOKEN not in str(cfg.model_dump())


def _make_self_signed(d, name: str, newkey: list[str]):
    key, cert = d / f"{name}-key.pem", d / f"{name}-cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            *newkey,
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make a self-signed certificate")
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def self_signed(tls_dir):
    return _make_self_signed(tls_dir, "a", EC)


@pytest.fixture(scope="module")
def other_self_signed(tls_dir):
    return _make_self_signed(tls_dir, "b", EC)


def test_tls_with_token(served, self_signed):
    key, cert = self_signed
    cfg = GrpcConfig(**TEST_CONFIG, tls_key_file=key, tls_cert_file=cert, auth_token=TOKEN)
    server, health, port = build_server(served.live, cfg, ServerMetrics())
    server.start()
    try:
        tls = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        # The standard client way: call credentials send "authorization: Bearer <token>".
        creds = grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(TOKEN))
        with grpc.secure_channel(f"localhost:{port}", creds) as ch:
            assert len(pb_grpc.LinkPredictionStub(ch).Score(REQ, timeout=5).probabilities) == 1
        with grpc.secure_channel(f"localhost:{port}", tls) as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.LinkPredictionStub(ch).Score(REQ, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A plaintext client cannot talk to the TLS port.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.LinkPredictionStub(ch).Score(REQ, timeout=2)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        stop_server(server, health, 0)


def test_unreadable_tls_files_fail_clearly(served, tmp_path):
    cfg = GrpcConfig(**TEST_CONFIG, tls_key_file=tmp_path / "nope.pem", tls_cert_file=tmp_path / "nope.crt")
    with pytest.raises(ValueError, match="cannot read TLS key/certificate"):
        build_server(served.live, cfg, ServerMetrics())


def _tls_config(key, cert) -> GrpcConfig:
    return GrpcConfig(**TEST_CONFIG, tls_key_file=key, tls_cert_file=cert)


def test_tls_key_of_another_certificate_fails_clearly(served, self_signed, other_self_signed):
    (_, cert_a), (key_b, _) = self_signed, other_self_signed
    with pytest.raises(ValueError, match="does not match") as err:
        build_server(served.live, _tls_config(key_b, cert_a), ServerMetrics())
    assert str(err.value).startswith(f"TLS key file {key_b} does not match the certificate in {cert_a}")


def test_tls_key_of_another_type_fails_clearly(served, self_signed, tls_dir):
    """An RSA key with an EC certificate (OpenSSL reports this one differently)."""
    _, cert = self_signed
    rsa_key, _ = _make_self_signed(tls_dir, "rsa", ["-newkey", "rsa:2048"])
    with pytest.raises(ValueError, match=f"TLS key file {rsa_key} does not match the certificate in {cert}"):
        build_server(served.live, _tls_config(rsa_key, cert), ServerMetrics())


def test_garbage_tls_certificate_fails_clearly(served, self_signed, tmp_path):
    key, _ = self_signed
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"this is not a certificate\n")
    with pytest.raises(ValueError) as err:
        build_server(served.live, _tls_config(key, garbage), ServerMetrics())
    assert str(err.value).startswith(f"TLS certificate file {garbage} holds no PEM certificate")


def test_der_or_corrupt_tls_certificate_fails_clearly(served, self_signed, tmp_path):
    key, cert = self_signed
    der = tmp_path / "cert.der"
    subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-outform", "DER", "-out", str(der)],
        check=True,
        capture_output=True,
    )
    with pytest.raises(ValueError, match="holds no PEM certificate") as err:
        build_server(served.live, _tls_config(key, der), ServerMetrics())
    assert str(der) in str(err.value)
    lines = cert.read_text().splitlines()
    corrupt = tmp_path / "corrupt.crt"
    corrupt.write_text("\n".join([lines[0], "AAAA" + lines[1][4:][::-1], *lines[2:]]) + "\n")
    with pytest.raises(ValueError) as err:
        build_server(served.live, _tls_config(key, corrupt), ServerMetrics())
    assert str(err.value) == f"TLS certificate file {corrupt} holds no valid PEM certificate"


def test_garbage_or_swapped_tls_key_fails_clearly(served, self_signed, tmp_path):
    key, cert = self_signed
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"\x00\x01 not a key")
    for bad in (garbage, cert):  # a certificate given as the key
        with pytest.raises(ValueError) as err:
            build_server(served.live, _tls_config(bad, cert), ServerMetrics())
        assert str(err.value).startswith(f"TLS key file {bad} holds no PEM private key")


def test_encrypted_tls_key_fails_clearly_without_prompting(served, self_signed, tmp_path):
    key, cert = self_signed
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:pw", "-out", str(encrypted)],
        check=True,
        capture_output=True,
    )
    with pytest.raises(ValueError) as err:
        build_server(served.live, _tls_config(encrypted, cert), ServerMetrics())
    assert str(err.value) == (
        f"TLS key file {encrypted} is encrypted; grpc needs an unencrypted PEM private key"
    )


def test_valid_pair_still_builds(served, self_signed):
    key, cert = self_signed
    server, health, _ = build_server(served.live, _tls_config(key, cert), ServerMetrics())
    stop_server(server, health, 0)


def test_mutual_tls_refuses_clients_without_a_certificate(served, self_signed, other_self_signed):
    key, cert = self_signed
    client_key, client_cert = other_self_signed  # self-signed: its own CA
    cfg = GrpcConfig(**TEST_CONFIG, tls_key_file=key, tls_cert_file=cert, tls_client_ca_file=client_cert)
    server, health, port = build_server(served.live, cfg, ServerMetrics())
    server.start()
    try:
        mutual = grpc.ssl_channel_credentials(
            root_certificates=cert.read_bytes(),
            private_key=client_key.read_bytes(),
            certificate_chain=client_cert.read_bytes(),
        )
        with grpc.secure_channel(f"localhost:{port}", mutual) as ch:
            assert len(pb_grpc.LinkPredictionStub(ch).Score(REQ, timeout=5).probabilities) == 1
        server_only = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{port}", server_only) as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.LinkPredictionStub(ch).Score(REQ, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_server(server, health, 0)


def test_mutual_tls_needs_server_tls():
    with pytest.raises(ValueError, match="tls_client_ca_file"):
        GrpcConfig(**TEST_CONFIG, tls_client_ca_file="/etc/ca.pem")
