"""Negative destination samplers for training and evaluation."""

from __future__ import annotations

import torch

from tgnstream.core.neighbors import RecentNeighbors

__all__ = ["NegativeSampler"]


class NegativeSampler:
    """Draws negative destinations, uniformly from a pool and optionally from history.

    Args:
        pool: ``[D]`` candidate destination ids (the destination side in bipartite graphs).
        seed: seed of the sampler's own generator, so negatives do not depend on model RNG.
        device: where returned ids live.

    ``historical_ratio`` of each draw comes from the source's K most recent neighbours (hard
    negatives: pages the user did edit, but not now); the rest is uniform over the pool.
    """

    def __init__(self, pool: torch.Tensor, seed: int = 0, device: torch.device | str = "cpu"):
        if pool.numel() == 0:
            raise ValueError("negative pool is empty")
        self.pool = pool.to(device)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.device = torch.device(device)

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        idx = torch.randint(self.pool.numel(), shape, generator=self.generator)
        return self.pool[idx.to(self.device)]

    def sample(
        self,
        src: torch.Tensor,
        num: int = 1,
        historical_ratio: float = 0.0,
        neighbors: RecentNeighbors | None = None,
        exclude: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B]`` negatives when ``num == 1`` else ``[B, num]``.

        ``exclude [B]`` (the positives) is never returned by the historical part; a historical
        slot with no usable neighbour falls back to a uniform draw.
        """
        b = src.numel()
        out = self.uniform((b, num))
        n_hist = int(round(num * historical_ratio)) if num > 1 else 0
        if num == 1 and historical_ratio > 0:
            use = torch.rand(b, generator=self.generator) < historical_ratio
            n_hist = 1
        else:
            use = torch.ones(b, dtype=torch.bool)
        if n_hist and neighbors is not None:
            k = neighbors.k
            pick = torch.randint(k, (b, n_hist), generator=self.generator).to(self.device)
            hist = neighbors.ids[src].gather(1, pick)
            ok = (hist >= 0) & use.to(self.device).unsqueeze(1)
            if exclude is not None:
                ok &= hist != exclude.unsqueeze(1)
            out[:, :n_hist] = torch.where(ok, hist, out[:, :n_hist])
        return out.squeeze(1) if num == 1 else out
