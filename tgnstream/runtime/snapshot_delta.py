"""Delta snapshots: what changed in an engine's state since a parent snapshot, and how to apply it.

A delta holds, for the nodes written since its parent (``Changes``), their rows of every
per-node buffer (memory, mailbox, neighbour table, PRES statistics, flags), the pair-history
entries of the pairs written (``(key, count, last_t)``, the table's layout is not state), the
ids registered since the parent (the id map only appends), the scalar buffers and the capacity.
Weights are not in it: they never change between two snapshots of one served model (the store
checks, and writes a full base when they did).

Applying the deltas of a chain, in order, to the state its base holds gives the state a full
snapshot at the newest delta would hold, bit for bit (``tests/unit/serving/test_snapshot_deltas.py``
compares every tensor). See ``docs/snapshots.md`` for why the set of written nodes is complete.
"""

from __future__ import annotations

import torch

from tgnstream.core.edge_history import pair_keys
from tgnstream.core.engine import MemoryEngine

__all__ = [
    "Changes",
    "DELTA_FORMAT",
    "DeltaLayout",
    "DeltaTally",
    "apply_deltas",
    "check_delta",
    "delta_payload",
    "id_extent",
    "pairs_forgotten",
    "weights_stamp",
]

DELTA_FORMAT = 1

#: Submodules whose every buffer has one row per node slot (first dimension = capacity).
PER_NODE = ("memory", "neighbors", "pres")
#: Scalar buffers a delta carries whole (the pair history's retention counters among them: a
#: sweep that forgets nothing still moves them; one that forgets pairs makes the next snapshot a
#: full base, see ``pairs_forgotten``).
SCALARS = ("events_applied", "watermark", "first_event_time", "history.evicted", "history.swept_at")
#: Submodules a delta carries as appended ids / touched entries.
HISTORY, IDS = "history", "ids"
_HISTORY_KEYS = {"history.keys", "history.counts", "history.last_t", "history.size", "history.gone"}
_IDS_KEYS = {"ids.blob", "ids.offsets"}
_LOW32 = 0xFFFFFFFF
# Compact the accumulated ids once this many are pending: bounds the memory of a long interval
# to about twice the distinct ids (plus one compaction's worth).
_COMPACT_AT = 1 << 20


