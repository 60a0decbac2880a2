"""Streaming evaluation: score each batch, then apply it (TGB protocol); no gradient. One
protocol (``EvalSettings``) for models and heuristic baselines alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from tgnstream.core.engine import MemoryEngine
from tgnstream.core.evaluation import as_scalar_scores, average_precision, reciprocal_ranks, roc_auc
from tgnstream.core.events import EventBatch, TemporalDataset
from tgnstream.core.negatives import NegativeSampler
from tgnstream.core.neighbors import RecentNeighbors
from tgnstream.core.step import TemporalStep

__all__ = [
    "EvalSettings",
    "ModelScorer",
    "StreamScorer",
    "candidate_pool",
    "evaluate_stream",
    "inductive_mask",
    "summarise",
]


@dataclass(frozen=True)
class EvalSettings:
    """The evaluation protocol: how a span of the stream is scored, shared by every model and
    every heuristic baseline (``describe`` records it in each ``results.json``).

    batch_size: events scored per batch. Memory (a model's) and the heuristics' history with
        ``history="batch"`` move once per batch; pair statistics and ``history="event"``
        heuristics also see the batch's earlier events (never the event itself or a later one).
    rank: compute MRR/hits@10 (costly) or only AP/AUC.
    rank_all_max: rank against every candidate (the destinations of a bipartite graph, else
        every node) when there are at most this many, else against ``sampled_negatives`` per
        positive, half from the source's 10 most recent partners (historical), half uniform.
    seed: of the negative sampler (one uniform negative per event for AP/AUC; the sampled
        candidates): every scorer evaluated with the same seed sees the same negatives.
    candidate_time: when ranking against every destination, the time candidates are embedded
        at: ``"query"`` (the batch start, exact) or ``"last_change"`` (what a server with
        ``grpc.topk_candidate_time: last_change`` answers; see ``MemoryEngine.candidate_times``).
    """

    batch_size: int = 200
    rank: bool = True
    rank_all_max: int = 10_000
    sampled_negatives: int = 100
    seed: int = 12345
    progress: bool = False
    candidate_time: str = "query"

    def describe(self, data: TemporalDataset) -> dict:
        """The protocol as recorded in ``results.json``: what makes two rows comparable."""
        pool = candidate_pool(data)
        rank_all = pool.numel() <= self.rank_all_max
        return {
            "batch_size": self.batch_size,
            "candidates": (
                f"all {pool.numel()} {'destinations' if data.bipartite else 'nodes'}"
                if rank_all
                else f"{self.sampled_negatives} sampled per positive (half historical, half uniform)"
            ),
            "ties": "count half (rank = 1 + greater + ties / 2)",
            "history": "applied per batch; pair statistics and history='event' heuristics per event",
            "pairs": "unordered (u-v and v-u are one pair)",
            "ap_auc_negatives": "one uniform negative per event",
            "negative_seed": self.seed,
            "candidate_time": self.candidate_time,
        }


def candidate_pool(data: TemporalDataset) -> torch.Tensor:
    """Sorted ids ``[D]`` every positive is ranked against: the destinations of a bipartite
    graph (pages), else every node."""
    return data.dst_nodes if data.bipartite else torch.arange(data.num_nodes)


class StreamScorer(Protocol):
    """What ``evaluate_stream`` needs of a model or a baseline. Scores are ``[*]`` floats or
    ``[*, J]`` lexicographic keys (see ``core.evaluation``); higher means more likely."""

    device: torch.device

    def score(self, batch: EventBatch, neg_dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Positive and negative scores ``[B]`` of a not-yet-applied batch, plus what ``apply`` needs."""

    def rank(self, batch: EventBatch, candidates: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, Q]`` of each event's source against every candidate ``[Q]``."""

    def score_candidates(self, batch: EventBatch, candidates: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, Q]`` of each event's source against its own candidates ``[B, Q]``."""

    def apply(self, scored: Any) -> None:
        """Move the state past the batch."""


class ModelScorer:
    """A ``MemoryEngine`` scored through the shared step (evaluation never teaches PRES)."""

    def __init__(self, engine: MemoryEngine, candidate_time: str = "query"):
        self.engine = engine
        self.device = engine.device
        self.step = TemporalStep(engine)
        self.candidate_time = candidate_time

    def score(self, batch, neg_dst):
        scored = self.step.score_batch(batch, neg_dst)
        return scored.pos, scored.neg, scored

    def rank(self, batch, candidates):
        return self.step.rank(batch, candidates, candidate_time=self.candidate_time)

    def score_candidates(self, batch, candidates):
        return self.step.score_candidates(batch, candidates)

    def apply(self, scored):
        self.step.apply(scored)


def _protocol_history(data: TemporalDataset, start: int, device: torch.device) -> RecentNeighbors:
    """The 10 most recent partners of every node from the events before ``start`` (the
    historical negatives of the sampled protocol, the same for every scorer)."""
    table = RecentNeighbors(data.num_nodes, 10, 0, device)
    for i in range(0, start, 100_000):
        b = data.events.slice(i, min(i + 100_000, start)).to(device)
        table.insert(b.src, b.dst, b.t, b.feats[:, :0])
    return table


@torch.no_grad()
def evaluate_stream(
    scorer: MemoryEngine | StreamScorer, data: TemporalDataset, start: int, stop: int, settings: EvalSettings
) -> dict[str, torch.Tensor]:
    """Score events ``[start, stop)`` batch by batch, applying each batch after scoring it, with
    the protocol of ``settings``. ``scorer``: a model (``MemoryEngine``, through the shared
    step) or a baseline (``core.heuristics``), whose state reflects the events before ``start``.

    Returns per-event tensors: ``pos`` and ``neg`` scores (one uniform negative each) and,
    when ranking, ``rr`` reciprocal ranks. The scorer's state moves forward to ``stop``.
    """
    engine = scorer if isinstance(scorer, MemoryEngine) else None
    if engine is not None:
        was_training = engine.training
        engine.eval()
        scorer = ModelScorer(engine, settings.candidate_time)
    dev = scorer.device
    sampler = NegativeSampler(candidate_pool(data), settings.seed, dev)
    rank_pool = candidate_pool(data).to(dev)
    rank_all = rank_pool.numel() <= settings.rank_all_max
    history = None
    if settings.rank and not rank_all:
        history = _protocol_history(data, start, dev)
    pos_all, neg_all, rr_all = [], [], []
    steps = range(start, stop, settings.batch_size)
    for i in tqdm(steps, desc="eval", disable=not settings.progress, leave=False):
        batch = data.events.slice(i, min(i + settings.batch_size, stop)).to(dev)
        neg = sampler.sample(batch.src)
        b = len(batch)
        pos_s, neg_s, scored = scorer.score(batch, neg)
        pos_all.append(pos_s.cpu())
        neg_all.append(neg_s.cpu())
        if settings.rank:
            if rank_all:
                scores = scorer.rank(batch, rank_pool)
                col = torch.searchsorted(rank_pool, batch.dst)
                rows = torch.arange(b, device=dev)
                present = torch.ones(scores.shape[:2], dtype=torch.bool, device=dev)
                present[rows, col] = False  # the positive itself is not its own negative
                rr_all.append(reciprocal_ranks(scores[rows, col], scores, present))
            else:
                cands = sampler.sample(batch.src, settings.sampled_negatives, 0.5, history, exclude=batch.dst)
                rr_all.append(reciprocal_ranks(pos_s, scorer.score_candidates(batch, cands)))
                history.insert(batch.src, batch.dst, batch.t, batch.feats[:, :0])
        scorer.apply(scored)
    if engine is not None:
        engine.train(was_training)
    # An empty range scores nothing: empty tensors (summarise reports n_events 0), not an error.
    empty = torch.empty(0)
    out = {"pos": torch.cat(pos_all) if pos_all else empty, "neg": torch.cat(neg_all) if neg_all else empty}
    if settings.rank:
        out["rr"] = torch.cat(rr_all) if rr_all else empty
    return out


def inductive_mask(data: TemporalDataset, train_stop: int, start: int, stop: int) -> torch.Tensor:
    """``[stop - start]`` bool: events of ``[start, stop)`` with an endpoint never seen in the
    training events ``[0, train_stop)`` (the inductive rows of a results table)."""
    seen = torch.zeros(data.num_nodes, dtype=torch.bool)
    seen[data.events.src[:train_stop]] = True
    seen[data.events.dst[:train_stop]] = True
    src, dst = data.events.src[start:stop], data.events.dst[start:stop]
    return ~seen[src] | ~seen[dst]


def summarise(scores: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> dict:
    """AP, AUC and (if ranked) MRR, hits@10 over the events selected by ``mask``."""
    pos, neg = scores["pos"], scores["neg"]
    if mask is not None:
        pos, neg = pos[mask], neg[mask]
    n = int(pos.shape[0])
    if n == 0:
        return {"n_events": 0}
    pos, neg = as_scalar_scores(pos, neg)
    y = torch.cat([torch.ones(n), torch.zeros(n)])
    s = torch.cat([pos, neg])
    out = {"n_events": n, "ap": average_precision(s, y), "auc": roc_auc(s, y)}
    if "rr" in scores:
        rr = scores["rr"] if mask is None else scores["rr"][mask]
        out["mrr"] = float(rr.mean())
        out["hits@10"] = float(((1.0 / rr) <= 10).double().mean())
    return out
