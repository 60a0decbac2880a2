"""The asyncio client of ``tgnstream.rpc.v1.LinkPrediction`` (``grpc.aio``): the calls, the
arguments, the retry policy and the errors of :class:`tgnstream.client.LinkPredictionClient`,
awaited.

    from tgnstream.aio_client import AsyncLinkPredictionClient

    async def main():
        async with AsyncLinkPredictionClient("127.0.0.1:50051") as client:
            info = await client.model_info()
            replies = await asyncio.gather(*(client.top_k(u, k=5) for u in users))

Create it inside the event loop that uses it (``grpc.aio`` channels belong to one loop). Waits
between attempts are ``asyncio.sleep``: other tasks run meanwhile, and cancelling the task
cancels the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from tgnstream.client import (
    ClientSettings,
    embed_request,
    health_request,
    health_status_name,
    score_request,
    top_k_request,
)
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc

__all__ = ["AsyncLinkPredictionClient"]


class AsyncLinkPredictionClient(ClientSettings):
    """One ``grpc.aio`` channel to a server, with retries; the arguments of
    :class:`tgnstream.client.LinkPredictionClient` (``interceptors``: ``grpc.aio`` client
    interceptors)."""

    def __init__(self, target: str, *, interceptors: Sequence[grpc.aio.ClientInterceptor] = (), **kw):
        super().__init__(target, **kw)
        icpt = list(interceptors) or None
        if self.credentials is not None:
            self._channel = grpc.aio.secure_channel(
                target, self.credentials, options=self.options, interceptors=icpt
            )
        else:
            self._channel = grpc.aio.insecure_channel(target, options=self.options, interceptors=icpt)
        self._stub = pb_grpc.LinkPredictionStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def score(
        self, pairs: Iterable[tuple[str, str]], time: float | None = None, *, timeout_s: float | None = None
    ) -> pb.ScoreResponse:
        """Probabilities that each ``(src, dst)`` interacts at ``time`` (default: the server's
        watermark)."""
        return await self._call(self._stub.Score, score_request(pairs, time), timeout_s)

    async def top_k(
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
        return await self._call(
            self._stub.TopK, top_k_request(src, k, candidates, exclude_seen, time), timeout_s
        )

    async def embed(
        self, nodes: Iterable[str], time: float | None = None, *, timeout_s: float | None = None
    ) -> pb.EmbedResponse:
        """Embeddings of ``nodes`` at ``time`` (default: the server's watermark)."""
        return await self._call(self._stub.Embed, embed_request(nodes, time), timeout_s)

    async def model_info(self, *, timeout_s: float | None = None) -> pb.ModelInfo:
        """Version, events applied, watermark, nodes, offsets of the state being served."""
        return await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout_s)

    async def health(self, *, timeout_s: float | None = None) -> str:
        """``SERVING`` / ``NOT_SERVING`` / ... of the LinkPrediction service (gRPC health)."""
        return health_status_name(await self._call(self._health.Check, health_request(), timeout_s))

    async def _call(self, method: Callable[..., Any], request, timeout_s: float | None = None) -> Any:
        timeout = self.deadline(timeout_s)
        waits = self.policy.waits()
        while True:
            try:
                return await method(request, timeout=timeout, metadata=self.metadata)
            except grpc.RpcError as e:  # grpc.aio.AioRpcError
                wait = self.policy.next_wait(waits, e)
                if wait is None:
                    raise
            await asyncio.sleep(wait)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncLinkPredictionClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