class Changes:
    """The nodes and node pairs whose state was written since a snapshot, accumulated by the one
    writer (the ingest loop) from every applied batch's endpoints.

    ``add(src [B], dst [B])`` records a batch; ``nodes()`` gives the sorted distinct node ids
    ``[T]`` int64, ``pairs()`` the sorted distinct pair keys ``[K]`` int64 (``pair_keys``).
    Duplicates are folded away from time to time, so the memory held is about proportional to
    what changed, not to the number of events.
    """

    def __init__(self) -> None:
        self._nodes: list[torch.Tensor] = []
        self._pairs: list[torch.Tensor] = []
        self._added = 0  # ids added since the last compaction
        self._held = 0  # distinct ids held at the last compaction
        self.events = 0

    def add(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Record a batch's endpoints ``src [B]``, ``dst [B]`` (dense ids, any device)."""
        if src.numel() == 0:
            return
        src, dst = src.detach().to("cpu", torch.long), dst.detach().to("cpu", torch.long)
        self._nodes += [src, dst]
        self._pairs.append(pair_keys(src, dst))
        self._added += 3 * src.numel()
        self.events += src.numel()
        # Amortised: a compaction sorts what is held, so wait until as much again was added.
        if self._added >= max(_COMPACT_AT, self._held):
            self._compact()

    def _compact(self) -> None:
        if self._added == 0:
            return
        self._nodes = [_distinct(self._nodes)]
        self._pairs = [_distinct(self._pairs)]
        self._added, self._held = 0, self._nodes[0].numel() + self._pairs[0].numel()

    def nodes(self) -> torch.Tensor:
        self._compact()
        return self._nodes[0] if self._nodes else torch.zeros(0, dtype=torch.long)

    def pairs(self) -> torch.Tensor:
        self._compact()
        return self._pairs[0] if self._pairs else torch.zeros(0, dtype=torch.long)


def _distinct(parts: list[torch.Tensor]) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.unique(torch.cat(parts) if len(parts) > 1 else parts[0])


class DeltaLayout:
    """How an engine's state splits for a delta: its per-node buffers by name (``memory.mail``
    ...), and whether every tensor of the state is one a delta knows how to carry (``unknown``
    lists those that are not: a buffer added to the engine later forces full snapshots until
    this module learns it, instead of being silently dropped)."""

    def __init__(self, engine: MemoryEngine):
        cap = engine.capacity
        self.per_node: dict[str, torch.Tensor] = {}
        self.unknown: list[str] = []
        named = list(engine.named_parameters(remove_duplicate=False))
        named += list(engine.named_buffers(remove_duplicate=False))
        for name, t in named:
            head = name.split(".", 1)[0]
            if head == "model":
                continue  # weights: in the base only (the store checks they did not change)
            if head in PER_NODE:
                if t.dim() == 0 or t.shape[0] != cap:
                    self.unknown.append(name)
                else:
                    self.per_node[name] = t
            elif name in SCALARS or name in _HISTORY_KEYS or name in _IDS_KEYS:
                continue
            else:
                self.unknown.append(name)

    def row_bytes(self) -> int:
        """Bytes one node's rows take in a delta (all per-node buffers)."""
        return sum(t[:1].numel() * t.element_size() for t in self.per_node.values())

    def full_bytes(self, engine: MemoryEngine) -> int:
        """About what a full snapshot of ``engine`` takes: every row, pair entry, id and weight."""
        ids = engine.ids
        weights = sum(p.numel() * p.element_size() for p in engine.parameters())
        names = int(ids.offsets[-1])  # ids not flushed yet aside: an estimate
        return engine.capacity * self.row_bytes() + 24 * len(engine.history) + 9 * len(ids) + names + weights


def weights_stamp(engine: MemoryEngine) -> tuple:
    """Identity and in-place write count of every weight tensor: equal stamps mean no weight was
    replaced or written in between (torch counts in-place writes in ``_version``)."""
    named = list(engine.named_parameters(remove_duplicate=False))
    named += [(n, t) for n, t in engine.named_buffers(remove_duplicate=False) if n.startswith("model.")]
    return tuple((n, t.data_ptr(), t._version) for n, t in named)


def id_extent(engine: MemoryEngine) -> tuple[int, int]:
    """Ids registered and bytes of their names, after moving pending ids into the buffers (what
    ``save_checkpoint`` does first too)."""
    engine.ids.flush()
    offsets = engine.ids.offsets
    return int(offsets.numel()) - 1, int(offsets[-1])


@torch.no_grad()
def delta_payload(
    engine: MemoryEngine, layout: DeltaLayout, changes: Changes, parent_ids: int, parent_id_bytes: int
) -> dict:
    """The delta of ``engine``'s state against a parent that held ``parent_ids`` ids (of
    ``parent_id_bytes`` bytes), given every node and pair written since (``changes``). CPU
    tensors, ready for ``torch.save``."""
    nodes = changes.nodes()
    dev = engine.device
    idx = nodes.to(dev)
    rows = {name: t.index_select(0, idx).cpu() for name, t in layout.per_node.items()}
    keys = changes.pairs()
    k = keys.to(dev)
    counts, last_t = engine.history.lookup(k >> 32, k & _LOW32)
    # Every pair written is in the table (nothing was forgotten since the parent, or this would
    # be a full base); the filter keeps a stray key from ever adding an entry a full snapshot
    # would not hold.
    held = (counts > 0).cpu()
    keys, counts, last_t = keys[held], counts.cpu()[held], last_t.cpu()[held]
    n_ids, id_bytes = id_extent(engine)
    ids = engine.ids
    return {
        "format": DELTA_FORMAT,
        "capacity": engine.capacity,
        "nodes": nodes.cpu(),
        "rows": rows,
        "pairs": {"keys": keys, "counts": counts, "last_t": last_t},
        "ids": {
            "from": parent_ids,
            "blob_from": parent_id_bytes,
            "blob": ids.blob[parent_id_bytes:id_bytes].clone(),
            "offsets": ids.offsets[parent_ids + 1 : n_ids + 1].clone(),
        },
        "scalars": {name: engine.get_buffer(name).detach().cpu().clone() for name in SCALARS},
    }


class DeltaTally:
    """What the state holds after the deltas checked so far (to check the next one against)."""

    def __init__(self, engine: MemoryEngine):
        self.engine = engine
        self.names: set[str] = set()  # ids the deltas checked so far register
        self.capacity = engine.capacity
        self.ids, self.id_bytes = id_extent(engine)
        self.events = int(engine.events_applied)
        self.per_node = {
            name: (t.dtype, tuple(t.shape[1:])) for name, t in DeltaLayout(engine).per_node.items()
        }


def check_delta(delta: dict, tally: DeltaTally) -> None:
    """Raise ``ValueError`` unless ``delta`` applies to the state ``tally`` describes (it then
    advances ``tally``). Checked before anything is applied, so that a damaged or foreign delta
    ends the chain at its parent instead of leaving a half-applied state."""
    if delta.get("format") != DELTA_FORMAT:
        raise ValueError(f"unsupported delta format {delta.get('format')!r}")
    cap = int(delta["capacity"])
    nodes = delta["nodes"]
    if cap < tally.capacity:
        raise ValueError(f"delta capacity {cap} below its parent's {tally.capacity}")
    if nodes.dtype != torch.long or nodes.dim() != 1:
        raise ValueError("delta node ids are not a 1-d int64 tensor")
    if nodes.numel() and (int(nodes.min()) < 0 or int(nodes.max()) >= cap):
        raise ValueError("delta node ids outside its capacity")
    if set(delta["rows"]) != set(tally.per_node):
        raise ValueError(
            f"delta rows {sorted(delta['rows'])} differ from the state's {sorted(tally.per_node)}"
        )
    for name, rows in delta["rows"].items():
        dtype, shape = tally.per_node[name]
        if rows.dtype != dtype or tuple(rows.shape) != (nodes.numel(), *shape):
            raise ValueError(f"delta rows of {name}: {rows.dtype} {tuple(rows.shape)}")
    pairs = delta["pairs"]
    if not (pairs["keys"].numel() == pairs["counts"].numel() == pairs["last_t"].numel()):
        raise ValueError("delta pair entries of different lengths")
    ids = delta["ids"]
    if int(ids["from"]) != tally.ids or int(ids["blob_from"]) != tally.id_bytes:
        raise ValueError(
            f"delta ids start at {int(ids['from'])} ({int(ids['blob_from'])} bytes), the parent holds "
            f"{tally.ids} ({tally.id_bytes} bytes)"
        )
    offsets, blob = ids["offsets"], ids["blob"]
    end = int(offsets[-1]) if offsets.numel() else tally.id_bytes
    if end - tally.id_bytes != blob.numel():
        raise ValueError("delta id names do not match their offsets")
    ends = (offsets - tally.id_bytes).tolist()
    if any(b < a for a, b in zip([0, *ends], ends)):
        raise ValueError("delta id offsets go backwards")
    raw = blob.numpy().tobytes()
    try:
        names = [raw[a:b].decode("utf-8") for a, b in zip([0, *ends], ends)]
    except UnicodeDecodeError as e:
        raise ValueError(f"delta id names are not UTF-8: {e}") from None
    known, _ = tally.engine.ids.lookup(names, create=False)
    fresh = set(names)
    if len(fresh) != len(names) or bool((known >= 0).any()) or not fresh.isdisjoint(tally.names):
        raise ValueError("delta registers an id the state already holds")
    tally.names |= fresh
    delta["names"] = names  # decoded once: apply_deltas registers them
    events = int(delta["scalars"]["events_applied"])
    if events < tally.events:
        raise ValueError(f"delta at {events} events, its parent at {tally.events}")
    tally.capacity, tally.ids, tally.id_bytes, tally.events = cap, tally.ids + offsets.numel(), end, events


@torch.no_grad()
def apply_deltas(engine: MemoryEngine, deltas: list[dict]) -> None:
    """Apply ``deltas`` (checked by ``check_delta``, oldest first) to ``engine`` (the base's
    state, on any device). Rows and pairs of later deltas overwrite earlier ones."""
    if not deltas:
        return
    cap = int(deltas[-1]["capacity"])
    engine.memory.grow(cap)
    engine.neighbors.grow(cap)
    if engine.pres is not None:
        engine.pres.grow(cap)
    layout = DeltaLayout(engine)
    dev = engine.device
    for d in deltas:
        idx = d["nodes"].to(dev)
        for name, rows in d["rows"].items():
            layout.per_node[name].index_copy_(0, idx, rows.to(dev))
    _merge_pairs(engine, [d["pairs"] for d in deltas])
    names = [name for d in deltas for name in d["names"]]
    if names:
        # Appended in order, as the writer registered them: the same blob and offsets.
        engine.ids.lookup(names, create=True)
        engine.ids.flush()
    for name in SCALARS:
        if name in deltas[-1]["scalars"]:  # deltas written before retention lack its counters
            engine.get_buffer(name).copy_(deltas[-1]["scalars"][name])


def pairs_forgotten(engine: MemoryEngine) -> int:
    """Pairs the state's retention has forgotten so far. A delta carries the pairs written, not
    those forgotten: a snapshot after any is a full base (``SnapshotStore`` compares this)."""
    return int(engine.history.evicted[:2].sum())


def _merge_pairs(engine: MemoryEngine, parts: list[dict]) -> None:
    """Bring every pair of ``parts`` (the deltas' entries, oldest first: the newest value of a
    key wins) to its count and last time by inserting the missing events: ``count - held``
    events at ``last_t``. The table's insert adds counts and keeps the newest time, so the
    entries come out exactly, at a cost in the pairs changed (a full load re-places every pair);
    the slots they land in may differ from a full load's, which is not state."""
    keys = torch.cat([p["keys"] for p in parts])
    if keys.numel() == 0:
        return
    counts = torch.cat([p["counts"] for p in parts])
    last_t = torch.cat([p["last_t"] for p in parts])
    # Of equal keys, the last (newest delta) one: stable sort, then each run's last element.
    order = torch.argsort(keys, stable=True)
    keys, counts, last_t = keys[order], counts[order], last_t[order]
    last = torch.ones_like(keys, dtype=torch.bool)
    last[:-1] = keys[1:] != keys[:-1]
    keys, counts, last_t = keys[last], counts[last], last_t[last]
    history = engine.history
    dev = history.keys.device
    u, v = (keys >> 32).to(dev), (keys & _LOW32).to(dev)
    held, held_t = (x.cpu() for x in history.lookup(u, v))
    missing = counts - held
    if bool((missing < 0).any()) or bool((last_t < held_t).any()):  # NaN (never seen) compares False
        raise ValueError("a delta's pair history goes back (fewer events or an older time than held)")
    more = missing > 0
    reps = missing[more].to(dev)
    history.insert(
        u[more.to(dev)].repeat_interleave(reps),
        v[more.to(dev)].repeat_interleave(reps),
        last_t[more].to(dev).repeat_interleave(reps),
    )
