"""Prequential quality: score live events *before* they are applied, as the served model sees
them, and keep a rolling AP and MRR (the live counterpart of the offline test metrics)."""

from __future__ import annotations

import time
from collections import deque

import torch

from tgnstream.core.evaluation import average_precision, reciprocal_ranks
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep
from tgnstream.ingest.config import QualityConfig
from tgnstream.runtime.live import LiveEngine

__all__ = ["PrequentialQuality"]


class PrequentialQuality:
    """Rolling AP (one random negative destination per event) and MRR (each event ranked against
    ``negatives`` random destinations, ties half) over the last ``window`` scored events.

    Each call scores up to ``events_per_batch`` sampled events of a not-yet-applied batch with the
    same semantics as offline evaluation (state before the batch; pair statistics see only the
    batch's earlier events).
    """

    def __init__(self, config: QualityConfig):
        self.config = config
        self._gen = torch.Generator().manual_seed(config.seed)
        self._pos: deque[float] = deque(maxlen=config.window)
        self._neg: deque[float] = deque(maxlen=config.window)
        self._rr: deque[float] = deque(maxlen=config.window)
        self._last_at = float("-inf")

    def __len__(self) -> int:
        return len(self._rr)

    def due(self) -> bool:
        """Whether the next ``observe`` would score (enabled, and the interval has passed)."""
        cfg = self.config
        return cfg.enabled and (time.monotonic() - self._last_at) * 1000 >= cfg.min_interval_ms

    def observe(
        self,
        live: LiveEngine,
        batch: EventBatch,
        pick: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
        among: torch.Tensor | None = None,
    ) -> int:
        """Score a sample of ``batch`` (dense ids, not yet applied); returns how many were scored.

        ``among`` (sorted event positions): sample only these (the events that just arrived in
        an open batch; the others were scored when they arrived). ``pick`` (sorted event
        positions) and ``negatives`` (``[M]`` destination ids) override the random sample (tests).
        """
        cfg = self.config
        if len(batch) == 0 or not self.due():
            return 0
        self._last_at = time.monotonic()
        if pick is None and among is not None:
            pick = among[torch.randperm(among.numel(), generator=self._gen)]
            pick = pick[: cfg.events_per_batch].sort().values
        with live.read() as engine:
            pool = engine.destinations()
            if pool.numel() < 2:
                return 0
            if pick is None:
                n = len(batch)
                pick = torch.randperm(n, generator=self._gen)[: min(cfg.events_per_batch, n)].sort().values
            pick = pick.to(batch.device)
            s = pick.numel()
            negs = negatives
            if negs is None:
                draw = torch.randint(pool.numel(), (cfg.negatives,), generator=self._gen)
                negs = pool[draw.to(pool.device)]
            dst = batch.dst[pick]
            candidates = torch.cat([negs, dst])
            logits = TemporalStep(engine).rank(batch, candidates, pick).float().cpu()
        m = negs.numel()
        rows = torch.arange(s)
        pos = logits[rows, m + rows]
        neg = logits[:, :m].masked_fill(negs.cpu().unsqueeze(0) == dst.cpu().unsqueeze(1), float("-inf"))
        one_neg = neg[rows, rows % m]
        keep = torch.isfinite(one_neg)
        self._pos.extend(pos.tolist())
        self._neg.extend(one_neg[keep].tolist())
        self._rr.extend(reciprocal_ranks(pos, neg).tolist())
        return s

    def ap(self) -> float | None:
        if not self._pos or not self._neg:
            return None
        scores = torch.tensor(list(self._pos) + list(self._neg))
        labels = torch.cat([torch.ones(len(self._pos)), torch.zeros(len(self._neg))])
        return average_precision(scores, labels)

    def mrr(self) -> float | None:
        return sum(self._rr) / len(self._rr) if self._rr else None
