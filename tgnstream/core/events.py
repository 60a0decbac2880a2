"""Event containers shared by every service: one batch of interactions, a whole stream."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["MAX_ABS_EVENT_TIME_S", "EventBatch", "TemporalDataset"]


#: Largest |time| in seconds accepted anywhere (events and queries) by default: about year 5100
#: in Unix seconds, so Unix times in milliseconds (or finer) are refused rather than applied.
MAX_ABS_EVENT_TIME_S = 1e11


@dataclass(frozen=True)
class EventBatch:
    """A chronologically ordered batch of interaction events, already mapped to dense ids.

    Attributes:
        src: ``[B]`` int64 source node indices.
        dst: ``[B]`` int64 destination node indices.
        t: ``[B]`` float64 event times in seconds, non-decreasing.
        feats: ``[B, d_edge]`` float32 edge features (``d_edge`` may be 0).
    """

    src: torch.Tensor
    dst: torch.Tensor
    t: torch.Tensor
    feats: torch.Tensor
    # Indices derived from the batch, built once however many queries use it as context (a
    # serving open batch is shared by every query until it closes). The tensors are never
    # modified in place, so what is derived from them stays valid.
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def derived(self, name: str, build):
        """``build()`` computed once per batch and name."""
        value = self._derived.get(name)
        if value is None:
            value = self._derived[name] = build()
        return value

    def __post_init__(self) -> None:
        n = self.src.shape[0]
        if self.dst.shape[0] != n or self.t.shape[0] != n or self.feats.shape[0] != n:
            raise ValueError(
                f"EventBatch fields disagree on length: src {n}, dst {self.dst.shape[0]}, "
                f"t {self.t.shape[0]}, feats {self.feats.shape[0]}"
            )
        if self.feats.dim() != 2:
            raise ValueError(f"feats must be [B, d_edge], got shape {tuple(self.feats.shape)}")

    def __len__(self) -> int:
        return int(self.src.shape[0])

    @property
    def device(self) -> torch.device:
        return self.src.device

    def to(self, device: torch.device | str) -> EventBatch:
        return EventBatch(self.src.to(device), self.dst.to(device), self.t.to(device), self.feats.to(device))

    def slice(self, start: int, stop: int) -> EventBatch:
        return EventBatch(
            self.src[start:stop], self.dst[start:stop], self.t[start:stop], self.feats[start:stop]
        )

    @staticmethod
    def concat(batches: list[EventBatch]) -> EventBatch:
        """The batches one after the other (they must be in time order among themselves)."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        return EventBatch(
            torch.cat([b.src for b in batches]),
            torch.cat([b.dst for b in batches]),
            torch.cat([b.t for b in batches]),
            torch.cat([b.feats for b in batches]),
        )

    def select(self, rows: torch.Tensor) -> EventBatch:
        """The events at ``rows [m]`` (increasing keeps the time order)."""
        return EventBatch(self.src[rows], self.dst[rows], self.t[rows], self.feats[rows])

    @staticmethod
    def from_lists(src: list[int], dst: list[int], t: list[float], d_edge: int = 0) -> EventBatch:
        """Convenience constructor for tests and small hand-built streams."""
        n = len(src)
        return EventBatch(
            torch.tensor(src, dtype=torch.long),
            torch.tensor(dst, dtype=torch.long),
            torch.tensor(t, dtype=torch.float64),
            torch.zeros(n, d_edge, dtype=torch.float32),
        )


@dataclass(frozen=True)
class TemporalDataset:
    """A whole event stream in time order, plus what evaluation needs to know about it.

    Attributes:
        events: all events, time-ordered, dense ids in ``[0, num_nodes)``.
        labels: ``[E]`` int64 per-event labels (0 when the source has none).
        num_nodes: number of distinct dense ids.
        dst_nodes: ``[D]`` int64 sorted ids that ever appear as destination; for bipartite graphs
            negatives are drawn from here.
        bipartite: True when no id appears both as a source and as a destination.
        name: human-readable name, used in reports.
        raw_ids: optional original id per dense index (strings), for mapping results back.
    """

    events: EventBatch
    labels: torch.Tensor
    num_nodes: int
    dst_nodes: torch.Tensor
    bipartite: bool
    name: str = "dataset"
    raw_ids: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.events)

    @property
    def edge_dim(self) -> int:
        return int(self.events.feats.shape[1])

    def chronological_split(self, val_frac: float = 0.15, test_frac: float = 0.15) -> tuple[int, int]:
        """Return ``(val_start, test_start)`` event indices of a chronological split by order."""
        if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
            raise ValueError(f"bad split fractions val={val_frac} test={test_frac}")
        n = len(self)
        val_start = int(round(n * (1 - val_frac - test_frac)))
        test_start = int(round(n * (1 - test_frac)))
        return val_start, test_start
