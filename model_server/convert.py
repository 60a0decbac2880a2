"""Requests in, replies out: protobuf <-> plain Python, with every validation rule in one place.

Parsing needs no engine (so it runs before any lock is taken); checks that need the state
(strict unknown candidates) live in ``queries.py`` and raise the same ``RequestError``. Every
``RequestError`` becomes INVALID_ARGUMENT with its message.

Rules (the contract):
- ids (Score pairs' src and dst, TopK src and candidates, Embed nodes) must be non-empty strings
  of at most ``MAX_ID_BYTES`` (512) bytes of UTF-8, the limit ingest applies to the ids it
  accepts; times, when set, finite and within ±MAX_ABS_EVENT_TIME_S (unset = the server's
  watermark), and (checked in ``queries.py``, against the state) within
  [first event - query_time_slack_s, watermark + query_time_slack_s] once events exist;
- Score: 1..max_pairs pairs; duplicate pairs are allowed (each is answered);
- TopK: 1 <= k <= max_k; at most max_candidates candidates, all distinct (a duplicate would
  take two of the k places); an empty list means "every destination";
- Embed: 1..max_embed_nodes nodes; duplicates allowed (answered in request order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tgnstream.core.events import MAX_ABS_EVENT_TIME_S
from tgnstream.core.idmap import MAX_ID_BYTES
from tgnstream.model_server.config import GrpcConfig
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.runtime.live import StateStamp

if TYPE_CHECKING:  # queries imports RequestError from here; results are only annotations
    from tgnstream.model_server.queries import EmbedResult, ModelInfoResult, ScoreResult, TopKResult

__all__ = [
    "RequestError",
    "ScoreQuery",
    "TopKQuery",
    "EmbedQuery",
    "parse_score",
    "parse_topk",
    "parse_embed",
    "stamp_to_proto",
    "score_reply",
    "topk_reply",
    "embed_reply",
    "model_info_reply",
]


class RequestError(ValueError):
    """A request the server will not answer as asked (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class ScoreQuery:
    """``src[i]``, ``dst[i]``: the i-th pair; ``time`` None = at the watermark."""

    src: list[str]
    dst: list[str]
    time: float | None
    time_slack_s: float | None = None  # None: the time is not checked against the state


@dataclass(frozen=True)
class TopKQuery:
    """``candidates`` None = every destination seen; ``strict`` already merged with the config."""

    src: str
    k: int
    candidates: list[str] | None
    exclude_seen: bool
    time: float | None
    strict: bool
    time_slack_s: float | None = None


@dataclass(frozen=True)
class EmbedQuery:
    nodes: list[str]
    time: float | None
    time_slack_s: float | None = None


def _time(request) -> float | None:
    if not request.HasField("time"):
        return None
    t = float(request.time)
    if not math.isfinite(t):
        raise RequestError(f"time must be a finite number of seconds, got {t}")
    if abs(t) > MAX_ABS_EVENT_TIME_S:
        raise RequestError(
            f"time {t!r} is beyond ±{MAX_ABS_EVENT_TIME_S:g} s: times are in seconds (milliseconds?)"
        )
    return t


# A str of at most this many characters cannot exceed MAX_ID_BYTES (<= 4 UTF-8 bytes a
# character): only longer ids are measured precisely.
_SAFE_ID_CHARS = MAX_ID_BYTES // 4


def _utf8_size(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8"))


def _too_long(field: str, size: int) -> RequestError:
    return RequestError(f"{field} is {size} bytes of UTF-8, more than the {MAX_ID_BYTES} allowed")


def _check_ids(ids: list[str], field: str) -> None:
    """``field``: the name of ``ids[i]`` with ``{}`` for ``i`` (e.g. ``pairs[{}].src``)."""
    # C-level scans in the common case (no empty id, every id short); the loops only run to
    # name the culprit or to measure ids long enough to possibly exceed the limit.
    if "" in ids:
        raise RequestError(f"{field.format(ids.index(''))} is empty: node ids must be non-empty strings")
    if ids and max(map(len, ids)) > _SAFE_ID_CHARS:
        for i, s in enumerate(ids):
            if len(s) > _SAFE_ID_CHARS and (size := _utf8_size(s)) > MAX_ID_BYTES:
                raise _too_long(field.format(i), size)


def parse_score(request: pb.ScoreRequest, config: GrpcConfig) -> ScoreQuery:
    n = len(request.pairs)
    if n == 0:
        raise RequestError("pairs is empty: send at least one (src, dst) pair")
    if n > config.max_pairs:
        raise RequestError(f"too many pairs: {n} > max_pairs {config.max_pairs}; split the request")
    src = [p.src for p in request.pairs]
    dst = [p.dst for p in request.pairs]
    _check_ids(src, "pairs[{}].src")
    _check_ids(dst, "pairs[{}].dst")
    return ScoreQuery(src, dst, _time(request), config.query_time_slack_s)


def parse_topk(request: pb.TopKRequest, config: GrpcConfig) -> TopKQuery:
    src = request.src
    if not src:
        raise RequestError("src is empty: node ids must be non-empty strings")
    if len(src) > _SAFE_ID_CHARS and (size := _utf8_size(src)) > MAX_ID_BYTES:
        raise _too_long("src", size)
    k = int(request.k)
    if not 1 <= k <= config.max_k:
        raise RequestError(f"k must be in [1, {config.max_k}], got {k}")
    candidates: list[str] | None = None
    if len(request.candidates):
        n = len(request.candidates)
        if n > config.max_candidates:
            raise RequestError(f"too many candidates: {n} > max_candidates {config.max_candidates}")
        candidates = list(request.candidates)
        _check_ids(candidates, "candidates[{}]")
        if len(set(candidates)) != n:
            seen: set[str] = set()
            dup = next(c for c in candidates if c in seen or seen.add(c))
            raise RequestError(f"candidates must be distinct: {dup!r} appears more than once")
    return TopKQuery(
        src=src,
        k=k,
        candidates=candidates,
        exclude_seen=bool(request.exclude_seen),
        time=_time(request),
        strict=bool(request.strict) or config.strict_candidates,
        time_slack_s=config.query_time_slack_s,
    )


def parse_embed(request: pb.EmbedRequest, config: GrpcConfig) -> EmbedQuery:
    n = len(request.nodes)
    if n == 0:
        raise RequestError("nodes is empty: send at least one node id")
    if n > config.max_embed_nodes:
        raise RequestError(f"too many nodes: {n} > max_embed_nodes {config.max_embed_nodes}")
    nodes = list(request.nodes)
    _check_ids(nodes, "nodes[{}]")
    return EmbedQuery(nodes, _time(request), config.query_time_slack_s)


def stamp_to_proto(stamp: StateStamp) -> pb.StateStamp:
    return pb.StateStamp(
        model_version=stamp.model_version, events_applied=stamp.events_applied, watermark=stamp.watermark
    )


def score_reply(r: ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        probabilities=r.probabilities.tolist(),
        src_unknown=r.src_unknown.tolist(),
        dst_unknown=r.dst_unknown.tolist(),
        state=stamp_to_proto(r.stamp),
    )


def topk_reply(r: TopKResult) -> pb.TopKResponse:
    return pb.TopKResponse(
        results=[
            pb.ScoredNode(id=i, probability=p, unknown=u)
            for i, p, u in zip(r.ids, r.probabilities, r.unknown)
        ],
        src_unknown=r.src_unknown,
        state=stamp_to_proto(r.stamp),
    )


def embed_reply(r: EmbedResult) -> pb.EmbedResponse:
    return pb.EmbedResponse(
        embeddings=[
            pb.Embedding(id=i, values=v, unknown=u)
            for i, v, u in zip(r.ids, r.values.tolist(), r.unknown.tolist())
        ],
        dim=r.dim,
        state=stamp_to_proto(r.stamp),
    )


def model_info_reply(r: ModelInfoResult) -> pb.ModelInfo:
    return pb.ModelInfo(
        model_version=r.stamp.model_version,
        events_applied=r.stamp.events_applied,
        watermark=r.stamp.watermark,
        num_nodes=r.num_nodes,
        model=r.model,
        embedding_dim=r.embedding_dim,
        device=r.device,
        next_offsets=r.next_offsets,
    )
