"""A Python client of ``tgnstream.rpc.v1.LinkPrediction``: deadlines, retries with backoff on
UNAVAILABLE (a server restarting, a broker-less moment of readiness) and RESOURCE_EXHAUSTED
(overload), TLS (a CA file or the system's roots), client certificates (mTLS), a bearer token.

    from tgnstream.client import LinkPredictionClient

    with LinkPredictionClient("127.0.0.1:50051") as client:
        print(client.model_info().model_version)
        print(client.score([("user-1", "page-9")]).probabilities)
        print([(r.id, r.probability) for r in client.top_k("user-1", k=5).results])
        client.embed(ids, timeout_s=30)  # any call may take its own deadline

The same calls from asyncio: :class:`tgnstream.aio_client.AsyncLinkPredictionClient`.

Replies are the generated protobuf messages (``tgnstream.rpc.v1.link_prediction_pb2``); every
one carries the ``StateStamp`` of the state that answered. Errors that retrying cannot fix
(INVALID_ARGUMENT, UNAUTHENTICATED, DEADLINE_EXCEEDED, a message over a size limit, ...) are
raised at once as ``grpc.RpcError``.

Message size: the client accepts replies up to ``max_message_bytes`` (default
:data:`tgnstream.rpc.limits.MAX_MESSAGE_BYTES`, the server's default limit, 16 MiB; gRPC's own
default is 4 MiB, too small for an Embed of 10,000 nodes). A server configured with a larger
``grpc.max_message_bytes`` needs a client with at least as much.

The module also holds what the sync and the asyncio client share: the request builders, the
retry policy (:class:`RetryPolicy`, :func:`is_retryable`) and the channel set-up
(:func:`channel_credentials`, :func:`channel_options`).
"""

from __future__ import annotations

import os
import random
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import sleep
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tgnstream.rpc.limits import MAX_MESSAGE_BYTES
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc

__all__ = [
    "LinkPredictionClient",
    "ClientSettings",
    "RETRYABLE",
    "RetryPolicy",
    "MAX_MESSAGE_BYTES",
    "is_retryable",
    "is_message_size_error",
    "channel_credentials",
    "channel_options",
    "system_root_certificates",
]

T = TypeVar("T")

#: Status codes worth another attempt: the server is not there (yet) or sheds load.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
SERVICE = pb.DESCRIPTOR.services_by_name["LinkPrediction"].full_name

# gRPC reports a message over a size limit as RESOURCE_EXHAUSTED, with these details, whether
# this process refused it (a reply over the client's receive limit, a request over its send
# limit) or the server did (a request over the server's receive limit). The same message fails
# the same way every time: never retried.
_SIZE_ERRORS = ("Received message larger than max", "Sent message larger than max")


def is_message_size_error(err: grpc.RpcError) -> bool:
    """True for RESOURCE_EXHAUSTED because a message is over a size limit (not overload)."""
    details = err.details() or ""
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and any(s in details for s in _SIZE_ERRORS)


