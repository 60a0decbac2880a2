"""Exact per-pair interaction history (count, last time) kept as sorted device tensors."""

from __future__ import annotations

import torch

from tgnstream.core.buffers import ResizableBufferModule

__all__ = ["EdgeHistory", "pair_keys"]

_SHIFT = 32


def pair_keys(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Order-free int64 key of each pair; ids must be < 2**31."""
    lo = torch.minimum(u, v)
    hi = torch.maximum(u, v)
    return (lo << _SHIFT) | hi


class EdgeHistory(ResizableBufferModule):
    """Count and last time of every undirected node pair seen so far.

    Buffers (P = distinct pairs seen):
        keys: ``[P]`` int64 sorted pair keys (see ``pair_keys``).
        counts: ``[P]`` int64 number of events on the pair.
        last_t: ``[P]`` float64 time of the newest event on the pair.

    Lookups are a binary search; inserting a batch with new pairs is one O(P) merge, which
    keeps the table exact and dense without a hash map.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.register_buffer("keys", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("last_t", torch.zeros(0, dtype=torch.float64, device=device))

    def __len__(self) -> int:
        return int(self.keys.numel())

    def reset(self) -> None:
        dev = self.keys.device
        self.keys = torch.zeros(0, dtype=torch.long, device=dev)
        self.counts = torch.zeros(0, dtype=torch.long, device=dev)
        self.last_t = torch.zeros(0, dtype=torch.float64, device=dev)

    def _find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.searchsorted(self.keys, keys)
        if self.keys.numel() == 0:
            return pos, torch.zeros_like(keys, dtype=torch.bool)
        clamped = pos.clamp(max=self.keys.numel() - 1)
        found = self.keys[clamped] == keys
        return clamped, found

    def lookup(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts ``int64`` and last times ``float64`` (NaN if never seen) for pairs of any shape."""
        keys = pair_keys(u, v)
        flat = keys.reshape(-1)
        pos, found = self._find(flat)
        counts = torch.where(found, self.counts[pos] if self.keys.numel() else torch.zeros_like(flat), 0)
        nan = torch.full(flat.shape, float("nan"), dtype=torch.float64, device=flat.device)
        last = torch.where(found, self.last_t[pos], nan) if self.keys.numel() else nan
        return counts.reshape(keys.shape), last.reshape(keys.shape)

    @torch.no_grad()
    def insert(self, u: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> None:
        """Add a batch of events ``[B]``."""
        if u.numel() == 0:
            return
        keys = pair_keys(u, v)
        uniq, inverse, n_new_events = torch.unique(keys, return_inverse=True, return_counts=True)
        newest = torch.full(uniq.shape, float("-inf"), dtype=torch.float64, device=u.device)
        newest = newest.scatter_reduce(0, inverse, t.to(torch.float64), reduce="amax")
        pos, found = self._find(uniq)
        if found.any():
            p = pos[found]
            self.counts[p] += n_new_events[found]
            self.last_t[p] = torch.maximum(self.last_t[p], newest[found])
        fresh = ~found
        if fresh.any():
            self._merge(uniq[fresh], n_new_events[fresh], newest[fresh])

    def _merge(self, keys: torch.Tensor, counts: torch.Tensor, last_t: torch.Tensor) -> None:
        # Both inputs are sorted and disjoint: each element's final slot is its own index plus
        # the number of elements of the other array that sort before it.
        old_slot = torch.arange(self.keys.numel(), device=keys.device) + torch.searchsorted(keys, self.keys)
        new_slot = torch.arange(keys.numel(), device=keys.device) + torch.searchsorted(self.keys, keys)
        total = self.keys.numel() + keys.numel()
        out_k = torch.empty(total, dtype=torch.long, device=keys.device)
        out_c = torch.empty(total, dtype=torch.long, device=keys.device)
        out_t = torch.empty(total, dtype=torch.float64, device=keys.device)
        out_k[old_slot], out_c[old_slot], out_t[old_slot] = self.keys, self.counts, self.last_t
        out_k[new_slot], out_c[new_slot], out_t[new_slot] = keys, counts, last_t
        self.keys, self.counts, self.last_t = out_k, out_c, out_t
