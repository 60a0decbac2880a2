"""MemoryEngine: the pure TGN engine (state + model, tensors in, tensors out, one device).

Step order, shared by trainer and server (TGN "memory update at batch start"):

1. **score** the batch with the current state. A node's pending message (from its previous
   events) is folded into its memory on the fly, with gradient when training.
2. **loss** (training only).
3. **apply** the batch: persist the folded memories of the batch's nodes, store the batch's
   events as their new pending messages, insert them in the neighbour table and edge history.
4. the persisted state is detached (``apply_events`` runs without grad).

Every prediction within a batch sees the same state, so no event can see itself or a later
event (no leakage); the same batch boundaries give the same state online and offline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tgnstream.core.config import ModelConfig
from tgnstream.core.edge_history import EdgeHistory
from tgnstream.core.events import EventBatch
from tgnstream.core.idmap import IdMap
from tgnstream.core.memory import NodeMemory
from tgnstream.core.model import TGNModel
from tgnstream.core.modules import encode_pair_features
from tgnstream.core.neighbors import RecentNeighbors
from tgnstream.core.pair_stats import pairwise_stats, ranking_stats

__all__ = ["MemoryEngine", "FreshMemory", "PreparedBatch"]


@dataclass(frozen=True)
class PreparedBatch:
    """A batch's state update computed ahead of writing it (see ``MemoryEngine.prepare_events``).

    nodes: ``[U]`` sorted endpoints; memory: ``[U, d_mem]`` their memories with the batch's
    messages folded in; mail/mail_ts: ``[U, mail_dim]``/``[U]`` those messages; version:
    ``events_applied`` of the state it was computed from.
    """

    batch: EventBatch
    nodes: torch.Tensor
    memory: torch.Tensor
    mail: torch.Tensor
    mail_ts: torch.Tensor
    version: int


@dataclass
class FreshMemory:
    """Memories of a sorted set of nodes with their pending messages folded in.

    nodes: ``[U]`` sorted unique ids; memory: ``[U, d_mem]`` (may carry grad);
    last_update: ``[U]`` float64.
    """

    nodes: torch.Tensor
    memory: torch.Tensor
    last_update: torch.Tensor

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.nodes, ids)


class MemoryEngine(nn.Module):
    """A TGN-family model with all of its node state as buffers on one device.

    Submodules: ``model`` (parameters), ``memory`` (memory + mailbox), ``neighbors`` (K most
    recent neighbours), ``history`` (per-pair count and last time), ``ids`` (external id map).
    ``state_dict()`` therefore captures weights and state together. Capacity grows by
    doubling when larger ids arrive.

    Args:
        config: model architecture.
        capacity: initial number of node slots.
        device: where every tensor lives.
    """

    def __init__(self, config: ModelConfig, capacity: int = 1024, device: torch.device | str = "cpu"):
        super().__init__()
        capacity = max(int(capacity), 1)
        self.config = config
        self.model = TGNModel(config)
        self.memory = NodeMemory(capacity, config.memory_dim, config.edge_dim)
        self.neighbors = RecentNeighbors(capacity, config.num_neighbors, config.edge_dim)
        self.history = EdgeHistory()
        self.ids = IdMap()
        self.register_buffer("events_applied", torch.zeros((), dtype=torch.long))
        self.register_buffer("watermark", torch.full((), float("-inf"), dtype=torch.float64))
        self.to(device)

    # ----------------------------------------------------------------------------- state
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
        new_cap = max(num_nodes, 2 * self.capacity)
        self.memory.grow(new_cap)
        self.neighbors.grow(new_cap)

    def reset_state(self) -> None:
        """Forget every event (memory, mailbox, neighbours, pair history, id map); keep weights."""
        self.ids.reset()
        self.memory.reset()
        self.neighbors.reset()
        self.history.reset()
        self.events_applied.zero_()
        self.watermark.fill_(float("-inf"))

    # ------------------------------------------------------------------- memory + embedding
    def fresh_memory(self, nodes: torch.Tensor, grad_nodes: torch.Tensor | None = None) -> FreshMemory:
        """Memories of ``nodes`` (any ids) with pending messages folded in.

        With autograd on, folds of nodes outside ``grad_nodes`` (when given) are computed
        without it: same values, no backward cost.
        """
        uniq = torch.unique(nodes)
        mem = self.memory.memory[uniq]
        last = self.memory.last_update[uniq]
        pending = self.memory.has_mail[uniq].nonzero().squeeze(1)
        if pending.numel():
            ids = uniq[pending]
            mail_ts = self.memory.mail_ts[ids]
            dt = (mail_ts - self.memory.last_update[ids]).clamp(min=0)
            if grad_nodes is None or not torch.is_grad_enabled():
                updated = self.model.update_memory(self.memory.mail[ids], dt, mem[pending])
            else:
                with_grad = torch.isin(ids, grad_nodes)
                updated = mem[pending].clone()
                g = with_grad.nonzero().squeeze(1)
                updated[g] = self.model.update_memory(self.memory.mail[ids[g]], dt[g], mem[pending[g]])
                ng = (~with_grad).nonzero().squeeze(1)
                with torch.no_grad():
                    updated[ng] = self.model.update_memory(
                        self.memory.mail[ids[ng]], dt[ng], mem[pending[ng]]
                    )
            mem = mem.index_put((pending,), updated)
            last = last.index_put((pending,), mail_ts)
        return FreshMemory(uniq, mem, last)

    def embed_with(self, nodes: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, FreshMemory]:
        """Embeddings ``[M, d_emb]`` of ``nodes [M]`` queried at times ``t [M]`` (float64), plus the
        fresh memories used (covering ``nodes`` and their neighbours).

        Each distinct node is embedded once per call, at the earliest time it is queried in the
        call: half the work on typical batches, and still leakage-free because a later query
        can never move an earlier one's time. All state is from before the call either way.
        """
        cfg = self.config
        uniq, inv = torch.unique(nodes, return_inverse=True)
        t_u = torch.full(uniq.shape, float("inf"), dtype=torch.float64, device=t.device)
        t_u = t_u.scatter_reduce(0, inv, t, reduce="amin")
        if cfg.embedding == "attention":
            nb_ids, nb_ts, nb_feats, mask = self.neighbors.gather(uniq)
            grad_nodes = None if cfg.neighbor_memory_grad else uniq
            fresh = self.fresh_memory(torch.cat([uniq, nb_ids[mask]]), grad_nodes)
            q_idx = fresh.rows(uniq)
            nb_idx = fresh.rows(nb_ids.clamp(min=0))
            nb_idx = torch.where(mask, nb_idx, torch.zeros_like(nb_idx))
            nb_dt = (t_u.unsqueeze(1) - nb_ts).clamp(min=0)
            z = self.model.embedding(fresh.memory, q_idx, nb_idx, nb_dt, nb_feats, mask)
            return z.index_select(0, inv), fresh
        fresh = self.fresh_memory(uniq)
        rows = fresh.rows(uniq)
        mem = fresh.memory.index_select(0, rows)
        if cfg.embedding == "time":
            mem = self.model.embedding(mem, t_u - fresh.last_update[rows])
        return mem.index_select(0, inv), fresh

    def pair_features(
        self,
        u: torch.Tensor,
        v: torch.Tensor,
        t: torch.Tensor,
        context: EventBatch | None = None,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pair features ``[N, F]`` of pairs ``u, v, t`` (``[N]``); see ``pair_stats``."""
        stats = pairwise_stats(self.history, self.neighbors, u, v, context, visible)
        return encode_pair_features(stats, t)

    # ------------------------------------------------------------------------------ scoring
    def logits(
        self,
        src: torch.Tensor,
        dst: torch.Tensor,
        t: torch.Tensor,
        context: EventBatch | None = None,
        visible: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, FreshMemory]:
        """Link logits ``[B]`` for pairs at times ``t [B]``; grad if enabled. All pairs share
        one embedding pass (so a positive and its negative see the same state).

        ``context``/``visible``: the not-yet-applied batch these queries belong to; query ``i``
        sees its events ``< visible[i]`` in the pair statistics (never in memory).
        """
        self._check_ids(src, dst)
        b = src.numel()
        z, fresh = self.embed_with(torch.cat([src, dst]), torch.cat([t, t]))
        pair = self.pair_features(src, dst, t, context, visible) if self.config.pair_features else None
        return self.model.decoder(z[:b], z[b:], pair), fresh

    def pos_neg_logits(
        self, batch: EventBatch, neg_dst: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, FreshMemory]:
        """Positive ``[B]`` and negative ``[B]`` logits of a not-yet-applied batch (one negative
        destination per event), in one pass; grad if enabled. Training and evaluation both
        score through here, so they see identical features."""
        b = len(batch)
        visible = torch.arange(b, device=batch.t.device).repeat(2)
        logits, fresh = self.logits(
            batch.src.repeat(2), torch.cat([batch.dst, neg_dst]), batch.t.repeat(2), batch, visible
        )
        return logits[:b], logits[b:], fresh

    @torch.no_grad()
    def score(self, src: torch.Tensor, dst: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Link probabilities ``[B]`` for ``src [B], dst [B]`` at times ``t [B]`` (float64)."""
        return torch.sigmoid(self.logits(src, dst, t)[0])

    @torch.no_grad()
    def rank_logits(
        self,
        src: torch.Tensor,
        t: torch.Tensor,
        candidates: torch.Tensor,
        t_candidates: float | None = None,
        context: EventBatch | None = None,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[P, Q]`` of each source ``src [P]`` (at its time ``t [P]``) against every
        candidate ``[Q]``. Candidate embeddings are computed once, at ``t_candidates`` (default:
        the earliest of ``t``), as a TopK query issued at that time would; pair features use
        each source's own time (and ``context``/``visible`` as in ``logits``)."""
        self._check_ids(src, candidates)
        t_c = float(t.min()) if t_candidates is None else t_candidates
        q = candidates.numel()
        z, _ = self.embed_with(
            torch.cat([src, candidates]),
            torch.cat([t, torch.full((q,), t_c, dtype=torch.float64, device=t.device)]),
        )
        z_src, z_c = z[: src.numel()], z[src.numel() :]
        pair = None
        if self.config.pair_features:
            stats = ranking_stats(self.history, self.neighbors, src, candidates, context, visible)
            pair = encode_pair_features(stats, t.unsqueeze(1))
        return self.model.decoder.rank(z_src, z_c, pair)

    @torch.no_grad()
    def top_k(
        self,
        src: int,
        t: float,
        k: int,
        candidates: torch.Tensor | None = None,
        exclude_seen: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best destinations for ``src`` at time ``t``: ``(ids [k'], probs [k'])``,
        best first; ``candidates`` defaults to every node seen as a destination."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if candidates is None:
            candidates = self.destinations()
        s = torch.tensor([src], device=self.device)
        tt = torch.tensor([t], dtype=torch.float64, device=self.device)
        logits = self.rank_logits(s, tt, candidates, t)[0]
        if exclude_seen:
            count, _ = self.history.lookup(s.expand(candidates.numel()), candidates)
            logits = logits.masked_fill(count > 0, float("-inf"))
        logits = logits.masked_fill(candidates == src, float("-inf"))
        top = torch.topk(logits, min(k, candidates.numel()))
        keep = torch.isfinite(top.values)
        return candidates[top.indices[keep]], torch.sigmoid(top.values[keep])

    @torch.no_grad()
    def embed(self, nodes: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Node embeddings ``[M, d_emb]`` at times ``t [M]``."""
        self._check_ids(nodes)
        return self.embed_with(nodes, t)[0]

    def destinations(self) -> torch.Tensor:
        """Sorted ids ``[D]`` of every node that has been the destination of an applied event."""
        return self.memory.is_destination.nonzero().squeeze(1)

    def _check_ids(self, *tensors: torch.Tensor) -> None:
        """Reject negative ids; make room for new ones, which read as cold-start nodes (zero
        memory, no neighbours, no history). Growing reallocates state buffers, so a concurrent
        server must call this under its write lock (or pre-size the capacity)."""
        for x in tensors:
            if x.numel() and (int(x.min()) < 0):
                raise ValueError("node ids must be non-negative")
            if x.numel():
                self.ensure_capacity(int(x.max()) + 1)

    @torch.no_grad()
    def fold_pending(self) -> int:
        """Fold every pending message into its node's memory now; returns how many were folded.

        Scores are unchanged: a fold is a pure function of (memory, message, times), and the
        message is consumed exactly once either way. A server calls this after each applied batch
        so that queries read memories directly instead of running the updater per request.
        """
        ids = self.memory.has_mail.nonzero().squeeze(1)
        if ids.numel() == 0:
            return 0
        fresh = self.fresh_memory(ids)
        self.memory.memory[ids] = fresh.memory
        self.memory.last_update[ids] = fresh.last_update
        self.memory.has_mail[ids] = False
        return int(ids.numel())

    # ------------------------------------------------------------------------------- apply
    def _messages(
        self, batch: EventBatch, nodes: torch.Tensor, mem_nodes: torch.Tensor
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
        if self.config.aggregator == "last":
            agg = mails[newest]
        else:
            agg = torch.zeros(n, mails.shape[1], device=mails.device).index_add_(0, owner, mails)
            agg /= torch.bincount(owner, minlength=n).unsqueeze(1).float()
        return agg, when[newest]

    def _record(self, batch: EventBatch) -> None:
        """Neighbour table, pair history, destinations, counters: the non-memory part of apply."""
        self.memory.is_destination[batch.dst] = True
        self.neighbors.insert(batch.src, batch.dst, batch.t, batch.feats)
        self.history.insert(batch.src, batch.dst, batch.t)
        self.events_applied += len(batch)
        self.watermark.copy_(torch.maximum(self.watermark, batch.t.max()))

    @torch.no_grad()
    def apply_events(self, batch: EventBatch, fresh: FreshMemory | None = None) -> None:
        """Apply a time-ordered batch to the state (step 3 of the module docstring).

        ``fresh`` may carry the memories computed while scoring this batch (they must cover
        its nodes and come from the current state); otherwise they are recomputed. With
        ``config.fold_once``, the folds it holds for other nodes (neighbours) are persisted too.
        """
        if len(batch) == 0:
            return
        src, dst = batch.src, batch.dst
        self.ensure_capacity(int(torch.maximum(src.max(), dst.max())) + 1)
        nodes = torch.unique(torch.cat([src, dst]))
        mem = self.memory
        if fresh is None:
            fresh = self.fresh_memory(nodes)
        elif self.config.fold_once:
            # The batch's own nodes are overwritten below; this persists the neighbours' folds.
            folded = mem.has_mail[fresh.nodes]
            ids = fresh.nodes[folded]
            mem.memory[ids] = fresh.memory[folded].detach()
            mem.last_update[ids] = fresh.last_update[folded]
            mem.has_mail[ids] = False
        rows = fresh.rows(nodes)
        mem_nodes = fresh.memory[rows].detach()
        mem.memory[nodes] = mem_nodes
        mem.last_update[nodes] = fresh.last_update[rows]
        agg, mail_ts = self._messages(batch, nodes, mem_nodes)
        mem.mail[nodes] = agg
        mem.mail_ts[nodes] = mail_ts
        mem.has_mail[nodes] = True
        self._record(batch)

    @torch.no_grad()
    def prepare_events(self, batch: EventBatch) -> PreparedBatch:
        """Everything ``apply_events`` followed by ``fold_pending`` writes for ``batch``'s nodes,
        computed without changing the state (so readers may run meanwhile); ``commit_events``
        then writes it. The two steps give the same state as apply + fold; the point is that
        the writer's exclusive section shrinks to the scatters and table inserts."""
        src, dst = batch.src, batch.dst
        if int(torch.maximum(src.max(), dst.max())) >= self.capacity:
            raise ValueError("batch ids exceed the capacity: call ensure_capacity (as the writer) first")
        nodes = torch.unique(torch.cat([src, dst]))
        fresh = self.fresh_memory(nodes)
        agg, mail_ts = self._messages(batch, nodes, fresh.memory)
        folded = self.model.update_memory(agg, (mail_ts - fresh.last_update).clamp(min=0), fresh.memory)
        return PreparedBatch(batch, nodes, folded, agg, mail_ts, int(self.events_applied))

    @torch.no_grad()
    def commit_events(self, prepared: PreparedBatch) -> None:
        """Write a ``prepare_events`` result; the state must not have changed in between."""
        if prepared.version != int(self.events_applied):
            raise RuntimeError(
                f"batch prepared at {prepared.version} events, state now has {int(self.events_applied)}"
            )
        mem, nodes = self.memory, prepared.nodes
        mem.memory[nodes] = prepared.memory
        mem.last_update[nodes] = prepared.mail_ts
        mem.mail[nodes] = prepared.mail
        mem.mail_ts[nodes] = prepared.mail_ts
        mem.has_mail[nodes] = False
        self._record(prepared.batch)
