"""A Python client of ``tgnstream.rpc.v1.LinkPrediction``: deadlines, retries with backoff on
UNAVAILABLE (a server restarting, a broker-less moment of readiness) and RESOURCE_EXHAUSTED
(overload), optional TLS and bearer token.

    from tgnstream.client import LinkPredictionClient

    with LinkPredictionClient("127.0.0.1:50051") as client:
        print(client.model_info().model_version)
        print(client.score([("user-1", "page-9")]).probabilities)
        print([(r.id, r.probability) for r in client.top_k("user-1", k=5).results])

Replies are the generated protobuf messages (``tgnstream.rpc.v1.link_prediction_pb2``); every
one carries the ``StateStamp`` of the state that answered. Errors that retrying cannot fix
(INVALID_ARGUMENT, UNAUTHENTICATED, ...) are raised at once as ``grpc.RpcError``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from time import sleep
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc

__all__ = ["LinkPredictionClient", "RETRYABLE"]

T = TypeVar("T")

#: Status codes worth another attempt: the server is not there (yet) or sheds load.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
SERVICE = pb.DESCRIPTOR.services_by_name["LinkPrediction"].full_name


class LinkPredictionClient:
    """One channel to a server, with retries.

    Args:
        target: ``host:port``.
        timeout_s: deadline of each attempt.
        retries: attempts after the first, on ``RETRYABLE`` codes only.
        backoff_s / max_backoff_s: the first wait and the cap (doubling, with jitter).
        token: sent as ``authorization: Bearer <token>`` (the server's ``grpc.auth_token``).
        tls_ca_file: PEM of the CA that signed the server's certificate (TLS on); None: plain.
        tls_server_name: the name the certificate is checked against (default: the host).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 5,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        token: str | None = None,
        tls_ca_file: str | Path | None = None,
        tls_server_name: str | None = None,
    ):
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError("timeout_s must be > 0, retries and backoff_s >= 0")
        self.target = target
        self.timeout_s, self.retries = float(timeout_s), int(retries)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if tls_ca_file is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca_file).read_bytes())
            options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.LinkPredictionStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ---------------------------------------------------------------------------- calls
    def score(self, pairs: Iterable[tuple[str, str]], time: float | None = None) -> pb.ScoreResponse:
        """Probabilities that each ``(src, dst)`` interacts at ``time`` (default: the server's
        watermark)."""
        req = pb.ScoreRequest(pairs=[pb.Pair(src=str(s), dst=str(d)) for s, d in pairs])
        if time is not None:
            req.time = float(time)
        return self._call(self._stub.Score, req)

    def top_k(
        self,
        src: str,
        k: int = 10,
        candidates: Sequence[str] | None = None,
        exclude_seen: bool = False,
        time: float | None = None,
    ) -> pb.TopKResponse:
        """The ``k`` most likely destinations of ``src``, best first."""
        req = pb.TopKRequest(
            src=str(src), k=int(k), candidates=list(candidates or ()), exclude_seen=exclude_seen
        )
        if time is not None:
            req.time = float(time)
        return self._call(self._stub.TopK, req)

    def embed(self, nodes: Iterable[str], time: float | None = None) -> pb.EmbedResponse:
        """Embeddings of ``nodes`` at ``time`` (default: the server's watermark)."""
        req = pb.EmbedRequest(nodes=[str(n) for n in nodes])
        if time is not None:
            req.time = float(time)
        return self._call(self._stub.Embed, req)

    def model_info(self) -> pb.ModelInfo:
        """Version, events applied, watermark, nodes, offsets of the state being served."""
        return self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest())

    def health(self) -> str:
        """``SERVING`` / ``NOT_SERVING`` / ... of the LinkPrediction service (gRPC health)."""
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=SERVICE))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    # ------------------------------------------------------------------------- plumbing
    def _call(self, method: Callable[..., T], request) -> T:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise
            sleep(delay * (0.5 + random.random()))  # jitter: retries of many clients spread
            delay = min(2 * delay, self.max_backoff_s)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LinkPredictionClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
