"""Per-node ring buffer of the K most recent temporal neighbours, as device tensors."""

from __future__ import annotations

import torch

from tgnstream.core.buffers import ResizableBufferModule, grown

__all__ = ["RecentNeighbors", "group_ranks"]


def group_ranks(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank of each element within its group of equal keys, in original (time) order.

    Returns ``(order, rank_in_group, group_size)`` where ``order`` sorts ``keys`` stably and the
    other two are aligned with ``keys[order]``.
    """
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    n = keys.numel()
    is_start = torch.ones(n, dtype=torch.bool, device=keys.device)
    if n > 1:
        is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    idx = torch.arange(n, device=keys.device)
    start_idx = torch.cummax(torch.where(is_start, idx, torch.zeros_like(idx)), 0).values
    rank = idx - start_idx
    _, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    group_size = torch.repeat_interleave(counts, counts)
    return order, rank, group_size


class RecentNeighbors(ResizableBufferModule):
    """Fixed-width table of each node's K most recent interactions (both directions).

    Buffers (N = capacity):
        ids: ``[N, K]`` int64 neighbour ids, -1 for empty slots.
        ts: ``[N, K]`` float64 interaction times.
        feats: ``[N, K, d_edge]`` float32 edge features.
        count: ``[N]`` int64 interactions ever inserted per node (ring-buffer write pointer).

    Slots are a ring buffer, so rows are not time-sorted; readers treat them as a set.
    """

    def __init__(self, capacity: int, k: int, edge_dim: int, device: torch.device | str = "cpu"):
        super().__init__()
        if k < 1:
            raise ValueError(f"neighbour table width must be >= 1, got {k}")
        self.k = k
        self.edge_dim = edge_dim
        self.register_buffer("ids", torch.full((capacity, k), -1, dtype=torch.long, device=device))
        self.register_buffer("ts", torch.zeros(capacity, k, dtype=torch.float64, device=device))
        self.register_buffer("feats", torch.zeros(capacity, k, edge_dim, dtype=torch.float32, device=device))
        self.register_buffer("count", torch.zeros(capacity, dtype=torch.long, device=device))

    @property
    def capacity(self) -> int:
        return int(self.ids.shape[0])

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return
        self.ids = grown(self.ids, capacity, -1)
        self.ts = grown(self.ts, capacity)
        self.feats = grown(self.feats, capacity)
        self.count = grown(self.count, capacity)

    def reset(self) -> None:
        self.ids.fill_(-1)
        self.ts.zero_()
        self.feats.zero_()
        self.count.zero_()

    @torch.no_grad()
    def insert(self, src: torch.Tensor, dst: torch.Tensor, t: torch.Tensor, feats: torch.Tensor) -> None:
        """Record a time-ordered batch of events ``[B]`` in both endpoints' rows."""
        owner = torch.cat([src, dst])
        other = torch.cat([dst, src])
        when = torch.cat([t, t])
        ef = torch.cat([feats, feats])
        # Interleave so that, per owner, entries keep event order (src role and dst role of
        # event i come before those of event i+1).
        n = src.numel()
        perm = torch.stack(
            [torch.arange(n, device=src.device), torch.arange(n, device=src.device) + n], 1
        ).flatten()
        owner, other, when, ef = owner[perm], other[perm], when[perm], ef[perm]

        order, rank, size = group_ranks(owner)
        owner_s = owner[order]
        # Only the last K entries of a node in this batch can survive; dropping the rest keeps
        # the scatter free of duplicate slots (whose write order would be undefined).
        keep = rank >= size - self.k
        order, rank, owner_s = order[keep], rank[keep], owner_s[keep]
        slot = (self.count[owner_s] + rank) % self.k
        self.ids[owner_s, slot] = other[order]
        self.ts[owner_s, slot] = when[order]
        if self.edge_dim:
            self.feats[owner_s, slot] = ef[order]
        self.count.index_add_(0, owner, torch.ones_like(owner))

    def latest(self, nodes: torch.Tensor) -> torch.Tensor:
        """Time of each node's newest interaction ``[*]`` for ``nodes [*]`` (-inf: none yet)."""
        return self.ts[nodes].masked_fill(self.ids[nodes] < 0, float("-inf")).amax(-1)

    def gather(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Neighbours of ``nodes [M]``: ids, ts, mask ``[M, K]`` and feats ``[M, K, d]``."""
        ids = self.ids[nodes]
        return ids, self.ts[nodes], self.feats[nodes], ids >= 0