def is_retryable(err: grpc.RpcError) -> bool:
    """Whether another attempt may succeed: UNAVAILABLE, or RESOURCE_EXHAUSTED from a server
    that sheds load; never a message over a size limit."""
    return err.code() in RETRYABLE and not is_message_size_error(err)


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts after the first (``retries``, on :func:`is_retryable` errors only) and the waits
    between them: ``backoff_s`` doubling up to ``max_backoff_s``, each scaled by a random
    factor in [0.5, 1.5) so that the retries of many clients spread."""

    retries: int = 5
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("retries, backoff_s and max_backoff_s must be >= 0")

    def waits(self) -> Iterator[float]:
        """The ``retries`` waits of one call, in seconds."""
        delay = self.backoff_s
        for _ in range(self.retries):
            yield delay * (0.5 + random.random())
            delay = min(2 * delay, self.max_backoff_s)

    def next_wait(self, waits: Iterator[float], err: grpc.RpcError) -> float | None:
        """The wait before the next attempt after ``err``, or None: raise ``err``."""
        return next(waits, None) if is_retryable(err) else None


# ------------------------------------------------------------------------------ channel set-up
def system_root_certificates() -> bytes | None:
    """PEM roots for TLS without a CA file: the system's bundle (OpenSSL's default file, which
    ``SSL_CERT_FILE`` overrides), or None, which makes gRPC use ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``
    when set, else the roots bundled with grpcio."""
    if os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"):
        return None
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            try:
                return Path(candidate).read_bytes()
            except OSError:
                continue
    return None


def channel_credentials(
    tls: bool = False,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for a plaintext channel. TLS is on when ``tls`` is true or any
    file is given; the server is checked against ``ca_file`` or else the system's roots
    (:func:`system_root_certificates`); ``cert_file`` + ``key_file`` (PEM, both or neither) are
    the client's certificate for servers that require one (mutual TLS).

    Raises:
        ValueError: only one of ``cert_file`` and ``key_file``;
        FileNotFoundError / OSError: a file cannot be read.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both cert_file and key_file (mutual TLS)")
    if not (tls or ca_file is not None or cert_file is not None):
        return None
    roots = Path(ca_file).read_bytes() if ca_file is not None else system_root_certificates()
    chain = Path(cert_file).read_bytes() if cert_file is not None else None
    key = Path(key_file).read_bytes() if key_file is not None else None
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


def channel_options(
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    tls_server_name: str | None = None,
    extra: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """gRPC channel arguments: the receive and send limits, the TLS name override, then
    ``extra`` (for example ``("grpc.lb_policy_name", "round_robin")``)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.max_send_message_length", int(max_message_bytes)),
    ]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return [*options, *extra]


_channel_options = channel_options  # ClientSettings' argument of that name shadows it


# --------------------------------------------------------------------------- request builders
def score_request(pairs: Iterable[tuple[str, str]], time: float | None = None) -> pb.ScoreRequest:
    req = pb.ScoreRequest(pairs=[pb.Pair(src=str(s), dst=str(d)) for s, d in pairs])
    if time is not None:
        req.time = float(time)
    return req


def top_k_request(
    src: str,
    k: int = 10,
    candidates: Sequence[str] | None = None,
    exclude_seen: bool = False,
    time: float | None = None,
) -> pb.TopKRequest:
    req = pb.TopKRequest(
        src=str(src), k=int(k), candidates=[str(c) for c in candidates or ()], exclude_seen=exclude_seen
    )
    if time is not None:
        req.time = float(time)
    return req


def embed_request(nodes: Iterable[str], time: float | None = None) -> pb.EmbedRequest:
    req = pb.EmbedRequest(nodes=[str(n) for n in nodes])
    if time is not None:
        req.time = float(time)
    return req


def health_request() -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=SERVICE)


