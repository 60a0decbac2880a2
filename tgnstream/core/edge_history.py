"""Exact per-pair interaction history (count, last time) in an open-addressing hash table of
device tensors: a batch's lookups and inserts cost O(batch), whatever the number of pairs; an
optional retention rule (by age in event time, by count) forgets old pairs at batch boundaries."""

from __future__ import annotations

import torch

from tgnstream.core.buffers import ResizableBufferModule

__all__ = ["EdgeHistory", "live_keys", "pair_keys", "SWEEP_FRACTION"]

_SHIFT = 32
# Marks an empty slot; never equals a real key (ids are < 2**31, so keys are < 2**63 - 1).
_EMPTY = torch.iinfo(torch.int64).max
# Marks a slot whose pair was forgotten (retention): probes pass it, inserts may claim it.
_GONE = _EMPTY - 1
_LOW31 = (1 << 31) - 1
# Odd multipliers below 2**31: every product below stays under 2**62, so no int64 overflow.
_M1, _M2, _M3 = 0x2545F491, 0x6C8E9CF5, 0x5BD1E995
_MIN_SLOTS = 2048
#: An age sweep runs once the watermark has moved this fraction of the age limit since the last
#: one, so a pair is forgotten between ``max_age`` and ``(1 + SWEEP_FRACTION) * max_age`` after its
#: newest event; a count sweep once the pairs exceed the limit by this fraction.
SWEEP_FRACTION = 0.125
# evicted[] slots: pairs forgotten by age, by count; sweeps run.
_BY_AGE, _BY_COUNT, _SWEEPS = range(3)


