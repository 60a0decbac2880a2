"""``tgnstream.rpc.v1.LinkPrediction``: a thin adapter from protobuf to ``queries``.

Errors: ``RequestError`` -> INVALID_ARGUMENT with its message; a NaN/inf result
(``NonFiniteResult``) -> INTERNAL, counted in ``tgnstream_nonfinite_total``, never sent as OK;
anything else -> INTERNAL with a short message (the traceback goes to the log) and the server
keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import grpc

from tgnstream.model_server import convert, queries
from tgnstream.model_server.catalog import CatalogSettings
from tgnstream.model_server.coalesce import Coalescer
from tgnstream.model_server.config import GrpcConfig
from tgnstream.model_server.convert import RequestError
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.metrics import ServerMetrics

__all__ = ["LinkPredictionServicer", "RESTORING_DETAILS", "SERVICE_NAME"]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["LinkPrediction"].full_name

log = logging.getLogger(__name__)

R = TypeVar("R")

RESTORING_DETAILS = (
    "the server is restoring its state (loading it, then replaying the log to its end); it answers once "
    "caught up: retry later or on another replica"
)


def catalog_settings(config: GrpcConfig) -> CatalogSettings:
    """When TopK goes two-stage, and its shortlist (``GrpcConfig.topk_*``; docs/topk-catalog.md)."""
    return CatalogSettings(
        threshold=config.topk_catalog_threshold,
        shortlist=config.topk_shortlist,
        nprobe=config.topk_ivf_nprobe,
        nlist=config.topk_ivf_nlist,
        recent=config.topk_recent,
        popular=config.topk_popular,
    )


def _pairs(q: convert.ScoreQuery) -> int:
    return len(q.src)


class LinkPredictionServicer(pb_grpc.LinkPredictionServicer):
    """Answers from ``live`` (read lock only).

    ``cache``: the TopK candidate-embedding cache (pass one to share it). With
    ``config.warm_candidates`` a background thread (started by the first TopK over the default
    candidates, stopped by ``close``) rebuilds it after every applied batch.
    """

    def __init__(
        self,
        live: LiveEngine,
        config: GrpcConfig,
        cache: queries.CandidateCache | None = None,
        metrics: ServerMetrics | None = None,
    ):
        self._live = live
        self._config = config
        self._metrics = metrics
        self._nonfinite_logged = 0
        self.cache = (
            cache
            if cache is not None
            else queries.CandidateCache(
                config.topk_cache_max_age_ms / 1000,
                config.topk_candidate_time,
                catalog=catalog_settings(config),
            )
        )
        # Concurrent Score requests, and TopK requests over the default candidates, share
        # engine calls (see coalesce.py). A batch runs at a time per kind; other requests
        # (Embed, TopK with explicit candidates) run concurrently as they come.
        self._warmer: queries.CacheWarmer | None = None
        self._warmer_lock = threading.Lock()
        # Engine work (a coalesced batch, an Embed, a TopK over explicit candidates) holds one
        # of compute_threads slots; waiting for one releases the GIL, computing does not.
        self._compute = threading.BoundedSemaphore(config.compute_threads)
        self.score_batches: Coalescer | None = None
        self.topk_batches: Coalescer | None = None
        if config.coalesce:
            self.score_batches = Coalescer(
                lambda qs: self._gated(queries.score_batch, live, qs), config.max_pairs, _pairs
            )
            self.topk_batches = Coalescer(
                lambda qs: self._gated(queries.top_k_batch, live, qs, self.cache), config.max_topk_batch
            )

    def _gated(self, fn: Callable[..., R], *args) -> R:
        with self._compute:
            return self._live.consistent(lambda: fn(*args))

    def close(self) -> None:
        """Stop the cache warmer thread (if started)."""
        with self._warmer_lock:
            if self._warmer is not None:
                self._warmer.stop()

    def _start_warmer(self) -> None:
        # Started by the first default-candidate TopK: a server without TopK traffic has no thread.
        with self._warmer_lock:
            if self._warmer is None:
                self._warmer = queries.CacheWarmer(self._live, self.cache)
                self._warmer.start()

    def _score(self, q: convert.ScoreQuery) -> queries.ScoreResult:
        if self.score_batches is None:
            return self._gated(queries.score, self._live, q)
        return self.score_batches.submit(q)

    def _top_k(self, q: convert.TopKQuery) -> queries.TopKResult:
        if q.candidates is None and self._config.warm_candidates and self._warmer is None:
            self._start_warmer()
        if self.topk_batches is None or q.candidates is not None:
            return self._gated(queries.top_k, self._live, q, self.cache)
        return self.topk_batches.submit(q)

    def _answer(self, context: grpc.ServicerContext, method: str, compute: Callable[[], R]) -> R:
        if self._live.restoring and method != "GetModelInfo":
            context.abort(grpc.StatusCode.UNAVAILABLE, RESTORING_DETAILS)
        try:
            return compute()
        except RequestError as exc:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except queries.NonFiniteResult as exc:
            code, details = grpc.StatusCode.INTERNAL, str(exc)
            self._count_nonfinite(exc, method)
        except Exception as exc:  # the server must outlive any bug in one request
            log.exception("%s failed", method)
            code, details = grpc.StatusCode.INTERNAL, f"internal error in {method} ({type(exc).__name__})"
        context.abort(code, details)  # raises
        raise AssertionError("unreachable")

    def _count_nonfinite(self, exc: queries.NonFiniteResult, method: str) -> None:
        if self._metrics is not None:
            self._metrics.nonfinite.labels(exc.where).inc()
        # Every occurrence is counted; the log gets the first and then every 1,000th.
        if self._nonfinite_logged % 1000 == 0:
            log.error(
                "%s: %s (occurrence %d; tgnstream_nonfinite_total counts all)",
                method,
                exc,
                self._nonfinite_logged + 1,
            )
        self._nonfinite_logged += 1

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        return self._answer(
            context,
            "Score",
            lambda: convert.score_reply(self._score(convert.parse_score(request, self._config))),
        )

    def TopK(self, request: pb.TopKRequest, context: grpc.ServicerContext) -> pb.TopKResponse:
        return self._answer(
            context,
            "TopK",
            lambda: convert.topk_reply(self._top_k(convert.parse_topk(request, self._config))),
        )

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        return self._answer(
            context,
            "Embed",
            lambda: convert.embed_reply(
                self._gated(queries.embed, self._live, convert.parse_embed(request, self._config))
            ),
        )

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        live = self._live
        return self._answer(
            context,
            "GetModelInfo",
            lambda: convert.model_info_reply(live.consistent(lambda: queries.model_info(live))),
        )
