"""MemoryEngine: the pure TGN engine (state + model, tensors in, tensors out, one device).

Step order, shared by trainer and server (TGN "memory update at batch start"):

1. **score** the batch with the current state. A node's pending message (from its previous
   events) is folded into its memory on the fly, with gradient when training.
2. **loss** (training only).
3. **apply** the batch: persist the folded memories of the batch's nodes, store the batch's
   events as their new pending messages, insert them in the neighbour table and edge history.
4. the persisted state is detached (``apply_events`` runs without grad).

Every prediction within a batch sees the same state, so no event can see itself or a later
event (no leakage); the same batch boundaries give the same state online and offline. The order
itself is code in ``tgnstream.core.step``; this module gives it its parts, with gathering (what a
forward reads from the state: ``gather_*``, ``fetch_memory``) separate from the model forward
(``fold``, ``embed_forward``, ``pair_forward``).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from tgnstream.core.batch_index import KeyedBatch
from tgnstream.core.config import ModelConfig
from tgnstream.core.edge_history import EdgeHistory
from tgnstream.core.events import EventBatch
from tgnstream.core.idmap import IdMap
from tgnstream.core.inputs import EmbeddingInputs, FreshMemory, MemoryRows, PairInputs
from tgnstream.core.memory import NodeMemory
from tgnstream.core.model import TGNModel
from tgnstream.core.modules import encode_pair_features
from tgnstream.core.neighbors import RecentNeighbors
from tgnstream.core.pair_stats import pairwise_stats, ranking_stats
from tgnstream.core.pres import TransitionStats, pres_fuse

__all__ = ["MemoryEngine", "FreshMemory", "PreparedBatch", "AppliedMemory"]

_INSTANCES = itertools.count(1)
# Pair-feature ranking works on blocks of about this many (source, candidate) cells.
_RANK_BLOCK_CELLS = 1 << 15


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
        self.instance = next(_INSTANCES)  # unique in this process (copies get their own: __deepcopy__)
        self.config = config
        self.model = TGNModel(config)
        self.memory = NodeMemory(capacity, config.memory_dim, config.edge_dim)
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
        self.to(device)

    def __deepcopy__(self, memo):
        cls = type(self)
        out = cls.__new__(cls)
        memo[id(self)] = out
        for k, v in self.__dict__.items():
            out.__dict__[k] = copy.deepcopy(v, memo)
        out.__dict__["instance"] = next(_INSTANCES)
        return out

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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # States saved before first_event_time existed: the oldest "newest event of a pair" is
        # the closest bound they still hold (at or after the true first event).
        key = prefix + "first_event_time"
        if key not in state_dict:
            last_t = state_dict.get(prefix + "history.last_t")
            first = last_t.min() if last_t is not None and last_t.numel() else torch.tensor(float("inf"))
            state_dict[key] = first.to(torch.float64).reshape(())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
    def copy_state_from(self, other: MemoryEngine) -> None:
        """Make this engine's node state (memory, mailbox, neighbours, pair history, id map,
        counters) a copy of ``other``'s; weights and PRES statistics (learnt, like weights) stay.
        Continual training restarts each epoch over its window from the window's first state."""
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

    @torch.no_grad()
    def copy_learned_from(self, other: MemoryEngine) -> None:
        """Take ``other``'s weights and PRES statistics (what training learns); node state stays."""
        self.model.load_state_dict(other.model.state_dict())
        if other.pres is not None:
            self.pres = copy.deepcopy(other.pres).to(self.device)
            self._align_capacity()

    def _align_capacity(self) -> None:
        """Every per-node buffer at one capacity (checkpoints rely on it)."""
        if self.pres is None:
            return
        if self.pres.capacity <= self.capacity:
            self.pres.grow(self.capacity)
        else:
            self.ensure_capacity(self.pres.capacity)

    # ----------------------------------------------------------------------------- gather
    def fetch_memory(self, nodes: torch.Tensor) -> MemoryRows:
        """Copy the memory, pending message and PRES statistics of ``nodes [U]`` (sorted, unique)."""
        mem = self.memory
        pending = mem.has_mail[nodes].nonzero().squeeze(1)
        # Nothing pending (a server folds after every batch): empty rows without four gathers.
        ids = nodes[pending] if pending.numel() else nodes[:0]
        pres = self.pres
        return MemoryRows(
            nodes=nodes,
            memory=mem.memory[nodes],
            last_update=mem.last_update[nodes],
            pending=pending,
            mail=mem.mail[ids],
            mail_ts=mem.mail_ts[ids],
            pres_mean=None if pres is None else pres.mean[ids],
            pres_count=None if pres is None else pres.count[ids],
        )

    def gather_embedding(
        self,
        nodes: torch.Tensor,
        t: torch.Tensor,
        context: EventBatch | None = None,
        visible: torch.Tensor | None = None,
    ) -> EmbeddingInputs:
        """Structure needed to embed ``nodes [M]`` at times ``t [M]`` (float64): see ``embed_with``.

        With ``config.batch_neighbors`` and a ``context`` batch, query ``j`` also sees the context
        events ``< visible[j]`` as neighbours; queries of one node that see the same number of
        them share one embedding (at their earliest time).
        """
        cfg = self.config
        if cfg.embedding == "attention" and cfg.batch_neighbors and context is not None and len(context):
            return self._gather_with_batch_neighbors(nodes, t, context, visible)
        uniq, inv = torch.unique(nodes, return_inverse=True)
        t_u = torch.full(uniq.shape, float("inf"), dtype=torch.float64, device=t.device)
        t_u = t_u.scatter_reduce(0, inv, t, reduce="amin")
        if cfg.embedding != "attention":
            return EmbeddingInputs(inv, uniq, t_u, uniq, torch.searchsorted(uniq, uniq))
        nb_ids, nb_ts, nb_feats, mask = self.neighbors.gather(uniq)
        return self._attention_inputs(inv, uniq, t_u, nb_ids, nb_ts, nb_feats, mask)

    def _attention_inputs(self, inv, query_nodes, t_u, nb_ids, nb_ts, nb_feats, mask) -> EmbeddingInputs:
        read = torch.unique(torch.cat([query_nodes, nb_ids[mask]]))
        nb_idx = torch.searchsorted(read, nb_ids.clamp(min=0))
        return EmbeddingInputs(
            inv=inv,
            query_nodes=query_nodes,
            t_query=t_u,
            nodes=read,
            q_idx=torch.searchsorted(read, query_nodes),
            nb_idx=torch.where(mask, nb_idx, torch.zeros_like(nb_idx)),
            nb_dt=(t_u.unsqueeze(1) - nb_ts).clamp(min=0),
            nb_feats=nb_feats,
            mask=mask,
            # Only a fold with autograd on reads grad_nodes (serving skips the unique).
            grad_nodes=None
            if self.config.neighbor_memory_grad or not torch.is_grad_enabled()
            else torch.unique(query_nodes),
        )

    def _gather_with_batch_neighbors(
        self, nodes: torch.Tensor, t: torch.Tensor, context: EventBatch, visible: torch.Tensor
    ) -> EmbeddingInputs:
        """Attention inputs where each query's neighbours are the K most recent of its table row
        and the context events it may see (sorted by (node, event); two binary searches a query)."""
        k = self.neighbors.k
        cs = context.src
        b = cs.numel()

        def by_node():  # once per context batch, however many queries use it
            index = KeyedBatch(torch.cat([cs, context.dst]), b)
            order = index.order
            return (
                index,
                torch.cat([context.dst, cs])[order],
                context.t.repeat(2)[order],
                context.feats.repeat(2, 1)[order],
            )

        index, s_partner, s_t, s_feats = context.derived("neighbor_index", by_node)
        start, seen = index.lookup(nodes, visible)
        # One embedding per (node, batch events it sees); 2b + 1 > any count (self-loops count twice).
        key, inv = torch.unique(nodes * (2 * b + 1) + seen, return_inverse=True)
        q_nodes, q_seen = key // (2 * b + 1), key % (2 * b + 1)
        t_u = torch.full(key.shape, float("inf"), dtype=torch.float64, device=t.device)
        t_u = t_u.scatter_reduce(0, inv, t, reduce="amin")
        q_start = torch.zeros_like(key).scatter(0, inv, start)
        # The newest min(seen, K) batch neighbours, then the table's, keep the K newest.
        j = torch.arange(k, device=cs.device)
        batch_ok = j.unsqueeze(0) < q_seen.unsqueeze(1)
        pos = (q_start.unsqueeze(1) + q_seen.unsqueeze(1) - 1 - j).clamp(min=0)
        tb_ids, tb_ts, tb_feats, tb_mask = self.neighbors.gather(q_nodes)
        all_ids = torch.cat([torch.where(batch_ok, s_partner[pos], -1), tb_ids], 1)
        all_ts = torch.cat([s_t[pos], tb_ts], 1)
        all_mask = torch.cat([batch_ok, tb_mask], 1)
        newest = torch.where(all_mask, all_ts, torch.full_like(all_ts, float("-inf"))).topk(k, 1).indices
        mask = all_mask.gather(1, newest)
        nb_ids = torch.where(mask, all_ids.gather(1, newest), -1)
        nb_ts = all_ts.gather(1, newest)
        nb_feats = torch.cat([s_feats[pos], tb_feats], 1)
        nb_feats = nb_feats.gather(1, newest.unsqueeze(-1).expand(-1, -1, nb_feats.shape[-1]))
        return self._attention_inputs(inv, q_nodes, t_u, nb_ids, nb_ts, nb_feats, mask)

    def gather_pairs(
        self,
        src: torch.Tensor,
        dst: torch.Tensor,
        t: torch.Tensor,
        context: EventBatch | None = None,
        visible: torch.Tensor | None = None,
        embed_t: torch.Tensor | None = None,
    ) -> PairInputs:
        """Structure needed to score pairs ``src, dst [B]`` at ``t [B]``: see ``logits``.
        ``embed_t [2B]``: the times the ``[src; dst]`` embeddings are computed at, when they are
        not ``[t; t]`` (a data-parallel shard embeds each node when the whole batch would)."""
        self._check_ids(src, dst)
        vis = None if visible is None else torch.cat([visible, visible])
        emb_t = torch.cat([t, t]) if embed_t is None else embed_t
        emb = self.gather_embedding(torch.cat([src, dst]), emb_t, context, vis)
        pair = self.pair_features(src, dst, t, context, visible) if self.config.pair_features else None
        return PairInputs(emb, src.numel(), pair)

    # ---------------------------------------------------------------------- model forward
    def _update(
        self, mail: torch.Tensor, dt: torch.Tensor, prev: torch.Tensor, mean, count
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory update of every path (training, evaluation, serving): the updater's output
        ``raw`` and the memory that is kept, PRES-corrected when enabled: ``(kept, raw)``."""
        raw = self.model.update_memory(mail, dt, prev)
        if self.pres is None:
            return raw, raw
        return pres_fuse(raw, prev, mean, count, self.model.pres_gamma()), raw

    def fold(self, rows: MemoryRows, grad_nodes: torch.Tensor | None = None) -> FreshMemory:
        """Fold the pending messages of ``rows`` into their memories (the model's part of
        reading memory). With autograd on, folds of nodes outside ``grad_nodes`` (when given)
        run without it: same values, no backward cost."""
        mem, last, pending = rows.memory, rows.last_update, rows.pending
        if not pending.numel():
            return FreshMemory(rows.nodes, mem, last)
        ids = rows.nodes[pending]
        mail_ts = rows.mail_ts
        dt = (mail_ts - last[pending]).clamp(min=0)
        prev = mem[pending]
        mean, count = rows.pres_mean, rows.pres_count
        if grad_nodes is None or not torch.is_grad_enabled():
            updated, raw = self._update(rows.mail, dt, prev, mean, count)
        else:
            with_grad = torch.isin(ids, grad_nodes)
            updated, raw = prev.clone(), prev.clone()
            parts = ((with_grad.nonzero().squeeze(1), True), ((~with_grad).nonzero().squeeze(1), False))
            for sel, grad in parts:
                with torch.set_grad_enabled(grad):
                    u, r = self._update(
                        rows.mail[sel],
                        dt[sel],
                        prev[sel],
                        None if mean is None else mean[sel],
                        None if count is None else count[sel],
                    )
                updated[sel] = u
                raw[sel] = r
        return FreshMemory(
            rows.nodes,
            mem.index_put((pending,), updated),
            last.index_put((pending,), mail_ts),
            folded=pending,
            prev_memory=prev,
            raw_memory=raw,
            consumed_ts=mail_ts,
        )

    def fresh_memory(self, nodes: torch.Tensor, grad_nodes: torch.Tensor | None = None) -> FreshMemory:
        """Memories of ``nodes`` (any ids) with pending messages folded in (fetch + fold)."""
        return self.fold(self.fetch_memory(torch.unique(nodes)), grad_nodes)

    def embed_forward(self, inputs: EmbeddingInputs, fresh: FreshMemory) -> torch.Tensor:
        """Embeddings ``[M, d_emb]`` of the queries of ``inputs`` from memories ``fresh`` (which
        must hold ``inputs.nodes`` in the same order)."""
        if inputs.nb_idx is not None:
            z = self.model.embedding(
                fresh.memory, inputs.q_idx, inputs.nb_idx, inputs.nb_dt, inputs.nb_feats, inputs.mask
            )
            return z.index_select(0, inputs.inv)
        mem = fresh.memory.index_select(0, inputs.q_idx)
        if self.config.embedding == "time":
            mem = self.model.embedding(mem, inputs.t_query - fresh.last_update[inputs.q_idx])
        return mem.index_select(0, inputs.inv)

    def pair_forward(self, inputs: PairInputs, fresh: FreshMemory) -> torch.Tensor:
        """Link logits ``[B]`` of the pairs of ``inputs`` from memories ``fresh``."""
        b = inputs.num_pairs
        z = self.embed_forward(inputs.embedding, fresh)
        return self.model.decoder(z[:b], z[b:], inputs.pair)

    # ------------------------------------------------------------------- memory + embedding
    def embed_with(
        self,
        nodes: torch.Tensor,
        t: torch.Tensor,
        context: EventBatch | None = None,
        visible: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, FreshMemory]:
        """Embeddings ``[M, d_emb]`` of ``nodes [M]`` queried at times ``t [M]`` (float64), plus the
        fresh memories used (covering ``nodes`` and their neighbours).

        Each distinct node is embedded once per call, at the earliest time it is queried in the
        call: half the work on typical batches, and still leakage-free because a later query
        can never move an earlier one's time. All state is from before the call either way.
        ``context``/``visible``: see ``gather_embedding``.
        """
        inputs, rows = self.embed_inputs(nodes, t, context, visible)
        fresh = self.fold(rows, inputs.grad_nodes)
        return self.embed_forward(inputs, fresh), fresh

    def embed_inputs(
        self,
        nodes: torch.Tensor,
        t: torch.Tensor,
        context: EventBatch | None = None,
        visible: torch.Tensor | None = None,
    ) -> tuple[EmbeddingInputs, MemoryRows]:
        """Everything embedding ``nodes [M]`` at ``t [M]`` reads from the state, as copies: the
        structure (``gather_embedding``) and the memory rows (``fetch_memory``). ``fold`` and
        ``embed_forward`` then compute from them alone."""
        inputs = self.gather_embedding(nodes, t, context, visible)
        return inputs, self.fetch_memory(inputs.nodes)

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
        return self.encode_pairs(stats, t)

    def encode_pairs(self, stats, t: torch.Tensor) -> torch.Tensor:
        """``encode_pair_features`` with this model's settings: ``[*, F]``."""
        return encode_pair_features(stats, t, self.config.activity_features)

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
        inputs = self.gather_pairs(src, dst, t, context, visible)
        fresh = self.fold(self.fetch_memory(inputs.embedding.nodes), inputs.embedding.grad_nodes)
        return self.pair_forward(inputs, fresh), fresh

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
    def score(
        self, src: torch.Tensor, dst: torch.Tensor, t: torch.Tensor, context: EventBatch | None = None
    ) -> torch.Tensor:
        """Link probabilities ``[B]`` for ``src [B], dst [B]`` at times ``t [B]`` (float64).
        ``context``: a not-yet-applied batch every query sees whole (serving's open batch)."""
        return torch.sigmoid(self.logits(src, dst, t, context, _sees_all(context, src.numel()))[0])

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
        around = torch.where(present, nb.latest(safe), torch.full_like(nb.ts[nodes], float("-inf")))
        times = torch.maximum(nb.latest(nodes), around.amax(-1))
        signature = nb.count[nodes] + torch.where(present, nb.count[safe], 0).sum(-1)
        return times, signature

    def candidate_times(self, candidates: torch.Tensor, t_c: float, mode: str = "query") -> torch.Tensor:
        """Times ``[Q]`` float64 at which ``candidates [Q]`` are embedded for ranking.

        ``"query"``: all at ``t_c`` (exact: what a query at ``t_c`` sees). ``"last_change"``: each
        at ``last_change`` (``t_c`` for a node without events), so a candidate whose
        neighbourhood did not change keeps its embedding and a cache refreshes only the others.
        """
        q = candidates.numel()
        at_query = torch.full((q,), t_c, dtype=torch.float64, device=candidates.device)
        if mode == "query":
            return at_query
        if mode != "last_change":
            raise ValueError(f"candidate time mode must be 'query' or 'last_change', got {mode!r}")
        times, _ = self.last_change(candidates)
        return torch.where(torch.isfinite(times), times, at_query)

    @torch.no_grad()
    def rank_logits(
        self,
        src: torch.Tensor,
        t: torch.Tensor,
        candidates: torch.Tensor,
        t_candidates: float | None = None,
        context: EventBatch | None = None,
        visible: torch.Tensor | None = None,
        candidate_time: str = "query",
    ) -> torch.Tensor:
        """Logits ``[P, Q]`` of each source ``src [P]`` (at its time ``t [P]``) against every
        candidate ``[Q]``. Candidate embeddings are computed once, at ``t_candidates`` (default:
        the earliest of ``t``), as a TopK query issued at that time would (``candidate_time``:
        see ``candidate_times``); pair features use each source's own time (and
        ``context``/``visible`` as in ``logits``)."""
        self._check_ids(src, candidates)
        t_c = float(t.min()) if t_candidates is None else t_candidates
        q = candidates.numel()
        vis = None
        if context is not None and visible is not None:
            # Sources see their batch's earlier events; candidates are embedded as of the batch start.
            vis = torch.cat([visible, torch.zeros(q, dtype=visible.dtype, device=visible.device)])
        z, _ = self.embed_with(
            torch.cat([src, candidates]),
            torch.cat([t, self.candidate_times(candidates, t_c, candidate_time).to(t.device)]),
            context,
            vis,
        )
        z_src, z_c = z[: src.numel()], z[src.numel() :]
        if not self.config.pair_features:
            return self.model.decoder.rank(z_src, z_c)
        stats = ranking_stats(self.history, self.neighbors, src, candidates, context, visible)
        # Row blocks keep the [rows, Q, F] features and [rows, Q, hidden] activations in cache
        # (ranking a batch against every node at once streams them through memory several times).
        rows = max(1, _RANK_BLOCK_CELLS // max(q, 1))
        blocks = []
        for i in range(0, src.numel(), rows):
            pair = self.encode_pairs(stats.rows(i, i + rows), t[i : i + rows, None])
            blocks.append(self.model.decoder.rank(z_src[i : i + rows], z_c, pair))
        return torch.cat(blocks)

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
    def embed(self, nodes: torch.Tensor, t: torch.Tensor, context: EventBatch | None = None) -> torch.Tensor:
        """Node embeddings ``[M, d_emb]`` at times ``t [M]`` (``context`` as in ``score``)."""
        self._check_ids(nodes)
        return self.embed_with(nodes, t, context, _sees_all(context, nodes.numel()))[0]

    def destinations(self) -> torch.Tensor:
        """Sorted ids ``[D]`` of every node that has been the destination of an applied event."""
        # nonzero counts, allocates, then fills: on a buffer another process writes (a reader of
        # shared state) the count can change between the passes and the fill would write past
        # its output. It runs on a private copy.
        return self.memory.is_destination.clone().nonzero().squeeze(1)

    def _check_ids(self, *tensors: torch.Tensor) -> None:
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

    def record(self, batch: EventBatch) -> None:
        """The structural part of applying a batch: neighbour table, pair history, destinations,
        counters. Independent of the memory part (``apply_memory``), so a pipeline's producer can
        keep structure exact while the trainer writes memories back."""
        self.memory.is_destination[batch.dst] = True
        self.neighbors.insert(batch.src, batch.dst, batch.t, batch.feats)
        self.history.insert(batch.src, batch.dst, batch.t)
        self.events_applied += len(batch)
        self.watermark.copy_(torch.maximum(self.watermark, batch.t.max()))
        self.first_event_time.copy_(torch.minimum(self.first_event_time, batch.t.min()))

    @torch.no_grad()
    def apply_events(self, batch: EventBatch, fresh: FreshMemory | None = None) -> None:
        """Apply a time-ordered batch to the state (step 3 of the module docstring):
        ``apply_memory`` then ``record``."""
        if len(batch) == 0:
            return
        self.ensure_capacity(int(torch.maximum(batch.src.max(), batch.dst.max())) + 1)
        self.apply_memory(batch, fresh)
        self.record(batch)

    @torch.no_grad()
    def apply_memory(
        self, batch: EventBatch, fresh: FreshMemory | None = None, in_order_only: bool = False
    ) -> AppliedMemory:
        """Persist the batch's folded memories and store its events as pending messages.

        ``fresh`` may carry the memories computed while scoring this batch (they must cover its
        nodes); otherwise they are recomputed from the current state. With ``config.fold_once``
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
        if fresh is None:
            fresh = self.fresh_memory(nodes)
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
            mem.memory[persisted] = fresh.memory[rows_f].detach()
            mem.last_update[persisted] = fresh.last_update[rows_f]
            mem.has_mail[persisted] = False
        else:
            persisted_own = torch.isin(persisted, nodes)
            folded_kept = folded_kept[persisted_own]
            persisted = persisted[persisted_own]
        rows = fresh.rows(nodes)
        mem_nodes = fresh.memory[rows].detach()
        last_nodes = fresh.last_update[rows]
        agg, mail_ts = self._messages(batch, nodes, mem_nodes)
        if in_order_only:
            fwd = last_nodes >= mem.last_update[nodes]
            mem.memory[nodes[fwd]] = mem_nodes[fwd]
            mem.last_update[nodes[fwd]] = last_nodes[fwd]
            newer = mail_ts >= mem.mail_ts[nodes]
            nodes, agg, mail_ts = nodes[newer], agg[newer], mail_ts[newer]
        else:
            mem.memory[nodes] = mem_nodes
            mem.last_update[nodes] = last_nodes
        mem.mail[nodes] = agg
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
        pres = self.pres
        folded, _ = self._update(
            agg,
            (mail_ts - fresh.last_update).clamp(min=0),
            fresh.memory,
            None if pres is None else pres.mean[nodes],
            None if pres is None else pres.count[nodes],
        )
        return PreparedBatch(batch, nodes, folded, agg, mail_ts, int(self.events_applied), self.instance)

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
        mem.memory[nodes] = prepared.memory
        mem.last_update[nodes] = prepared.mail_ts
        mem.mail[nodes] = prepared.mail
        mem.mail_ts[nodes] = prepared.mail_ts
        mem.has_mail[nodes] = False
        self.record(prepared.batch)


def _sees_all(context: EventBatch | None, n: int) -> torch.Tensor | None:
    """``visible`` for ``n`` queries that all come after every event of ``context``."""
    if context is None or not len(context):
        return None
    return torch.full((n,), len(context), dtype=torch.long, device=context.src.device)
