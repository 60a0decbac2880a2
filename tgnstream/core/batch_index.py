"""Per-key prefix lookups into a batch: which of a batch's events before position k carry a key.

Both per-event views of a not-yet-applied batch use it: pair statistics (key = the pair) and
batch neighbours (key = the node). Sorting the batch's entries by (key, event) once and doing two
binary searches per query costs O((E + N) log E), instead of comparing every query with every
event (O(N * B), which dominated large training batches).
"""

from __future__ import annotations

import torch

__all__ = ["KeyedBatch"]


class KeyedBatch:
    """A batch's entries grouped by key, events ascending within a key.

    Args:
        keys: ``[R * B]`` int64 key of each entry, laid out role by role (entry ``j`` belongs to
            event ``j % B``; R = 1 for one key per event, 2 for src and dst roles).
        num_events: B.

    ``order [R * B]`` is the sort permutation: ``values[order]`` lines any per-entry values up
    with ``lookup``'s positions.
    """

    def __init__(self, keys: torch.Tensor, num_events: int):
        self.num_events = num_events
        event = torch.arange(keys.numel(), device=keys.device) % num_events
        # Sort by event first, then stably by key: events stay ascending inside each key.
        by_event = torch.argsort(event, stable=True)
        self.order = by_event[torch.argsort(keys[by_event], stable=True)]
        self.groups, counts = torch.unique_consecutive(keys[self.order], return_counts=True)
        group = torch.repeat_interleave(torch.arange(self.groups.numel(), device=keys.device), counts)
        self._combined = group * (num_events + 1) + event[self.order]

    def lookup(self, q_keys: torch.Tensor, q_visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query (``[N]`` keys, ``[N]`` visible event counts): ``start`` (first sorted position
        of its key) and ``count`` (its entries among events ``< q_visible``, which sit at sorted
        positions ``start .. start + count - 1``, oldest first)."""
        g = torch.searchsorted(self.groups, q_keys).clamp(max=self.groups.numel() - 1)
        found = self.groups[g] == q_keys
        base = g * (self.num_events + 1)
        start = torch.searchsorted(self._combined, base)
        end = torch.searchsorted(self._combined, base + q_visible)
        return start, torch.where(found, end - start, torch.zeros_like(end))
