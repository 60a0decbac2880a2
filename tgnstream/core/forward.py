"""MemoryForward: what a TGN engine computes from its state and weights (no state writes).

Three kinds of method, in the order a forward runs them:

- **gather** (``gather_embedding``, ``gather_pairs``, ``gather_ranking``, ``embed_inputs``):
  copy what a forward reads out of the state (neighbour rows, pair statistics, which memories
  are needed); memory rows themselves are read by ``MemoryState.fetch_memory``.
- **fold** (``fold``, ``fresh_memory``): fold pending messages into memories with the updater
  (PRES-corrected when enabled).
- **forward** (``embed_forward``, ``pair_forward``, ``rank_forward``; ``embed_with`` and
  ``prepare_events`` compose them): embeddings and decoder logits, from gathered copies only.

A mixin of ``MemoryEngine``: it reads ``self.model``, ``self.config`` and the state's buffers.
"""

from __future__ import annotations

import torch

from tgnstream.core.batch_index import KeyedBatch
from tgnstream.core.events import EventBatch
from tgnstream.core.inputs import EmbeddingInputs, FreshMemory, MemoryRows, PairInputs
from tgnstream.core.modules import encode_pair_features
from tgnstream.core.pair_stats import PairStats, pairwise_stats, ranking_stats
from tgnstream.core.pres import pres_fuse
from tgnstream.core.state import PreparedBatch, aggregate_messages

__all__ = ["MemoryForward"]

# Pair-feature ranking works on blocks of about this many (source, candidate) cells.
_RANK_BLOCK_CELLS = 1 << 15


class MemoryForward:
    """The forward half of ``MemoryEngine`` (see the module docstring)."""

    # ------------------------------------------------------------------------------ gather
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
        """Structure needed to score pairs ``src, dst [B]`` at ``t [B]`` (see ``pair_forward``).

        ``context``/``visible``: the not-yet-applied batch these queries belong to; query ``i``
        sees its events ``< visible[i]`` in the pair statistics (never in memory). ``embed_t
        [2B]``: the times the ``[src; dst]`` embeddings are computed at, when they are not
        ``[t; t]`` (a data-parallel shard embeds each node when the whole batch would)."""
        self.check_ids(src, dst)
        vis = None if visible is None else torch.cat([visible, visible])
        emb_t = torch.cat([t, t]) if embed_t is None else embed_t
        emb = self.gather_embedding(torch.cat([src, dst]), emb_t, context, vis)
        pair = None
        if self.config.pair_features:
            stats = pairwise_stats(self.history, self.neighbors, src, dst, context, visible)
            pair = self._encode_pairs(stats, t)
        return PairInputs(emb, src.numel(), pair)

    def gather_ranking(
        self,
        src: torch.Tensor,
        candidates: torch.Tensor,
        context: EventBatch | None = None,
        visible: torch.Tensor | None = None,
    ) -> PairStats | None:
        """Pair statistics ``[P, Q]`` of sources ``src [P]`` against ``candidates [Q]`` for
        ``rank_forward`` (None without pair features); ``context``/``visible`` as in
        ``gather_pairs``."""
        if not self.config.pair_features:
            return None
        return ranking_stats(self.history, self.neighbors, src, candidates, context, visible)

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

    def _encode_pairs(self, stats, t: torch.Tensor) -> torch.Tensor:
        """``encode_pair_features`` with this model's settings: ``[*, F]``."""
        return encode_pair_features(stats, t, self.config.activity_features)

    # -------------------------------------------------------------------------------- fold
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

    def pair_forward(self, inputs: PairInputs, rows: MemoryRows) -> tuple[torch.Tensor, FreshMemory]:
        """Link logits ``[B]`` of the pairs of ``inputs`` (grad if enabled) from memory rows
        ``rows`` (fetched for ``inputs.embedding.nodes``): fold, embed, decode. Also returns the
        fresh memories (what the step's apply persists). Every pair sees the same memory."""
        fresh = self.fold(rows, inputs.embedding.grad_nodes)
        b = inputs.num_pairs
        z = self.embed_forward(inputs.embedding, fresh)
        return self.model.decoder(z[:b], z[b:], inputs.pair), fresh

    def rank_forward(
        self, z_src: torch.Tensor, z_cand: torch.Tensor, stats: PairStats | None, t_src: torch.Tensor
    ) -> torch.Tensor:
        """The one ranker: logits ``[P, Q]`` of source embeddings ``z_src [P, d]`` against
        candidate embeddings ``z_cand [Q, d]``, with the pair statistics of ``gather_ranking``
        encoded at the sources' times ``t_src [P]`` (weights only: no state is read)."""
        if stats is None:
            return self.model.decoder.rank(z_src, z_cand)
        # Row blocks keep the [rows, Q, F] features and [rows, Q, hidden] activations in cache
        # (ranking a batch against every node at once streams them through memory several times).
        q = z_cand.shape[0]
        rows = max(1, _RANK_BLOCK_CELLS // max(q, 1))
        blocks = []
        for i in range(0, z_src.shape[0], rows):
            pair = self._encode_pairs(stats.rows(i, i + rows), t_src[i : i + rows, None])
            blocks.append(self.model.decoder.rank(z_src[i : i + rows], z_cand, pair))
        return torch.cat(blocks)

    # ------------------------------------------------------------------------ compositions
    def embed_with(
        self,
        nodes: torch.Tensor,
        t: torch.Tensor,
        context: EventBatch | None = None,
        visible: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, FreshMemory]:
        """Embeddings ``[M, d_emb]`` of ``nodes [M]`` queried at times ``t [M]`` (float64), plus the
        fresh memories used (covering ``nodes`` and their neighbours): gather, fetch, fold,
        ``embed_forward``.

        Each distinct node is embedded once per call, at the earliest time it is queried in the
        call: half the work on typical batches, and still leakage-free because a later query
        can never move an earlier one's time. All state is from before the call either way.
        ``context``/``visible``: see ``gather_embedding``.
        """
        inputs, rows = self.embed_inputs(nodes, t, context, visible)
        fresh = self.fold(rows, inputs.grad_nodes)
        return self.embed_forward(inputs, fresh), fresh

    @torch.no_grad()
    def prepare_events(self, batch: EventBatch) -> PreparedBatch:
        """Everything the step's apply followed by ``fold_pending`` writes for ``batch``'s nodes,
        computed without changing the state (so readers may run meanwhile);
        ``MemoryState.commit_events`` then writes it. The two give the same state as apply +
        fold; the point is that the writer's exclusive section shrinks to the scatters and
        table inserts."""
        src, dst = batch.src, batch.dst
        if int(torch.maximum(src.max(), dst.max())) >= self.capacity:
            raise ValueError("batch ids exceed the capacity: call ensure_capacity (as the writer) first")
        nodes = torch.unique(torch.cat([src, dst]))
        fresh = self.fresh_memory(nodes)
        agg, mail_ts = aggregate_messages(batch, nodes, fresh.memory, self.config.aggregator)
        pres = self.pres
        folded, _ = self._update(
            agg,
            (mail_ts - fresh.last_update).clamp(min=0),
            fresh.memory,
            None if pres is None else pres.mean[nodes],
            None if pres is None else pres.count[nodes],
        )
        return PreparedBatch(batch, nodes, folded, agg, mail_ts, int(self.events_applied), self.instance)
