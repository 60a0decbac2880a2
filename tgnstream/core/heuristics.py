"""Memorization heuristics as baselines, scored through the same evaluation protocol as models.

Each heuristic scores a pair (u, v) at time t from the history before t, with no learning:

- ``recency``: time of the last u-v event (local recency; -inf if never);
- ``popularity``: number of u-v events (local popularity);
- ``global_recency``: time of v's last event with anyone;
- ``global_popularity``: number of v's events with anyone;
- ``edgebank``: 1 if u-v was ever seen, else 0 (EdgeBank with unlimited memory);
- ``edgebank_tw``: 1 if u-v was seen within the last ``window`` seconds (EdgeBank, time window).

``a>b`` combines them lexicographically: ``a`` decides, ``b`` breaks its ties (scores become
``[*, 2]`` keys; ``core.evaluation`` compares them key by key). Pairs are unordered, as in the
model's pair statistics. History granularity: ``"event"`` (a query sees every earlier event,
its own batch's included, as the model's pair statistics do) or ``"batch"`` (only batches
already applied, as the model's memory does).
"""

from __future__ import annotations

import torch

from tgnstream.core.edge_history import EdgeHistory
from tgnstream.core.events import EventBatch
from tgnstream.core.neighbors import RecentNeighbors
from tgnstream.core.pair_stats import pairwise_stats, ranking_stats

__all__ = ["HEURISTICS", "DEFAULT_BASELINES", "HeuristicScorer", "parse_heuristic"]

HEURISTICS = ("recency", "popularity", "global_recency", "global_popularity", "edgebank", "edgebank_tw")

#: What ``tgnstream baseline`` evaluates by default: every heuristic and the lexicographic
#: combinations of a local key with a global tie-breaker.
DEFAULT_BASELINES = HEURISTICS + (
    "recency>global_recency",
    "recency>global_popularity",
    "popularity>global_recency",
    "popularity>global_popularity",
    "edgebank>global_popularity",
    "edgebank_tw>global_popularity",
)


def parse_heuristic(spec: str) -> tuple[str, ...]:
    """``"recency>global_popularity"`` -> ``("recency", "global_popularity")``; a clear error for
    an unknown name."""
    keys = tuple(k.strip() for k in spec.split(">"))
    unknown = [k for k in keys if k not in HEURISTICS]
    if not keys or unknown:
        raise ValueError(f"unknown heuristic {unknown or spec!r} in {spec!r}; known: {', '.join(HEURISTICS)}")
    return keys


class HeuristicScorer:
    """A ``StreamScorer`` (see ``core.stream_eval``) for one heuristic or combination.

    State (all tensors): ``history`` (``EdgeHistory``: count and last time per pair) and
    ``nodes`` (a ``RecentNeighbors`` of width 1: each node's event count and newest event time).

    Args:
        spec: a name of ``HEURISTICS`` or ``a>b>...``.
        num_nodes: node ids are ``0 .. num_nodes - 1``.
        window: ``edgebank_tw``'s window in seconds (required by it).
        history: ``"event"`` or ``"batch"`` (see the module docstring).
    """

    def __init__(
        self,
        spec: str,
        num_nodes: int,
        window: float | None = None,
        history: str = "event",
        device: torch.device | str = "cpu",
    ):
        self.keys = parse_heuristic(spec)
        if "edgebank_tw" in self.keys and (window is None or not window > 0):
            raise ValueError(f"edgebank_tw needs a positive time window, got {window!r}")
        if history not in ("event", "batch"):
            raise ValueError(f"history must be 'event' or 'batch', got {history!r}")
        self.spec, self.window, self.history_mode = spec, window, history
        self.device = torch.device(device)
        self.history = EdgeHistory(device=self.device)
        self.nodes = RecentNeighbors(num_nodes, 1, 0, self.device)

    # ------------------------------------------------------------------------------ state
    def observe(self, batch: EventBatch) -> None:
        """Add a time-ordered batch of events to the history."""
        if len(batch):
            self.history.insert(batch.src, batch.dst, batch.t)
            self.nodes.insert(batch.src, batch.dst, batch.t, batch.feats[:, :0])

    def observe_all(self, events: EventBatch, chunk: int = 100_000) -> None:
        """Add a long prefix of the stream (e.g. everything before the evaluated span)."""
        for i in range(0, len(events), chunk):
            self.observe(events.slice(i, min(i + chunk, len(events))))

    # ----------------------------------------------------------------------------- scoring
    def _visible(self, batch: EventBatch, per_event: torch.Tensor):
        """The batch context and per-query visibility, or none with ``history="batch"``."""
        if self.history_mode == "batch":
            return None, None
        return batch, per_event

    def _keys(self, t, pair_count, pair_last, node_count, node_last) -> torch.Tensor:
        t = torch.broadcast_to(t, pair_last.shape)
        values = {
            "recency": lambda: pair_last,
            "popularity": lambda: pair_count.double(),
            "global_recency": lambda: node_last,
            "global_popularity": lambda: node_count.double(),
            "edgebank": lambda: (pair_count > 0).double(),
            "edgebank_tw": lambda: ((pair_count > 0) & (pair_last >= t - self.window)).double(),
        }
        keys = [values[k]() for k in self.keys]
        return keys[0] if len(keys) == 1 else torch.stack(keys, -1)

    def _pair_keys(self, u, v, t, context, visible) -> torch.Tensor:
        stats = pairwise_stats(self.history, self.nodes, u, v, context, visible)
        return self._keys(t, stats.count, stats.last, stats.count_v, stats.latest_v)

    def score(self, batch: EventBatch, neg_dst: torch.Tensor):
        b = len(batch)
        context, visible = self._visible(batch, torch.arange(b, device=self.device).repeat(2))
        keys = self._pair_keys(
            batch.src.repeat(2), torch.cat([batch.dst, neg_dst]), batch.t.repeat(2), context, visible
        )
        return keys[:b], keys[b:], batch

    def score_candidates(self, batch: EventBatch, candidates: torch.Tensor) -> torch.Tensor:
        b, q = candidates.shape
        visible = torch.arange(b, device=self.device).repeat_interleave(q)
        context, visible = self._visible(batch, visible)
        src, t = batch.src.repeat_interleave(q), batch.t.repeat_interleave(q)
        keys = self._pair_keys(src, candidates.flatten(), t, context, visible)
        return keys.view(b, q, *keys.shape[1:])

    def rank(self, batch: EventBatch, candidates: torch.Tensor) -> torch.Tensor:
        b = len(batch)
        context, visible = self._visible(batch, torch.arange(b, device=self.device))
        stats = ranking_stats(self.history, self.nodes, batch.src, candidates, context, visible)
        return self._keys(batch.t.unsqueeze(1), stats.count, stats.last, stats.count_v, stats.latest_v)

    def apply(self, batch: EventBatch) -> None:
        self.observe(batch)
