"""Streaming evaluation: score each batch, then apply it (TGB protocol); no gradient."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tgnstream.core.engine import MemoryEngine
from tgnstream.core.evaluation import average_precision, reciprocal_ranks, roc_auc
from tgnstream.core.events import TemporalDataset
from tgnstream.core.negatives import NegativeSampler
from tgnstream.core.step import TemporalStep

__all__ = ["EvalSettings", "evaluate_stream", "summarise"]


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate a span of the stream.

    rank_all_max: rank against every destination when there are at most this many, else
        against ``sampled_negatives`` (half historical, half uniform) per positive.
    rank: compute MRR/hits@10 (costly) or only AP/AUC.
    candidate_time: when ranking against every destination, the time candidates are embedded
        at: ``"query"`` (the batch start, exact) or ``"last_change"`` (what a server with
        ``grpc.topk_candidate_time: last_change`` answers; see ``MemoryEngine.candidate_times``).
    """

    batch_size: int = 200
    rank: bool = True
    rank_all_max: int = 5000
    sampled_negatives: int = 100
    seed: int = 12345
    progress: bool = False
    candidate_time: str = "query"


@torch.no_grad()
def evaluate_stream(
    engine: MemoryEngine, data: TemporalDataset, start: int, stop: int, settings: EvalSettings
) -> dict[str, torch.Tensor]:
    """Score events ``[start, stop)`` batch by batch with the shared step, applying each batch
    after scoring it (evaluation never teaches the PRES statistics).

    Returns per-event tensors: ``pos`` and ``neg`` logits (one uniform negative each) and,
    when ranking, ``rr`` reciprocal ranks. The engine's state moves forward to ``stop``.
    """
    was_training = engine.training
    engine.eval()
    dev = engine.device
    sampler = NegativeSampler(
        data.dst_nodes if data.bipartite else torch.arange(data.num_nodes), settings.seed, dev
    )
    rank_pool = data.dst_nodes.to(dev)
    rank_all = rank_pool.numel() <= settings.rank_all_max
    step = TemporalStep(engine)
    pos_all, neg_all, rr_all = [], [], []
    steps = range(start, stop, settings.batch_size)
    for i in tqdm(steps, desc="eval", disable=not settings.progress, leave=False):
        batch = data.events.slice(i, min(i + settings.batch_size, stop)).to(dev)
        neg = sampler.sample(batch.src)
        b = len(batch)
        scored = step.score_batch(batch, neg)
        pos_all.append(scored.pos.cpu())
        neg_all.append(scored.neg.cpu())
        if settings.rank:
            if rank_all:
                scores = step.rank(batch, rank_pool, candidate_time=settings.candidate_time)
                col = torch.searchsorted(rank_pool, batch.dst)
                rows = torch.arange(b, device=dev)
                pos_s = scores[rows, col]
                scores[rows, col] = float("-inf")
                rr_all.append(reciprocal_ranks(pos_s, scores))
            else:
                cands = sampler.sample(
                    batch.src, settings.sampled_negatives, 0.5, engine.neighbors, exclude=batch.dst
                )
                rr_all.append(reciprocal_ranks(scored.pos, step.score_candidates(batch, cands)))
        step.apply(scored)
    engine.train(was_training)
    out = {"pos": torch.cat(pos_all), "neg": torch.cat(neg_all)}
    if settings.rank:
        out["rr"] = torch.cat(rr_all)
    return out


def summarise(scores: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> dict:
    """AP, AUC and (if ranked) MRR, hits@10 over the events selected by ``mask``."""
    pos, neg = scores["pos"], scores["neg"]
    if mask is not None:
        pos, neg = pos[mask], neg[mask]
    n = int(pos.numel())
    if n == 0:
        return {"n_events": 0}
    y = torch.cat([torch.ones(n), torch.zeros(n)])
    s = torch.cat([pos, neg])
    out = {"n_events": n, "ap": average_precision(s, y), "auc": roc_auc(s, y)}
    if "rr" in scores:
        rr = scores["rr"] if mask is None else scores["rr"][mask]
        out["mrr"] = float(rr.mean())
        out["hits@10"] = float(((1.0 / rr) <= 10).double().mean())
    return out
