"""Exact per-pair interaction history (count, last time) in an open-addressing hash table of
device tensors: a batch's lookups and inserts cost O(batch), whatever the number of pairs."""

from __future__ import annotations

import torch

from tgnstream.core.buffers import ResizableBufferModule

__all__ = ["EdgeHistory", "pair_keys"]

_SHIFT = 32
# Marks an empty slot; never equals a real key (ids are < 2**31, so keys are < 2**63 - 1).
_EMPTY = torch.iinfo(torch.int64).max
_LOW31 = (1 << 31) - 1
# Odd multipliers below 2**31: every product below stays under 2**62, so no int64 overflow.
_M1, _M2, _M3 = 0x2545F491, 0x6C8E9CF5, 0x5BD1E995
_MIN_SLOTS = 2048


def pair_keys(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Order-free int64 key of each pair; ids must be < 2**31."""
    lo = torch.minimum(u, v)
    hi = torch.maximum(u, v)
    return (lo << _SHIFT) | hi


def _home(keys: torch.Tensor, mask: int) -> torch.Tensor:
    """Each key's first slot: a mix of both ids (integer-only, so every device agrees)."""
    a, b = keys >> _SHIFT, keys & 0xFFFFFFFF
    h = (a & _LOW31) * _M1 + (b & _LOW31) * _M2
    h = h ^ (h >> 29)
    h = (h & _LOW31) * _M3
    h = h ^ (h >> 31)
    return h & mask


def _slots_for(pairs: int) -> int:
    """Table size for ``pairs`` entries at a load factor of at most 1/2 (a power of two)."""
    return max(_MIN_SLOTS, 1 << max(0, (2 * max(pairs, 1) - 1).bit_length()))


class EdgeHistory(ResizableBufferModule):
    """Count and last time of every undirected node pair seen so far.

    Buffers (S = slots, a power of two, at least twice the P pairs held):
        keys: ``[S]`` int64 pair keys (see ``pair_keys``) at their slots, a sentinel where empty.
        counts: ``[S]`` int64 number of events on the pair.
        last_t: ``[S]`` float64 time of the newest event on the pair.
        size: ``[]`` int64, P.

    An open-addressing hash table with linear probing: a lookup follows each key's probe
    sequence until it meets the key or an empty slot; an insert claims the first empty slot of
    its sequence (when several new keys of a batch reach the same empty slot, the smallest key
    takes it and the others probe on). Every step is a vectorised pass over the keys still
    probing, so a batch costs O(batch x probe length), independent of P; the layout is a pure
    function of the inserted sequence (the log). The table is reallocated (doubled, every entry
    re-placed) only when it would pass half full: the one growth event, so readers in other
    processes keep mapping the buffers between two. State dicts hold the ``P`` live entries
    sorted by key (independent of the layout; the format of the earlier sorted-array table).
    """

    def __init__(self, device: torch.device | str = "cpu", capacity: int = 0):
        super().__init__()
        slots = _slots_for(capacity)
        self.register_buffer("keys", torch.full((slots,), _EMPTY, dtype=torch.long, device=device))
        self.register_buffer("counts", torch.zeros(slots, dtype=torch.long, device=device))
        self.register_buffer("last_t", torch.zeros(slots, dtype=torch.float64, device=device))
        self.register_buffer("size", torch.zeros((), dtype=torch.long, device=device))

    def __len__(self) -> int:
        return int(self.size)

    @property
    def capacity(self) -> int:
        """Pairs it holds before the next reallocation."""
        return int(self.keys.numel()) // 2

    def reset(self) -> None:
        self.keys.fill_(_EMPTY)
        self.counts.zero_()
        self.last_t.zero_()
        self.size.zero_()

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` pairs (a reallocation: the one explicit growth event)."""
        slots = _slots_for(capacity)
        if slots > self.keys.numel():
            self._rehash(slots)

    def _rehash(self, slots: int) -> None:
        live = self.keys != _EMPTY
        keys, counts, last_t = self.keys[live], self.counts[live], self.last_t[live]
        order = torch.argsort(keys)  # re-placed in key order: the new layout is a function of the set
        dev = self.keys.device
        self.keys = torch.full((slots,), _EMPTY, dtype=torch.long, device=dev)
        self.counts = torch.zeros(slots, dtype=torch.long, device=dev)
        self.last_t = torch.zeros(slots, dtype=torch.float64, device=dev)
        self.size.zero_()
        self._place(keys[order], counts[order], last_t[order])

    def _find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``[M]`` and found mask ``[M]`` of each key (the slot is meaningless where not found)."""
        table = self.keys
        mask = table.numel() - 1
        slot = _home(keys, mask)
        found = torch.zeros_like(keys, dtype=torch.bool)
        todo = torch.arange(keys.numel(), device=keys.device)
        # A table is never full, so every probe sequence meets an empty slot; the bound only
        # guards a reader whose view changes under it (its answer is discarded anyway).
        for _ in range(table.numel()):
            if todo.numel() == 0:
                break
            at = table[slot[todo]]
            hit = at == keys[todo]
            found[todo[hit]] = True
            going = ~hit & (at != _EMPTY)
            todo = todo[going]
            slot[todo] = (slot[todo] + 1) & mask
        return slot, found

    def lookup(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts ``int64`` and last times ``float64`` (NaN if never seen) for pairs of any shape."""
        keys = pair_keys(u, v)
        flat = keys.reshape(-1)
        slot, found = self._find(flat)
        nan = torch.full(flat.shape, float("nan"), dtype=torch.float64, device=flat.device)
        counts = torch.where(found, self.counts[slot], 0)
        last = torch.where(found, self.last_t[slot], nan)
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
        slot, found = self._find(uniq)
        if found.any():
            p = slot[found]
            self.counts[p] += n_new_events[found]
            self.last_t[p] = torch.maximum(self.last_t[p], newest[found])
        fresh = ~found
        if fresh.any():
            total = len(self) + int(fresh.sum())
            if 2 * total > self.keys.numel():
                self._rehash(_slots_for(total))  # about twice the slots: half full at most
            self._place(uniq[fresh], n_new_events[fresh], newest[fresh])

    def _place(self, keys: torch.Tensor, counts: torch.Tensor, last_t: torch.Tensor) -> None:
        """Insert ``keys [K]`` (sorted, distinct, none present) with their values."""
        table = self.keys
        mask = table.numel() - 1
        slot = _home(keys, mask)
        todo = torch.arange(keys.numel(), device=keys.device)
        for _ in range(table.numel()):
            if todo.numel() == 0:
                break
            s = slot[todo]
            free = table[s] == _EMPTY
            # Of the keys reaching one free slot, the first in key order (todo is sorted) wins.
            cand = todo[free]
            cs = s[free]
            order = torch.argsort(cs, stable=True)
            cs_sorted = cs[order]
            first = torch.ones_like(cs_sorted, dtype=torch.bool)
            if cs_sorted.numel() > 1:
                first[1:] = cs_sorted[1:] != cs_sorted[:-1]
            won = cand[order[first]]
            at = slot[won]
            table[at], self.counts[at], self.last_t[at] = keys[won], counts[won], last_t[won]
            placed = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
            placed[won] = True
            todo = todo[~placed[todo]]
            slot[todo] = (slot[todo] + 1) & mask
        self.size += keys.numel()

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live entries sorted by key: ``keys [P]``, ``counts [P]``, ``last_t [P]`` (copies)."""
        live = self.keys != _EMPTY
        keys = self.keys[live]
        order = torch.argsort(keys)
        return keys[order], self.counts[live][order], self.last_t[live][order]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        keys, counts, last_t = self.entries()
        destination[prefix + "keys"], destination[prefix + "counts"], destination[prefix + "last_t"] = (
            keys,
            counts,
            last_t,
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args):
        keys = state_dict.get(prefix + "keys")
        if keys is not None and prefix + "size" not in state_dict:
            state_dict[prefix + "size"] = torch.tensor(keys.numel(), dtype=torch.long)  # older states
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        p = len(self)
        if self.keys.numel() != p:
            raise ValueError(f"{prefix}keys holds {self.keys.numel()} pairs, {prefix}size says {p}")
        # The saved entries (sorted by key) are placed into a fresh table.
        keys, counts, last_t = self.keys, self.counts, self.last_t
        if keys.numel() and bool((keys[1:] <= keys[:-1]).any()):
            raise ValueError(f"{prefix}keys are not sorted and distinct")
        slots = _slots_for(max(2 * p, 1024))
        dev = keys.device
        self.keys = torch.full((slots,), _EMPTY, dtype=torch.long, device=dev)
        self.counts = torch.zeros(slots, dtype=torch.long, device=dev)
        self.last_t = torch.zeros(slots, dtype=torch.float64, device=dev)
        self.size.zero_()
        self._place(keys, counts, last_t)