def live_keys(keys: torch.Tensor) -> torch.Tensor:
    """``[S]`` bool: the slots of a table's ``keys [S]`` that hold a pair (neither empty nor forgotten)."""
    return keys < _GONE


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
    """Count and last time of every undirected node pair seen so far (and not forgotten).

    Buffers (S = slots, a power of two, at least twice the P pairs held plus the G forgotten slots):
        keys: ``[S]`` int64 pair keys (see ``pair_keys``) at their slots, a sentinel where empty
            and another where a pair was forgotten.
        counts: ``[S]`` int64 number of events on the pair.
        last_t: ``[S]`` float64 time of the newest event on the pair.
        size: ``[]`` int64, P.
        gone: ``[]`` int64, G (forgotten slots the next reallocation reclaims).
        evicted: ``[3]`` int64, pairs forgotten by age, by count, and the sweeps run.
        swept_at: ``[]`` float64, the watermark at the last age sweep.

    An open-addressing hash table with linear probing: a lookup follows each key's probe
    sequence until it meets the key or an empty slot; an insert claims the first empty slot of
    its sequence (when several new keys of a batch reach the same empty slot, the smallest key
    takes it and the others probe on). Every step is a vectorised pass over the keys still
    probing, so a batch costs O(batch x probe length), independent of P; the layout is a pure
    function of the inserted sequence (the log). The table is reallocated (doubled, every entry
    re-placed) only when it would pass half full: the one growth event, so readers in other
    processes keep mapping the buffers between two. State dicts hold the ``P`` live entries
    sorted by key (independent of the layout; the format of the earlier sorted-array table).

    Retention (``retain``, after a batch's insert): pairs whose newest event is older than the
    age limit are forgotten, and beyond a count limit the oldest pairs (ties: smaller key) are;
    a sweep runs at batch boundaries by a rule of the log alone (``SWEEP_FRACTION``). A forgotten
    pair reads as never seen; its slot is marked, not emptied, so other keys' probe sequences
    stay intact, and costs O(forgotten) to mark after an O(S) scan.
    """

    def __init__(self, device: torch.device | str = "cpu", capacity: int = 0):
        super().__init__()
        slots = _slots_for(capacity)
        self.register_buffer("keys", torch.full((slots,), _EMPTY, dtype=torch.long, device=device))
        self.register_buffer("counts", torch.zeros(slots, dtype=torch.long, device=device))
        self.register_buffer("last_t", torch.zeros(slots, dtype=torch.float64, device=device))
        self.register_buffer("size", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("gone", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("evicted", torch.zeros(3, dtype=torch.long, device=device))
        self.register_buffer("swept_at", torch.zeros((), dtype=torch.float64, device=device))

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
        self.gone.zero_()
        self.evicted.zero_()
        self.swept_at.zero_()

    def needs_rehash(self, more: int) -> bool:
        """Whether inserting ``more`` new pairs would reallocate the table."""
        return 2 * (len(self) + int(self.gone) + more) > self.keys.numel()

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` pairs (a reallocation: the one explicit growth event)."""
        slots = _slots_for(capacity)
        if slots > self.keys.numel():
            self._rehash(slots)

    def table_for(self, more: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A table with room for ``more`` new pairs beyond those held, built aside (``rehashed``),
        when inserting them would reallocate this one; None when they fit. A server builds it
        ahead of its write lock and ``adopt``s it under the lock: the copy then holds nobody."""
        return self.rehashed(_slots_for(len(self) + more)) if self.needs_rehash(more) else None

    def rehashed(self, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """New ``keys, counts, last_t [slots]`` holding the live entries (the table is not touched:
        a writer may build them without its lock, then ``adopt`` them under it)."""
        live = live_keys(self.keys)
        keys, counts, last_t = self.keys[live], self.counts[live], self.last_t[live]
        order = torch.argsort(keys)  # re-placed in key order: the new layout is a function of the set
        dev = self.keys.device
        table = (
            torch.full((slots,), _EMPTY, dtype=torch.long, device=dev),
            torch.zeros(slots, dtype=torch.long, device=dev),
            torch.zeros(slots, dtype=torch.float64, device=dev),
        )
        _place_into(table, keys[order], counts[order], last_t[order])
        return table

    def adopt(self, table: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Serve from ``table`` (built by ``rehashed`` from this state, which has not changed since)."""
        self.keys, self.counts, self.last_t = table
        self.gone.zero_()

    def _rehash(self, slots: int) -> None:
        self.adopt(self.rehashed(slots))

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
            more = int(fresh.sum())
            if self.needs_rehash(more):
                self._rehash(_slots_for(len(self) + more))  # about twice the slots: half full at most
            self._place(uniq[fresh], n_new_events[fresh], newest[fresh])

    def _place(self, keys: torch.Tensor, counts: torch.Tensor, last_t: torch.Tensor) -> None:
        """Insert ``keys [K]`` (sorted, distinct, none present) with their values."""
        table = (self.keys, self.counts, self.last_t)
        self.gone -= _place_into(table, keys, counts, last_t, count_reused=bool(self.gone))
        self.size += keys.numel()

    # --------------------------------------------------------------------------- retention
    @torch.no_grad()
    def retain(self, watermark: float, max_age: float | None, max_pairs: int | None) -> int:
        """Forget pairs by the retention rule if a sweep is due at this batch boundary (see the
        class docstring); returns the number forgotten. ``watermark``: the newest event time
        applied. A function of the state and the log alone, so every replica forgets alike."""
        forgotten = 0
        sweeps = int(self.evicted[_SWEEPS])
        if max_age is not None and (
            sweeps == 0 or watermark - float(self.swept_at) >= SWEEP_FRACTION * max_age
        ):
            live = live_keys(self.keys)
            old = live & (self.last_t < watermark - max_age)
            forgotten += self._forget(torch.nonzero(old).squeeze(1), _BY_AGE)
            self.swept_at.fill_(watermark)
            self.evicted[_SWEEPS] += 1
        if max_pairs is not None and len(self) > max_pairs + int(SWEEP_FRACTION * max_pairs):
            slots = torch.nonzero(live_keys(self.keys)).squeeze(1)
            # Oldest first, ties by smaller key: sort by key, then stably by time.
            slots = slots[torch.argsort(self.keys[slots])]
            slots = slots[torch.argsort(self.last_t[slots], stable=True)]
            forgotten += self._forget(slots[: len(self) - max_pairs], _BY_COUNT)
            self.evicted[_SWEEPS] += 1
        return forgotten

    def _forget(self, slots: torch.Tensor, rule: int) -> int:
        n = int(slots.numel())
        if n:
            self.keys[slots] = _GONE
            self.counts[slots] = 0
            self.last_t[slots] = 0.0
            self.size -= n
            self.gone += n
            self.evicted[rule] += n
        return n

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live entries sorted by key: ``keys [P]``, ``counts [P]``, ``last_t [P]`` (copies)."""
        live = live_keys(self.keys)
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
        destination[prefix + "gone"] = torch.zeros_like(self.gone)  # the saved entries are compact

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args):
        keys = state_dict.get(prefix + "keys")
        if keys is not None and prefix + "size" not in state_dict:
            state_dict[prefix + "size"] = torch.tensor(keys.numel(), dtype=torch.long)  # older states
        for name in ("gone", "evicted", "swept_at"):  # states saved before retention existed
            if keys is not None and prefix + name not in state_dict:
                state_dict[prefix + name] = torch.zeros_like(getattr(self, name), device="cpu")
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
        self.gone.zero_()
        self._place(keys, counts, last_t)


def _place_into(
    table: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    keys: torch.Tensor,
    counts: torch.Tensor,
    last_t: torch.Tensor,
    count_reused: bool = False,
) -> int:
    """Write ``keys [K]`` (sorted, distinct, none present) with their values into the slots of
    ``table`` (keys, counts, last times) their probe sequences reach first (an empty or a
    forgotten slot); returns how many forgotten slots they took when ``count_reused`` (0
    otherwise: a table without forgotten slots skips the count, a device sync per probe round)."""
    slots, slot_counts, slot_t = table
    mask = slots.numel() - 1
    slot = _home(keys, mask)
    todo = torch.arange(keys.numel(), device=keys.device)
    reused = 0
    for _ in range(slots.numel()):
        if todo.numel() == 0:
            break
        s = slot[todo]
        free = slots[s] >= _GONE
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
        if count_reused:
            reused += int((slots[at] == _GONE).sum())
        slots[at], slot_counts[at], slot_t[at] = keys[won], counts[won], last_t[won]
        placed = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
        placed[won] = True
        todo = todo[~placed[todo]]
        slot[todo] = (slot[todo] + 1) & mask
    return reused
