"""PRES (Su, Zou, Wu, ICLR 2024): per-node statistics of memory transitions that predict a
node's next memory, fused with the memory the updater computes (docs/architecture.md §6, §10).

Deliberately not the released code (see the pitfalls there): statistics are a per-node running
mean and variance (Welford; the maximum-likelihood single Gaussian), touched only for nodes that
are updated, updated only from training batches, and never written into the memory table by a
normalisation side effect; the coherence loss carries gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tgnstream.core.buffers import ResizableBufferModule, grown

__all__ = ["TransitionStats", "pres_fuse", "coherence_loss"]


class TransitionStats(ResizableBufferModule):
    """Running statistics of each node's memory transitions ``delta = s_new - s_prev``.

    Buffers (N = capacity):
        count: ``[N]`` int64 transitions observed.
        mean: ``[N, d_mem]`` float32 their mean.
        m2: ``[N, d_mem]`` float32 sum of squared deviations (variance = m2 / count).
    """

    def __init__(self, capacity: int, memory_dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(capacity, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(capacity, memory_dim))
        self.register_buffer("m2", torch.zeros(capacity, memory_dim))

    @property
    def capacity(self) -> int:
        return int(self.count.shape[0])

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return
        for name in ("count", "mean", "m2"):
            setattr(self, name, grown(getattr(self, name), capacity))

    def reset(self) -> None:
        self.count.zero_()
        self.mean.zero_()
        self.m2.zero_()

    @torch.no_grad()
    def update(self, nodes: torch.Tensor, delta: torch.Tensor) -> None:
        """Add one observed transition ``delta [U, d]`` for each of ``nodes [U]`` (distinct)."""
        if nodes.numel() == 0:
            return
        n = self.count[nodes] + 1
        mean = self.mean[nodes]
        diff = delta - mean
        mean = mean + diff / n.unsqueeze(1).to(delta.dtype)
        self.m2[nodes] = self.m2[nodes] + diff * (delta - mean)
        self.mean[nodes] = mean
        self.count[nodes] = n

    def variance(self, nodes: torch.Tensor) -> torch.Tensor:
        """Per-dimension variance ``[U, d]`` (0 where fewer than one transition was seen)."""
        count = self.count[nodes].clamp(min=1).unsqueeze(1).to(self.m2.dtype)
        return self.m2[nodes] / count


def pres_fuse(
    raw: torch.Tensor, prev: torch.Tensor, mean: torch.Tensor, count: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """Corrected memories ``[P, d]``: ``gamma * (prev + mean) + (1 - gamma) * raw`` for nodes
    with at least one observed transition (``count [P]``), ``raw`` (the updater's output) for the
    others. ``prev``/``mean`` carry no gradient; ``raw`` does, scaled by ``1 - gamma``."""
    fused = gamma * (prev + mean) + (1 - gamma) * raw
    return torch.where((count > 0).unsqueeze(1), fused, raw)


def coherence_loss(raw: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Memory-coherence term ``mean(1 - cos(raw_i, prev_i))`` over nodes that had a memory
    before (``prev`` non-zero): keeps each update's direction close to the node's previous
    memory. Differentiable in ``raw`` (so it reaches the updater's parameters)."""
    had_memory = prev.abs().sum(1) > 0
    if not bool(had_memory.any()):
        return raw.sum() * 0.0
    cos = F.cosine_similarity(raw[had_memory], prev[had_memory], dim=1)
    return (1 - cos).mean()
