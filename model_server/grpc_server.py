"""Assemble the gRPC server: LinkPrediction + grpc.health.v1 + reflection, interceptors, TLS.

server, health, port = build_server(live, config, metrics)
server.start()
...
stop_server(server, health, config.shutdown_grace_s)
"""

from __future__ import annotations

import re
import ssl
import weakref
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tgnstream.model_server.admission import Admission, AdmissionInterceptor
from tgnstream.model_server.config import GrpcConfig
from tgnstream.model_server.interceptors import (
    HEALTH_SERVICE,
    AuthInterceptor,
    MetricsInterceptor,
    UndecodableInterceptor,
)
from tgnstream.model_server.servicer import SERVICE_NAME, LinkPredictionServicer
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.metrics import ServerMetrics
from tgnstream.runtime.shared_state import SharedLiveView

__all__ = ["build_server", "check_tls", "stop_server", "close_servicer", "SERVICE_NAME", "HEALTH_SERVICE"]

# Which servicer each built server runs, so that stop_server can release its resources.
_SERVICERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_PEM_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


def _check_tls_pair(cert_file: Path, key_file: Path, cert: bytes, key: bytes) -> None:
    """Raise ValueError saying what is wrong with a certificate/key pair (grpc itself only
    fails to bind). Loaded with Python's ``ssl`` at security level 0: this judges the files,
    not the local OpenSSL's policy on key sizes and digests (grpc has its own)."""
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise ValueError(
            f"TLS certificate file {cert_file} holds no PEM certificate "
            "(no '-----BEGIN CERTIFICATE-----' line; DER files must be converted to PEM)"
        )
    if _PEM_KEY.search(key) is None:
        raise ValueError(
            f"TLS key file {key_file} holds no PEM private key (no '-----BEGIN ... PRIVATE KEY-----' line)"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:  # an OpenSSL without security levels (LibreSSL) has no such policy
        pass
    try:
        ctx.load_verify_locations(cadata=cert.decode("ascii", "replace"))
    except ssl.SSLError:
        raise ValueError(f"TLS certificate file {cert_file} holds no valid PEM certificate") from None
    asked: list[bool] = []

    def password() -> bytes:  # never prompt on a terminal: an encrypted key is an error
        asked.append(True)
        return b""

    try:
        ctx.load_cert_chain(cert_file, key_file, password=password)
    except ssl.SSLError as exc:
        if asked:
            raise ValueError(
                f"TLS key file {key_file} is encrypted; grpc needs an unencrypted PEM private key"
            ) from None
        # NO_CERTIFICATE_ASSIGNED: a key of another type (e.g. RSA key, EC certificate).
        if exc.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            raise ValueError(
                f"TLS key file {key_file} does not match the certificate in {cert_file} (the first "
                "certificate in the file must be the one the key belongs to)"
            ) from None
        raise ValueError(
            f"TLS key file {key_file} cannot be used with the certificate in {cert_file}: "
            f"{exc.reason or exc.strerror or exc}"
        ) from None


def check_tls(config: GrpcConfig) -> None:
    """Validate the TLS files of ``config`` (readable, PEM, the key of the certificate, the client
    CA) where the serving process starts, before any reader process is spawned: raises ValueError
    with the one line that says what is wrong. A no-op without TLS."""
    if config.tls:
        _credentials(config)


def _credentials(config: GrpcConfig) -> grpc.ServerCredentials:
    """Raises ValueError saying what is wrong: a file unreadable, not PEM, an encrypted key, a
    key that does not belong to the certificate."""
    try:
        key = config.tls_key_file.read_bytes()
        cert = config.tls_cert_file.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read TLS key/certificate: {exc}") from exc
    _check_tls_pair(config.tls_cert_file, config.tls_key_file, cert, key)
    if config.tls_client_ca_file is None:
        return grpc.ssl_server_credentials([(key, cert)])
    try:
        client_ca = config.tls_client_ca_file.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the client CA file (tls_client_ca_file): {exc}") from exc
    if b"-----BEGIN CERTIFICATE-----" not in client_ca:
        raise ValueError(f"tls_client_ca_file {config.tls_client_ca_file} holds no PEM certificate")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=True)


def build_server(
    live: LiveEngine | SharedLiveView,
    config: GrpcConfig,
    metrics: ServerMetrics,
    servicer: LinkPredictionServicer | None = None,
    reuse_port: bool = False,
) -> tuple[grpc.Server, health.HealthServicer, int]:
    """A bound, not yet started server; returns ``(server, health, port)`` (the real port when
    ``config.port`` is 0). Health says SERVING for "" and LinkPrediction: the caller hands over
    a restored ``live``, so the server can answer as soon as it starts.

    ``servicer``: pass one to keep a handle on it (its ``cache`` can be warmed after each
    applied batch; its coalescers count batches); default: a new one over ``live``.
    ``reuse_port``: share the port with the other reader processes (SO_REUSEPORT); the serving
    process checks beforehand that no other server holds it.

    Raises:
        ValueError: TLS files unreadable or invalid (the message says what is wrong);
        RuntimeError: the address cannot be bound.
    """
    interceptors: list[grpc.ServerInterceptor] = [MetricsInterceptor(metrics)]
    if config.auth_token is not None:
        interceptors.append(AuthInterceptor(config.auth_token.get_secret_value()))
    # After auth (no token -> UNAUTHENTICATED, whatever the body), before admission (a body that
    # does not decode takes no slot).
    interceptors.append(UndecodableInterceptor())
    admission = Admission(config.max_inflight, config.max_queued, config.queue_timeout_s)
    interceptors.append(AdmissionInterceptor(admission, (SERVICE_NAME,)))
    size = config.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            # One port per process (fail loudly rather than share it with a stale server),
            # except for reader processes, which share it on purpose.
            ("grpc.so_reuseport", int(reuse_port)),
        ],
        maximum_concurrent_rpcs=config.hard_limit_rpcs,
    )
    servicer = servicer if servicer is not None else LinkPredictionServicer(live, config, metrics=metrics)
    pb_grpc.add_LinkPredictionServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.reflection:
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), server)

    try:
        if config.tls:
            port = server.add_secure_port(config.address, _credentials(config))
        else:
            port = server.add_insecure_port(config.address)
    except RuntimeError as exc:
        raise ValueError(f"cannot serve gRPC on {config.address} (is the port in use?): {exc}") from None
    if port == 0:  # older grpc reports a failed bind this way
        raise ValueError(f"cannot serve gRPC on {config.address}: is the port in use?")
    _SERVICERS[server] = servicer
    return server, health_servicer, port


def stop_server(server: grpc.Server, health_servicer: health.HealthServicer, grace_s: float) -> None:
    """Graceful stop: health turns NOT_SERVING (load balancers drain), new RPCs are refused,
    in-flight ones get ``grace_s`` seconds to finish; returns once the server has stopped (and
    the servicer's background thread, if any, has been told to stop)."""
    health_servicer.enter_graceful_shutdown()
    server.stop(grace_s).wait()
    close_servicer(server)


def close_servicer(server: grpc.Server) -> None:
    """Release the servicer of a stopped ``server`` (its background thread, if any)."""
    servicer = _SERVICERS.pop(server, None)
    if servicer is not None:
        servicer.close()
