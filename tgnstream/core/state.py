"""MemoryState: a TGN engine's node state, as buffers on one device.

What the state holds: node memory and mailbox (``memory``), the K most recent neighbours
(``neighbors``), per-pair count and last time (``history``), the external id map (``ids``), PRES
transition statistics (``pres``, with ``config.pres``) and counters (``events_applied``,
``watermark``, ``first_event_time``). What it does: grow (``ensure_capacity``), be read
(``fetch_memory``, ``destinations``, ``last_change``), and be written, only by the step's apply
(``apply_memory`` + ``record``) or by serving's commit (``commit_events``). It runs no model:
memories to persist arrive already folded (``MemoryForward``). The state is a pure function
of the log it applied.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from tgnstream.core.config import ModelConfig
from tgnstream.core.edge_history import EdgeHistory
from tgnstream.core.events import EventBatch
from tgnstream.core.idmap import IdMap
from tgnstream.core.inputs import FreshMemory, MemoryRows
from tgnstream.core.memory import NodeMemory
from tgnstream.core.neighbors import RecentNeighbors
from tgnstream.core.pres import TransitionStats

__all__ = ["MemoryState", "PreparedBatch", "AppliedMemory", "aggregate_messages"]

_INSTANCES = itertools.count(1)


@dataclass(frozen=True)
class PreparedBatch:
    """A batch's state update computed ahead of writing it (see ``MemoryEngine.prepare_events``).

    nodes: ``[U]`` sorted endpoints; memory: ``[U, d_mem]`` their memories with the batch's
    messages folded in; mail/mail_ts: ``[U, mail_dim]``/``[U]`` those messages; version:
    ``events_applied`` of the state it was computed from; engine: the ``instance`` number of
    the engine that computed it (a batch prepared on one engine never commits into another,
    e.g. across a hot swap, even at the same event count).
    """

    batch: EventBatch
    nodes: torch.Tensor
    memory: torch.Tensor
    mail: torch.Tensor
    mail_ts: torch.Tensor
    version: int
    engine: int = -1

    def nonfinite_nodes(self) -> torch.Tensor:
        """``[k]`` nodes whose new memory or message has a NaN/inf (empty when all is well)."""
        ok = torch.isfinite(self.memory).all(1) & torch.isfinite(self.mail).all(1)
        return self.nodes[~ok]


@dataclass(frozen=True)
class AppliedMemory:
    """What ``apply_memory`` persisted from a batch's fresh memories: ``nodes [P]`` whose folded
    message was consumed, with ``prev [P, d]`` and ``raw [P, d]`` their memory before and after
    the updater (before the PRES correction); PRES learns its statistics from these."""

    nodes: torch.Tensor
    prev: torch.Tensor
    raw: torch.Tensor


def aggregate_messages(
    batch: EventBatch, nodes: torch.Tensor, mem_nodes: torch.Tensor, aggregator: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's aggregated raw messages ``[U, mail_dim]`` and their times ``[U]`` for
    ``nodes [U]`` (sorted, the batch's endpoints), built from their memories ``mem_nodes``."""
    src, dst, t = batch.src, batch.dst, batch.t
    # [s_self, s_other, e] per event role, interleaved so that per node they stay in event
    # order (event i's two roles before event i+1's).
    slot_src = torch.searchsorted(nodes, src)
    slot_dst = torch.searchsorted(nodes, dst)
    owner = torch.stack([slot_src, slot_dst], 1).flatten()
    other = torch.stack([slot_dst, slot_src], 1).flatten()
    when = t.repeat_interleave(2)
    parts = [mem_nodes[owner], mem_nodes[other]]
    if batch.feats.shape[1]:
        parts.append(batch.feats.repeat_interleave(2, 0))
    mails = torch.cat(parts, 1)
    n = nodes.numel()
    pos = torch.arange(owner.numel(), device=owner.device)
    newest = torch.full((n,), -1, dtype=torch.long, device=owner.device).scatter_reduce(
        0, owner, pos, reduce="amax"
    )
    if aggregator == "last":
        agg = mails[newest]
    else:
        agg = torch.zeros(n, mails.shape[1], device=mails.device).index_add_(0, owner, mails)
        agg /= torch.bincount(owner, minlength=n).unsqueeze(1).float()
    return agg, when[newest]