def health_status_name(reply: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# ------------------------------------------------------------------------------------ clients
class ClientSettings:
    """What both clients take (see :class:`LinkPredictionClient` for the arguments); builds
    the credentials, options and metadata, and checks the values."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 5,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        token: str | None = None,
        tls: bool = False,
        tls_ca_file: str | Path | None = None,
        tls_cert_file: str | Path | None = None,
        tls_key_file: str | Path | None = None,
        tls_server_name: str | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, Any]] = (),
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be > 0, got {max_message_bytes}")
        self.target = target
        self.timeout_s = float(timeout_s)
        self.policy = RetryPolicy(int(retries), float(backoff_s), float(max_backoff_s))
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.credentials = channel_credentials(tls, tls_ca_file, tls_cert_file, tls_key_file)
        self.options = _channel_options(max_message_bytes, tls_server_name, channel_options)

    # Kept as attributes for callers of the first version of this client.
    @property
    def retries(self) -> int:
        return self.policy.retries

    @property
    def backoff_s(self) -> float:
        return self.policy.backoff_s

    @property
    def max_backoff_s(self) -> float:
        return self.policy.max_backoff_s

    def deadline(self, timeout_s: float | None) -> float:
        """The deadline of one attempt: the call's own, else the client's."""
        if timeout_s is None:
            return self.timeout_s
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        return float(timeout_s)


class LinkPredictionClient(ClientSettings):
    """One channel to a server, with retries.

    Args:
        target: ``host:port`` (or any gRPC target, e.g. ``dns:///tgnstream-headless:50051``).
        timeout_s: deadline of each attempt, unless a call passes its own ``timeout_s``.
        retries: attempts after the first, on :func:`is_retryable` errors only.
        backoff_s / max_backoff_s: the first wait and the cap (doubling, with jitter).
        token: sent as ``authorization: Bearer <token>`` (the server's ``grpc.auth_token``).
        tls: TLS with the system's roots when no ``tls_ca_file`` is given.
        tls_ca_file: PEM of the CA that signed the server's certificate (turns TLS on).
        tls_cert_file / tls_key_file: the client's PEM certificate and key, for servers that
            require one (mutual TLS; turn TLS on).
        tls_server_name: the name the certificate is checked against (default: the host).
        max_message_bytes: the largest reply accepted (and request sent); at least the server's
            ``grpc.max_message_bytes``.
        channel_options: more gRPC channel arguments, e.g. ``[("grpc.lb_policy_name",
            "round_robin")]``.
        interceptors: ``grpc.UnaryUnaryClientInterceptor`` s wrapped around every attempt.

    Raises:
        ValueError: a value out of range, a certificate without its key (or the reverse);
        OSError: a TLS file cannot be read.
    """

    def __init__(self, target: str, *, interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (), **kw):
        super().__init__(target, **kw)
        if self.credentials is not None:
            self._channel = grpc.secure_channel(target, self.credentials, options=self.options)
        else:
            self._channel = grpc.insecure_channel(target, options=self.options)
        channel = grpc.intercept_channel(self._channel, *interceptors) if interceptors else self._channel
        self._stub = pb_grpc.LinkPredictionStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)

    # ---------------------------------------------------------------------------- calls
    def score(
        self, pairs: Iterable[tuple[str, str]], time: float | None = None, *, timeout_s: float | None = None
    ) -> pb.ScoreResponse:
        """Probabilities that each ``(src, dst)`` interacts at ``time`` (default: the server's
        watermark)."""
        return self._call(self._stub.Score, score_request(pairs, time), timeout_s)

    def top_k(
        self,
        src: str,
        k: int = 10,
        candidates: Sequence[str] | None = None,
        exclude_seen: bool = False,
        time: float | None = None,
        *,
        timeout_s: float | None = None,
    ) -> pb.TopKResponse:
        """The ``k`` most likely destinations of ``src``, best first."""
        return self._call(self._stub.TopK, top_k_request(src, k, candidates, exclude_seen, time), timeout_s)

    def embed(
        self, nodes: Iterable[str], time: float | None = None, *, timeout_s: float | None = None
    ) -> pb.EmbedResponse:
        """Embeddings of ``nodes`` at ``time`` (default: the server's watermark)."""
        return self._call(self._stub.Embed, embed_request(nodes, time), timeout_s)

    def model_info(self, *, timeout_s: float | None = None) -> pb.ModelInfo:
        """Version, events applied, watermark, nodes, offsets of the state being served."""
        return self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout_s)

    def health(self, *, timeout_s: float | None = None) -> str:
        """``SERVING`` / ``NOT_SERVING`` / ... of the LinkPrediction service (gRPC health)."""
        return health_status_name(self._call(self._health.Check, health_request(), timeout_s))

    # ------------------------------------------------------------------------- plumbing
    def _call(self, method: Callable[..., T], request, timeout_s: float | None = None) -> T:
        timeout = self.deadline(timeout_s)
        waits = self.policy.waits()
        while True:
            try:
                return method(request, timeout=timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                wait = self.policy.next_wait(waits, e)
                if wait is None:
                    raise
            sleep(wait)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LinkPredictionClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
