"""What a model forward reads from the engine's state, gathered ahead of the forward.

Gathering is split in two because the two halves go stale differently:
- ``EmbeddingInputs`` / ``PairInputs`` (structure: neighbour rows, pair statistics, which nodes'
  memories are needed) depend only on the events applied so far, never on the weights;
- ``MemoryRows`` (node memory, mailbox, PRES statistics) is written back by every training
  step, so a pipeline fetches it as late as it can.
Each is a set of copies: once gathered, the state may move on without changing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MemoryRows", "EmbeddingInputs", "PairInputs", "FreshMemory"]


@dataclass(frozen=True)
class MemoryRows:
    """Node state rows of a sorted set of nodes, copied out of the engine.

    nodes: ``[U]`` sorted unique ids; memory: ``[U, d_mem]``; last_update: ``[U]`` float64;
    pending: ``[P]`` row indices of the nodes with a pending message; mail: ``[P, d_mail]`` and
    mail_ts: ``[P]`` float64 those messages; pres_mean: ``[P, d_mem]`` and pres_count: ``[P]``
    the PRES transition statistics of those nodes (None without PRES).
    """

    nodes: torch.Tensor
    memory: torch.Tensor
    last_update: torch.Tensor
    pending: torch.Tensor
    mail: torch.Tensor
    mail_ts: torch.Tensor
    pres_mean: torch.Tensor | None
    pres_count: torch.Tensor | None


@dataclass
class FreshMemory:
    """Memories of a sorted set of nodes with their pending messages folded in.

    nodes: ``[U]`` sorted unique ids; memory: ``[U, d_mem]`` (may carry grad); last_update:
    ``[U]`` float64. For the folded rows (``folded [P]`` row indices): ``prev_memory [P, d_mem]``
    the memory before the fold, ``raw_memory [P, d_mem]`` the updater's output before the PRES
    correction (``memory[folded]`` is the corrected one; the same tensor without PRES), and
    ``consumed_ts [P]`` the times of the messages folded.
    """

    nodes: torch.Tensor
    memory: torch.Tensor
    last_update: torch.Tensor
    folded: torch.Tensor | None = None
    prev_memory: torch.Tensor | None = None
    raw_memory: torch.Tensor | None = None
    consumed_ts: torch.Tensor | None = None

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.nodes, ids)


@dataclass(frozen=True)
class EmbeddingInputs:
    """Structure needed to embed ``M`` queried nodes (``Q`` distinct) at their query times.

    inv: ``[M]`` query -> distinct node; query_nodes: ``[Q]`` sorted; t_query: ``[Q]`` float64
    each distinct node's (earliest) query time; nodes: ``[U]`` sorted nodes whose memory is read
    (queries and their neighbours); q_idx: ``[Q]`` rows of the queries in ``nodes``. Attention
    only (else None): nb_idx ``[Q, K]`` rows of the neighbours, nb_dt ``[Q, K]`` time since each
    interaction, nb_feats ``[Q, K, d_edge]``, mask ``[Q, K]`` valid slots. grad_nodes: nodes
    whose memory fold keeps autograd (None: all).
    """

    inv: torch.Tensor
    query_nodes: torch.Tensor
    t_query: torch.Tensor
    nodes: torch.Tensor
    q_idx: torch.Tensor
    nb_idx: torch.Tensor | None = None
    nb_dt: torch.Tensor | None = None
    nb_feats: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    grad_nodes: torch.Tensor | None = None


@dataclass(frozen=True)
class PairInputs:
    """Structure needed to score ``B`` pairs: the embedding inputs of ``[src; dst]`` (``2B``
    queries) and the encoded pair features ``[B, F]`` (None without pair features)."""

    embedding: EmbeddingInputs
    num_pairs: int
    pair: torch.Tensor | None