class MemoryState(nn.Module):
    """All node state of a TGN-family model, as buffers on one device (see the module
    docstring). Capacity grows by doubling when larger ids arrive.

    Args:
        config: model architecture (sizes of the state).
        capacity: initial number of node slots.
        device: where every tensor lives.
    """

    def __init__(self, config: ModelConfig, capacity: int = 1024, device: torch.device | str = "cpu"):
        super().__init__()
        self.init_state(config, capacity)
        self.to(device)

    def init_state(self, config: ModelConfig, capacity: int) -> None:
        """Register the state's buffers (``nn.Module.__init__`` must have run)."""
        capacity = max(int(capacity), 1)
        self.instance = next(_INSTANCES)  # unique in this process (copies get their own: __deepcopy__)
        self.config = config
        self.memory = NodeMemory(
            capacity, config.memory_dim, config.edge_dim, dtype=getattr(torch, config.state_dtype)
        )
        self.neighbors = RecentNeighbors(capacity, config.num_neighbors, config.edge_dim)
        self.history = EdgeHistory()
        self.ids = IdMap()
        # PRES statistics are state (checkpointed with the memory), not weights.
        self.pres = TransitionStats(capacity, config.memory_dim) if config.pres else None
        self.register_buffer("events_applied", torch.zeros((), dtype=torch.long))
        self.register_buffer("watermark", torch.full((), float("-inf"), dtype=torch.float64))
        # Earliest applied event time: with the watermark, the span of times a query may ask about.
        self.register_buffer("first_event_time", torch.full((), float("inf"), dtype=torch.float64))
        # Set on a reader's view of shared state: its buffers belong to the writer.
        self.frozen_capacity = False

    def __deepcopy__(self, memo):
        cls = type(self)
        out = cls.__new__(cls)
        memo[id(self)] = out
        for k, v in self.__dict__.items():
            out.__dict__[k] = copy.deepcopy(v, memo)
        out.__dict__["instance"] = next(_INSTANCES)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # States saved before first_event_time existed: the oldest "newest event of a pair" is
        # the closest bound they still hold (at or after the true first event).
        key = prefix + "first_event_time"
        if key not in state_dict:
            last_t = state_dict.get(prefix + "history.last_t")
            first = last_t.min() if last_t is not None and last_t.numel() else torch.tensor(float("inf"))
            state_dict[key] = first.to(torch.float64).reshape(())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------------------- capacity
    @property
    def device(self) -> torch.device:
        return self.memory.memory.device

    @property
    def capacity(self) -> int:
        return self.memory.capacity

    def ensure_capacity(self, num_nodes: int) -> None:
        """Make room for ids ``< num_nodes`` (doubling, so growth is amortised O(1))."""
        if num_nodes <= self.capacity:
            return
        if self.frozen_capacity:
            raise RuntimeError(
                f"ids up to {num_nodes - 1} need more than the {self.capacity} node slots of a read-only "
                "view of shared state (only the writer grows state)"
            )
        new_cap = max(num_nodes, 2 * self.capacity)
        self.memory.grow(new_cap)
        self.neighbors.grow(new_cap)
        if self.pres is not None:
            self.pres.grow(new_cap)

    def check_ids(self, *tensors: torch.Tensor) -> None:
        """Reject negative ids; make room for new ones, which read as cold-start nodes (zero
        memory, no neighbours, no history). Growing reallocates state buffers, so a concurrent
        server must call this under its write lock (or pre-size the capacity)."""
        ids = [x.reshape(-1) for x in tensors if x.numel()]
        if not ids:
            return
        lo, hi = torch.aminmax(torch.cat(ids) if len(ids) > 1 else ids[0])
        if int(lo) < 0:
            raise ValueError("node ids must be non-negative")
        self.ensure_capacity(int(hi) + 1)

    def _align_capacity(self) -> None:
        """Every per-node buffer at one capacity (checkpoints rely on it)."""
        if self.pres is None:
            return
        if self.pres.capacity <= self.capacity:
            self.pres.grow(self.capacity)
        else:
            self.ensure_capacity(self.pres.capacity)

    # ------------------------------------------------------------------------ whole state
    def reset_state(self) -> None:
        """Forget every event (memory, mailbox, neighbours, pair history, id map); keep weights
        and the PRES statistics (learnt about the model's dynamics, like weights)."""
        self.ids.reset()
        self.memory.reset()
        self.neighbors.reset()
        self.history.reset()
        self.events_applied.zero_()
        self.watermark.fill_(float("-inf"))
        self.first_event_time.fill_(float("inf"))

    @torch.no_grad()
    def copy_state_from(self, other: MemoryState) -> None:
        """Make this state (memory, mailbox, neighbours, pair history, id map, counters) a copy
        of ``other``'s; weights and PRES statistics (learnt, like weights) stay. Continual
        training restarts each epoch over its window from the window's first state."""
        if other.config.model_copy(update={"pres": self.config.pres}) != self.config.model_copy(
            update={"pres": self.config.pres}
        ):
            raise ValueError("copy_state_from needs an engine of the same architecture")
        self.memory = copy.deepcopy(other.memory).to(self.device)
        self.neighbors = copy.deepcopy(other.neighbors).to(self.device)
        self.history = copy.deepcopy(other.history).to(self.device)
        self.ids = copy.deepcopy(other.ids)
        for name in ("events_applied", "watermark", "first_event_time"):
            getattr(self, name).copy_(getattr(other, name))
        self._align_capacity()

    # -------------------------------------------------------------------------------- read
    def fetch_memory(self, nodes: torch.Tensor) -> MemoryRows:
        """Copy the memory, pending message and PRES statistics of ``nodes [U]`` (sorted, unique)."""
        mem = self.memory
        pending = mem.has_mail[nodes].nonzero().squeeze(1)
        # Nothing pending (a server folds after every batch): empty rows without four gathers.
        ids = nodes[pending] if pending.numel() else nodes[:0]
        pres = self.pres
        return MemoryRows(
            nodes=nodes,
            memory=mem.memory[nodes].float(),  # stored in state_dtype, computed in float32
            last_update=mem.last_update[nodes],
            pending=pending,
            mail=mem.mail[ids].float(),
            mail_ts=mem.mail_ts[ids],
            pres_mean=None if pres is None else pres.mean[ids],
            pres_count=None if pres is None else pres.count[ids],
        )

    def pending_nodes(self) -> torch.Tensor:
        """Sorted ids ``[P]`` of the nodes with a pending (not yet folded) message."""
        return self.memory.has_mail.nonzero().squeeze(1)

    def destinations(self) -> torch.Tensor:
        """Sorted ids ``[D]`` of every node that has been the destination of an applied event."""
        # nonzero counts, allocates, then fills: on a buffer another process writes (a reader of
        # shared state) the count can change between the passes and the fill would write past
        # its output. It runs on a private copy.
        return self.memory.is_destination.clone().nonzero().squeeze(1)

    def last_change(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """When what each node's embedding reads last changed, for ``nodes [Q]``: ``times [Q]``
        float64, the newest event time of the node and of its table neighbours (-inf: no event
        yet), and ``signature [Q]`` int64, the events of the same nodes counted, which grows
        whenever any of those inputs changes (memory, mail, neighbour rows and PRES statistics
        only change through a node's events, and a row's neighbours only through its own)."""
        nb = self.neighbors
        ids = nb.ids[nodes]
        present = ids >= 0
        safe = ids.clamp(min=0)
        if safe.numel() > nb.capacity:  # a catalog: every node's newest time once, then gathered
            every = nb.ts.masked_fill(nb.ids < 0, float("-inf")).amax(-1)
            own, newest = every[nodes], every[safe]
        else:
            own, newest = nb.latest(nodes), nb.latest(safe)
        times = torch.maximum(own, newest.masked_fill(~present, float("-inf")).amax(-1))
        signature = nb.count[nodes] + torch.where(present, nb.count[safe], 0).sum(-1)
        return times, signature

    # ------------------------------------------------------------------------------- write
    def record(self, batch: EventBatch) -> None:
        """The structural part of applying a batch: neighbour table, pair history (and its
        retention rule, at this batch boundary), destinations, counters. Independent of the
        memory part (``apply_memory``), so a pipeline's producer can keep structure exact while
        the trainer writes memories back."""
        self.memory.is_destination[batch.dst] = True
        self.neighbors.insert(batch.src, batch.dst, batch.t, batch.feats)
        self.history.insert(batch.src, batch.dst, batch.t)
        self.events_applied += len(batch)
        self.watermark.copy_(torch.maximum(self.watermark, batch.t.max()))
        self.first_event_time.copy_(torch.minimum(self.first_event_time, batch.t.min()))
        cfg = self.config
        if cfg.history_max_age is not None or cfg.history_max_pairs is not None:
            self.history.retain(float(self.watermark), cfg.history_max_age, cfg.history_max_pairs)

    @torch.no_grad()
    def apply_memory(
        self, batch: EventBatch, fresh: FreshMemory, in_order_only: bool = False
    ) -> AppliedMemory:
        """Persist the batch's folded memories and store its events as pending messages.

        ``fresh``: the memories of (at least) the batch's nodes with their pending messages
        folded in, as scoring computed them (``MemoryForward.fold``). With ``config.fold_once``
        the folds it holds for other nodes (neighbours) are persisted too.

        ``in_order_only`` is for memories read a few write-backs ago (a pipeline): a fold is kept
        only while the message it consumed is still the node's pending one, and no write moves a
        node's ``last_update`` or ``mail_ts`` backwards. Without it the state must not have
        changed since ``fresh`` was read (the sequential step), and the same writes happen.

        Returns the folds that were persisted (for the PRES statistics).
        """
        src, dst = batch.src, batch.dst
        nodes = torch.unique(torch.cat([src, dst]))
        mem = self.memory
        folded = fresh.folded if fresh.folded is not None else fresh.nodes[:0]
        if in_order_only and folded.numel():
            still = fresh.nodes[folded]
            keep = mem.has_mail[still] & (mem.mail_ts[still] == fresh.consumed_ts)
            folded_kept = keep.nonzero().squeeze(1)
        else:
            folded_kept = torch.arange(folded.numel(), device=nodes.device)
        rows_f = folded.index_select(0, folded_kept)
        persisted = fresh.nodes[rows_f]
        if self.config.fold_once:
            # The batch's own nodes are overwritten below; this persists the neighbours' folds.
            mem.memory[persisted] = fresh.memory[rows_f].detach().to(mem.memory.dtype)
            mem.last_update[persisted] = fresh.last_update[rows_f]
            mem.has_mail[persisted] = False
        else:
            persisted_own = torch.isin(persisted, nodes)
            folded_kept = folded_kept[persisted_own]
            persisted = persisted[persisted_own]
        rows = fresh.rows(nodes)
        mem_nodes = fresh.memory[rows].detach()
        last_nodes = fresh.last_update[rows]
        agg, mail_ts = aggregate_messages(batch, nodes, mem_nodes, self.config.aggregator)
        if in_order_only:
            fwd = last_nodes >= mem.last_update[nodes]
            mem.memory[nodes[fwd]] = mem_nodes[fwd].to(mem.memory.dtype)
            mem.last_update[nodes[fwd]] = last_nodes[fwd]
            newer = mail_ts >= mem.mail_ts[nodes]
            nodes, agg, mail_ts = nodes[newer], agg[newer], mail_ts[newer]
        else:
            mem.memory[nodes] = mem_nodes.to(mem.memory.dtype)
            mem.last_update[nodes] = last_nodes
        mem.mail[nodes] = agg.to(mem.mail.dtype)
        mem.mail_ts[nodes] = mail_ts
        mem.has_mail[nodes] = True
        if fresh.prev_memory is None:
            empty = mem_nodes[:0]
            return AppliedMemory(persisted, empty, empty)
        return AppliedMemory(
            persisted,
            fresh.prev_memory.index_select(0, folded_kept).detach(),
            fresh.raw_memory.index_select(0, folded_kept).detach(),
        )

    @torch.no_grad()
    def commit_folds(self, fresh: FreshMemory) -> None:
        """Persist ``fresh`` (memories of nodes with every pending message folded in, e.g. of
        ``pending_nodes()``) and mark their messages consumed."""
        nodes, mem = fresh.nodes, self.memory
        mem.memory[nodes] = fresh.memory.to(mem.memory.dtype)
        mem.last_update[nodes] = fresh.last_update
        mem.has_mail[nodes] = False

    @torch.no_grad()
    def commit_events(self, prepared: PreparedBatch) -> None:
        """Write a ``prepare_events`` result; the state must not have changed in between."""
        if prepared.engine != self.instance:
            raise RuntimeError(
                f"batch prepared on engine #{prepared.engine}, not on this one (#{self.instance})"
            )
        if prepared.version != int(self.events_applied):
            raise RuntimeError(
                f"batch prepared at {prepared.version} events, state now has {int(self.events_applied)}"
            )
        mem, nodes = self.memory, prepared.nodes
        mem.memory[nodes] = prepared.memory.to(mem.memory.dtype)
        mem.last_update[nodes] = prepared.mail_ts
        mem.mail[nodes] = prepared.mail.to(mem.mail.dtype)
        mem.mail_ts[nodes] = prepared.mail_ts
        mem.has_mail[nodes] = False
        self.record(prepared.batch)
