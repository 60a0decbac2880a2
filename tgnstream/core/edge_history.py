"""Exact per-pair interaction history (count, last time) kept as sorted device tensors."""

from __future__ import annotations

import torch

from tgnstream.core.buffers import ResizableBufferModule

__all__ = ["EdgeHistory", "pair_keys"]

_SHIFT = 32
# Pads the unused tail of ``keys``: sorts after every real key and never equals one.
_EMPTY = torch.iinfo(torch.int64).max


def pair_keys(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Order-free int64 key of each pair; ids must be < 2**31."""
    lo = torch.minimum(u, v)
    hi = torch.maximum(u, v)
    return (lo << _SHIFT) | hi


class EdgeHistory(ResizableBufferModule):
    """Count and last time of every undirected node pair seen so far.

    Buffers (C = capacity >= P = distinct pairs seen):
        keys: ``[C]`` int64 pair keys (see ``pair_keys``), sorted; slots ``P..C-1`` hold a
            sentinel that sorts last, so a binary search over the whole buffer is exact.
        counts: ``[C]`` int64 number of events on the pair.
        last_t: ``[C]`` float64 time of the newest event on the pair.
        size: ``[]`` int64, P.

    Lookups are a binary search; inserting a batch with new pairs is one O(P) merge written in
    place, so the buffers are reallocated only when they fill up (doubling), never per batch:
    readers in other processes can keep mapping them. State dicts hold the ``P`` live entries.
    """

    def __init__(self, device: torch.device | str = "cpu", capacity: int = 0):
        super().__init__()
        self.register_buffer("keys", torch.full((capacity,), _EMPTY, dtype=torch.long, device=device))
        self.register_buffer("counts", torch.zeros(capacity, dtype=torch.long, device=device))
        self.register_buffer("last_t", torch.zeros(capacity, dtype=torch.float64, device=device))
        self.register_buffer("size", torch.zeros((), dtype=torch.long, device=device))

    def __len__(self) -> int:
        return int(self.size)

    @property
    def capacity(self) -> int:
        return int(self.keys.numel())

    def reset(self) -> None:
        self.keys.fill_(_EMPTY)
        self.counts.zero_()
        self.last_t.zero_()
        self.size.zero_()

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` pairs (a reallocation: the one explicit growth event)."""
        extra = capacity - self.capacity
        if extra <= 0:
            return
        dev = self.keys.device
        self.keys = torch.cat([self.keys, torch.full((extra,), _EMPTY, dtype=torch.long, device=dev)])
        self.counts = torch.cat([self.counts, torch.zeros(extra, dtype=torch.long, device=dev)])
        self.last_t = torch.cat([self.last_t, torch.zeros(extra, dtype=torch.float64, device=dev)])

    def _find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys.numel() == 0:
            return torch.zeros_like(keys), torch.zeros_like(keys, dtype=torch.bool)
        pos = torch.searchsorted(self.keys, keys).clamp(max=self.keys.numel() - 1)
        return pos, self.keys[pos] == keys

    def lookup(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts ``int64`` and last times ``float64`` (NaN if never seen) for pairs of any shape."""
        keys = pair_keys(u, v)
        flat = keys.reshape(-1)
        pos, found = self._find(flat)
        nan = torch.full(flat.shape, float("nan"), dtype=torch.float64, device=flat.device)
        if self.keys.numel() == 0:
            return torch.zeros_like(keys), nan.reshape(keys.shape)
        counts = torch.where(found, self.counts[pos], 0)
        last = torch.where(found, self.last_t[pos], nan)
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
        p = len(self)
        total = p + keys.numel()
        if total > self.capacity:
            self.reserve(max(total, 2 * self.capacity, 1024))
        old_k, old_c, old_t = self.keys[:p].clone(), self.counts[:p].clone(), self.last_t[:p].clone()
        old_slot = torch.arange(p, device=keys.device) + torch.searchsorted(keys, old_k)
        new_slot = torch.arange(keys.numel(), device=keys.device) + torch.searchsorted(old_k, keys)
        self.keys[old_slot], self.counts[old_slot], self.last_t[old_slot] = old_k, old_c, old_t
        self.keys[new_slot], self.counts[new_slot], self.last_t[new_slot] = keys, counts, last_t
        self.size.fill_(total)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        p = len(self)
        for name in ("keys", "counts", "last_t"):  # the live entries only, as compact copies
            destination[prefix + name] = destination[prefix + name][:p].clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args):
        keys = state_dict.get(prefix + "keys")
        if keys is not None and prefix + "size" not in state_dict:
            state_dict[prefix + "size"] = torch.tensor(keys.numel(), dtype=torch.long)  # older states
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        p = len(self)
        if self.keys.numel() != p:
            raise ValueError(f"{prefix}keys holds {self.keys.numel()} pairs, {prefix}size says {p}")
        self.reserve(max(2 * p, 1024))
