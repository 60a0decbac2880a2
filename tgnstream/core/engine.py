"""MemoryEngine: the pure TGN engine (state + model, tensors in, tensors out, one device).

Two halves with one public surface each: ``MemoryState`` (``tgnstream.core.state``: buffers,
capacity, apply/record/commit) and ``MemoryForward`` (``tgnstream.core.forward``: gather, fold,
forward). This class composes them with the weights (``model``) and adds the serving queries
(``score``, ``embed``, ``rank_logits``, ``top_k``), each a composition of the same pieces the
step uses.

Step order, shared by trainer and server (TGN "memory update at batch start"), as code in
``tgnstream.core.step``:

1. **score** the batch with the current state. A node's pending message (from its previous
   events) is folded into its memory on the fly, with gradient when training.
2. **loss** (training only).
3. **apply** the batch: persist the folded memories of the batch's nodes, store the batch's
   events as their new pending messages, insert them in the neighbour table and edge history.
4. the persisted state is detached (the apply runs without grad).

Every prediction within a batch sees the same state, so no event can see itself or a later
event (no leakage); the same batch boundaries give the same state online and offline.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tgnstream.core.config import ModelConfig
from tgnstream.core.events import EventBatch
from tgnstream.core.forward import MemoryForward
from tgnstream.core.inputs import FreshMemory
from tgnstream.core.model import TGNModel
from tgnstream.core.state import AppliedMemory, MemoryState, PreparedBatch

__all__ = ["MemoryEngine", "FreshMemory", "PreparedBatch", "AppliedMemory"]


class MemoryEngine(MemoryForward, MemoryState):
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
        nn.Module.__init__(self)
        self.model = TGNModel(config)  # registered first: the state_dict's key order is as before
        self.init_state(config, capacity)
        self.to(device)

    @torch.no_grad()
    def copy_learned_from(self, other: MemoryEngine) -> None:
        """Take ``other``'s weights and PRES statistics (what training learns); node state stays."""
        self.model.load_state_dict(other.model.state_dict())
        if other.pres is not None:
            self.pres = copy.deepcopy(other.pres).to(self.device)
            self._align_capacity()

    @torch.no_grad()
    def fold_pending(self) -> int:
        """Fold every pending message into its node's memory now; returns how many were folded.

        Scores are unchanged: a fold is a pure function of (memory, message, times), and the
        message is consumed exactly once either way. A server calls this after each applied batch
        so that queries read memories directly instead of running the updater per request.
        """
        ids = self.pending_nodes()
        if ids.numel() == 0:
            return 0
        self.commit_folds(self.fresh_memory(ids))
        return int(ids.numel())

    # ------------------------------------------------------------------------------ queries
    @torch.no_grad()
    def score(
        self, src: torch.Tensor, dst: torch.Tensor, t: torch.Tensor, context: EventBatch | None = None
    ) -> torch.Tensor:
        """Link probabilities ``[B]`` for ``src [B], dst [B]`` at times ``t [B]`` (float64): the
        step's gather, fetch and score. ``context``: a not-yet-applied batch every query sees
        whole (serving's open batch)."""
        inputs = self.gather_pairs(src, dst, t, context, _sees_all(context, src.numel()))
        logits, _ = self.pair_forward(inputs, self.fetch_memory(inputs.embedding.nodes))
        return torch.sigmoid(logits)

    @torch.no_grad()
    def embed(self, nodes: torch.Tensor, t: torch.Tensor, context: EventBatch | None = None) -> torch.Tensor:
        """Node embeddings ``[M, d_emb]`` at times ``t [M]`` (``context`` as in ``score``)."""
        self.check_ids(nodes)
        return self.embed_with(nodes, t, context, _sees_all(context, nodes.numel()))[0]

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
        ``context``/``visible`` as in ``gather_pairs``). Decoded by ``rank_forward``, the one
        ranker (the server's TopK uses it too)."""
        self.check_ids(src, candidates)
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
        stats = self.gather_ranking(src, candidates, context, visible)
        return self.rank_forward(z[: src.numel()], z[src.numel() :], stats, t)

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


def _sees_all(context: EventBatch | None, n: int) -> torch.Tensor | None:
    """``visible`` for ``n`` queries that all come after every event of ``context``."""
    if context is None or not len(context):
        return None
    return torch.full((n,), len(context), dtype=torch.long, device=context.src.device)
