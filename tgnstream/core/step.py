"""The temporal step, written once: gather -> score -> loss -> apply (-> detach).

Every consumer of the stream goes through here: offline training (``trainer.offline``), the
pipelined trainer (``trainer.pipeline``), stream evaluation (``core.stream_eval``), prequential
quality (``ingest.quality``) and ingest (``ingest.loop``). So PRES (inside ``score``/``loss``/
``apply``) and the pipeline (which splits ``gather`` from ``fetch`` across threads) change the
step in one place.

1. **gather** what a batch's forward reads from the state: structure (neighbour rows, pair
   statistics, which memories are needed) via ``gather``; node memory rows via ``fetch``, as late
   as possible (a pipeline's producer gathers batch i+1 while batch i trains).
2. **score** the batch from what was gathered: fold pending messages (with gradient in training,
   PRES-corrected when enabled), embed, decode. Every prediction of a batch sees the same
   memory; pair statistics also see the batch's earlier events (never its own or later ones).
3. **loss** (training): BCE over positives and negatives, plus PRES's memory-coherence term.
4. **apply** the batch (no grad): persist the folded memories, store its events as pending
   messages, insert them into the neighbour table and pair history; PRES statistics learn from
   the persisted transitions of training batches only. What is persisted is detached, so
   ``backward`` may run after ``apply``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.inputs import FreshMemory, MemoryRows, PairInputs
from tgnstream.core.pres import coherence_loss
from tgnstream.core.state import PreparedBatch

__all__ = ["GatheredBatch", "ScoredBatch", "TemporalStep"]


@dataclass(frozen=True)
class GatheredBatch:
    """A batch with everything its forward reads, gathered ahead of the forward.

    batch: the events (``[B]``); neg_dst: ``[B]`` one negative destination per event, or
    ``[B, N]`` several; inputs: structure to score ``[src; src ...]`` against ``[dst; negatives
    column by column]``; memory: the node rows (None until fetched); staleness: write-backs of
    earlier batches that ``memory`` was fetched without (0 in the sequential step);
    logit_offset: ``[B * (1 + N)]`` (the order of ``inputs``) added to the logits ``score``
    returns, for training only (``NegativeSampler.log_sampling_ratio``); None adds nothing.
    rows: ``[R]`` the events of ``batch`` scored (a data-parallel rank's shard: ``neg_dst`` and
    ``inputs`` then cover these rows only, the whole batch stays their context); None: all.
    """

    batch: EventBatch
    neg_dst: torch.Tensor
    inputs: PairInputs
    memory: MemoryRows | None = None
    staleness: int = 0
    logit_offset: torch.Tensor | None = None
    rows: torch.Tensor | None = None


@dataclass(frozen=True)
class ScoredBatch:
    """Positive ``[B]`` and negative ``[B]`` (or ``[B, N]``, the shape of ``neg_dst``) logits of a
    batch (grad when training) and the fresh memories they were computed from (what ``apply``
    persists)."""

    batch: EventBatch
    pos: torch.Tensor
    neg: torch.Tensor
    fresh: FreshMemory


class TemporalStep:
    """The step's phases over one engine.

    Args:
        engine: state and model.
        coherence_weight: beta, weight of PRES's memory-coherence loss (used only with
            ``engine.config.pres``).
        ranking_weight: weight of the listwise term of ``loss`` (softmax cross-entropy of each
            positive against its own negatives; needs several negatives per event to matter).
    """

    def __init__(self, engine: MemoryEngine, coherence_weight: float = 0.1, ranking_weight: float = 0.0):
        self.engine = engine
        self.coherence_weight = float(coherence_weight)
        self.ranking_weight = float(ranking_weight)

    # ------------------------------------------------------------------------------ gather
    def gather(
        self, batch: EventBatch, neg_dst: torch.Tensor, rows: torch.Tensor | None = None
    ) -> GatheredBatch:
        """Structure for scoring each event and its negative (no memory read yet); with ``rows``
        only those events (``neg_dst`` still covers the whole batch), which see the whole batch
        as context exactly as in the full gather."""
        if rows is not None:
            return self._gather_rows(batch, neg_dst, rows)
        b = len(batch)
        copies = 1 + (neg_dst.shape[1] if neg_dst.dim() == 2 else 1)
        visible = torch.arange(b, device=batch.t.device).repeat(copies)
        dst = torch.cat([batch.dst, neg_dst.t().reshape(-1)])  # negatives column by column
        src, t = batch.src.repeat(copies), batch.t.repeat(copies)
        inputs = self.engine.gather_pairs(src, dst, t, batch, visible)
        return GatheredBatch(batch, neg_dst, inputs)

    def _gather_rows(self, batch: EventBatch, neg_dst: torch.Tensor, rows: torch.Tensor) -> GatheredBatch:
        """``gather`` of the events ``rows`` only, with the whole batch's semantics: a node's
        embedding is computed once per batch, at its earliest query time, so each shard embeds a
        node when the whole batch would; and the memory folds that carry gradient are those of
        the whole batch's queries. Summed over shards, the loss and its gradient are then the
        whole batch's. (Not with ``batch_neighbors``, whose embeddings also depend on how many
        batch events each query sees.)"""
        if self.engine.config.batch_neighbors:
            raise ValueError("scoring a shard of a batch (data-parallel training) needs batch_neighbors off")
        copies = 1 + (neg_dst.shape[1] if neg_dst.dim() == 2 else 1)
        every_dst = torch.cat([batch.dst, neg_dst.t().reshape(-1)])
        every_nodes = torch.cat([batch.src.repeat(copies), every_dst])
        every_t = batch.t.repeat(2 * copies)
        uniq, inv = torch.unique(every_nodes, return_inverse=True)
        first = torch.full(uniq.shape, float("inf"), dtype=torch.float64, device=every_t.device)
        first = first.scatter_reduce(0, inv, every_t, reduce="amin")

        neg = neg_dst[rows]
        dst = torch.cat([batch.dst[rows], neg.t().reshape(-1)])
        src, t, vis = batch.src[rows].repeat(copies), batch.t[rows].repeat(copies), rows.repeat(copies)
        embed_t = first[torch.searchsorted(uniq, torch.cat([src, dst]))]
        inputs = self.engine.gather_pairs(src, dst, t, batch, vis, embed_t=embed_t)
        if inputs.embedding.grad_nodes is not None:
            every = torch.unique(every_nodes)
            inputs = replace(inputs, embedding=replace(inputs.embedding, grad_nodes=every))
        return GatheredBatch(batch, neg, inputs, rows=rows)

    def fetch(self, gathered: GatheredBatch, staleness: int = 0) -> GatheredBatch:
        """The node memory rows ``gathered`` needs, read from the state now."""
        rows = self.engine.fetch_memory(gathered.inputs.embedding.nodes)
        return replace(gathered, memory=rows, staleness=staleness)

    # ------------------------------------------------------------------------------- score
    def score(self, gathered: GatheredBatch) -> ScoredBatch:
        """The model forward: positive and negative logits (grad if enabled)."""
        if gathered.memory is None:
            gathered = self.fetch(gathered)
        logits, fresh = self.engine.pair_forward(gathered.inputs, gathered.memory)
        if gathered.logit_offset is not None:
            logits = logits + gathered.logit_offset
        b = len(gathered.batch) if gathered.rows is None else gathered.rows.numel()
        neg = logits[b:]
        if gathered.neg_dst.dim() == 2:
            neg = neg.view(-1, b).t()  # [B, N]
        return ScoredBatch(gathered.batch, logits[:b], neg, fresh)

    def score_batch(self, batch: EventBatch, neg_dst: torch.Tensor) -> ScoredBatch:
        """gather + fetch + score of the sequential step."""
        return self.score(self.fetch(self.gather(batch, neg_dst)))

    def rank(
        self,
        batch: EventBatch,
        candidates: torch.Tensor,
        pick: torch.Tensor | None = None,
        candidate_time: str = "query",
    ) -> torch.Tensor:
        """Ranking logits ``[P, Q]`` of the events ``pick [P]`` (default: all) of a not-yet-applied
        batch against ``candidates [Q]``, with the same state and visibility as ``score``
        (``candidate_time``: see ``MemoryEngine.candidate_times``)."""
        if pick is None:
            pick = torch.arange(len(batch), device=batch.t.device)
        return self.engine.rank_logits(
            batch.src[pick],
            batch.t[pick],
            candidates,
            context=batch,
            visible=pick,
            candidate_time=candidate_time,
        )

    def score_candidates(self, batch: EventBatch, candidates: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, Q]`` of each event's source against its own candidates ``[B, Q]``."""
        b, q = candidates.shape
        visible = torch.arange(b, device=batch.t.device).repeat_interleave(q)
        engine = self.engine
        inputs = engine.gather_pairs(
            batch.src.repeat_interleave(q), candidates.flatten(), batch.t.repeat_interleave(q), batch, visible
        )
        logits, _ = engine.pair_forward(inputs, engine.fetch_memory(inputs.embedding.nodes))
        return logits.view(b, q)

    # -------------------------------------------------------------------------------- loss
    def loss(self, scored: ScoredBatch) -> torch.Tensor:
        """BCE of positives against 1 and negatives against 0 (mean over all negatives); with
        ``ranking_weight``, plus that times the softmax cross-entropy of each positive among its
        negatives (a listwise objective: MRR is a ranking metric); with PRES, plus ``beta *``
        the memory-coherence term over the batch's memory updates (it carries gradient)."""
        pos, neg = scored.pos, scored.neg
        loss = F.binary_cross_entropy_with_logits(
            pos, torch.ones_like(pos)
        ) + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))
        if self.ranking_weight and len(pos):
            listed = torch.cat([pos.unsqueeze(1), neg.reshape(len(pos), -1)], 1)  # positive first
            target = torch.zeros(len(pos), dtype=torch.long, device=pos.device)
            loss = loss + self.ranking_weight * F.cross_entropy(listed, target)
        fresh = scored.fresh
        if self.engine.pres is not None and fresh.raw_memory is not None:
            loss = loss + self.coherence_weight * coherence_loss(fresh.raw_memory, fresh.prev_memory)
        return loss

    # ------------------------------------------------------------------------------- apply
    @torch.no_grad()
    def apply(
        self,
        scored: ScoredBatch | EventBatch,
        learn: bool = False,
        record: bool = True,
        in_order_only: bool = False,
    ) -> None:
        """Apply the scored batch to the state. An ``EventBatch`` (not scored: replaying a log
        without predictions) is applied with its nodes' memories folded from the state now,
        exactly what scoring it would have folded.

        learn: a training batch (PRES statistics learn from its persisted memory updates; never
        from evaluation). record: also insert the events into the neighbour table and pair
        history (a pipeline's producer has done that already). in_order_only: the memories were
        read before some earlier write-backs (see ``MemoryState.apply_memory``).
        """
        engine = self.engine
        batch = scored if isinstance(scored, EventBatch) else scored.batch
        if len(batch) == 0:
            return
        engine.ensure_capacity(int(torch.maximum(batch.src.max(), batch.dst.max())) + 1)
        if isinstance(scored, EventBatch):
            fresh = engine.fresh_memory(torch.unique(torch.cat([batch.src, batch.dst])))
        else:
            fresh = scored.fresh
        applied = engine.apply_memory(batch, fresh, in_order_only)
        if learn and engine.pres is not None:
            engine.pres.update(applied.nodes, applied.raw - applied.prev)
        if record:
            engine.record(batch)

    # Serving applies a batch and folds its messages at once (queries then never run the
    # updater), in two phases so that queries go on during the heavy one.
    @torch.no_grad()
    def prepare_live(self, batch: EventBatch) -> PreparedBatch:
        """Phase 1 of the serving apply (read-only: run it under a shared lock)."""
        return self.engine.prepare_events(batch)

    @torch.no_grad()
    def commit_live(self, prepared: PreparedBatch) -> None:
        """Phase 2 of the serving apply (writes: run it under the exclusive lock)."""
        self.engine.commit_events(prepared)
