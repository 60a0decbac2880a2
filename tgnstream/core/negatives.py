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
    negatives: pages the user did edit, but not now); ``recent_ratio`` (set here) from the
    destinations of the batch's earlier events (hard negatives of another kind: nodes active a
    moment ago, which is what global-recency ranks first, but not this source's partner now);
    the rest is uniform over the pool. ``sampling_correction``: training adds
    ``log_sampling_ratio`` to its logits (see there).
    """

    def __init__(
        self,
        pool: torch.Tensor,
        seed: int = 0,
        device: torch.device | str = "cpu",
        recent_ratio: float = 0.0,
        sampling_correction: bool = False,
    ):
        if pool.numel() == 0:
            raise ValueError("negative pool is empty")
        if not 0.0 <= recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {recent_ratio}")
        self.recent_ratio = recent_ratio
        self.sampling_correction = sampling_correction
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

        ``exclude [B]`` (the positives, in the batch's time order) is never returned by the
        historical or the recent part, and the recent part draws event ``k``'s negatives from
        ``exclude[:k]``; a slot with no usable node falls back to a uniform draw. With one
        negative per event each event draws its kind (historical, recent, uniform) at random
        with those shares; with several, the first slots are historical, the next recent.
        """
        b = src.numel()
        out = self.uniform((b, num))
        recent_ratio = self.recent_ratio if exclude is not None else 0.0
        if historical_ratio + recent_ratio > 1.0 + 1e-9:
            raise ValueError(f"historical ({historical_ratio}) + recent ({recent_ratio}) shares exceed 1")
        if num == 1:
            kind = (
                torch.rand(b, generator=self.generator) if historical_ratio > 0 or recent_ratio > 0 else None
            )
            use_hist = None if kind is None else kind < historical_ratio
            use_recent = (
                None
                if kind is None
                else (kind >= historical_ratio) & (kind < historical_ratio + recent_ratio)
            )
            n_hist = 1 if historical_ratio > 0 else 0
            n_recent = 1 if recent_ratio > 0 else 0
            hist_cols = recent_cols = slice(0, 1)
        else:
            n_hist, n_recent = _slots(num, historical_ratio, recent_ratio)
            use_hist = use_recent = None
            hist_cols, recent_cols = slice(0, n_hist), slice(n_hist, n_hist + n_recent)
        if n_hist and neighbors is not None:
            k = neighbors.k
            pick = torch.randint(k, (b, n_hist), generator=self.generator).to(self.device)
            hist = neighbors.ids[src].gather(1, pick)
            ok = hist >= 0
            if use_hist is not None:
                ok &= use_hist.to(self.device).unsqueeze(1)
            if exclude is not None:
                ok &= hist != exclude.unsqueeze(1)
            out[:, hist_cols] = torch.where(ok, hist, out[:, hist_cols])
        if n_recent:
            # Event k draws among events 0..k-1 of its batch (event 0 has none: uniform).
            position = torch.arange(b).unsqueeze(1)
            earlier = (torch.rand((b, n_recent), generator=self.generator) * position).long()
            recent = exclude[earlier.to(self.device)]
            ok = (position > 0).to(self.device) & (recent != exclude.unsqueeze(1))
            if use_recent is not None:
                ok &= use_recent.to(self.device).unsqueeze(1)
            out[:, recent_cols] = torch.where(ok, recent, out[:, recent_cols])
        return out.squeeze(1) if num == 1 else out

    def log_sampling_ratio(
        self,
        src: torch.Tensor,
        candidates: torch.Tensor,
        num: int,
        historical_ratio: float,
        neighbors: RecentNeighbors | None,
        batch_dst: torch.Tensor,
    ) -> torch.Tensor:
        """``log(q(x | u, k) / p(x))`` for ``candidates [B, C]`` of events ``k`` with sources
        ``src [B]``: ``q`` the distribution ``sample`` draws negatives from (with ``num`` per
        event and these shares; the neighbour table as it is now, before the batch), ``p``
        uniform over the pool (what a ranking compares against).

        Pointwise BCE against negatives from ``q`` learns the logit ``log(p_data / q)``: a pair
        that ``q`` over-samples (a source's past partner, a node active a moment ago) is pushed
        down by ``log(q / p)``, far below where it belongs when ranking the whole pool.
        Subtracting this from the training logits (the logQ correction of sampled softmax) makes
        the model itself learn ``log(p_data / p)``. Draws that fall back to a uniform draw count
        as uniform; the positive's exclusion is ignored (a small bias)."""
        b = src.numel()
        size = float(self.pool.numel())
        if num == 1:
            h, r = historical_ratio, self.recent_ratio
        else:
            n_hist, n_recent = _slots(num, historical_ratio, self.recent_ratio)
            h, r = n_hist / num, n_recent / num
        uniform = torch.full((b, 1), 1.0 - h - r, dtype=torch.float64, device=self.device)
        mass = torch.zeros(candidates.shape, dtype=torch.float64, device=self.device)
        if h > 0 and neighbors is not None:
            table = neighbors.ids[src]  # [B, K]
            k = table.shape[1]
            hits = (candidates.unsqueeze(-1) == table.unsqueeze(1)) & (table.unsqueeze(1) >= 0)
            mass += size * h * hits.sum(-1).double() / k
            uniform += h * (table < 0).sum(1, keepdim=True).double() / k
        elif h > 0:
            uniform += h
        if r > 0:
            position = torch.arange(b, device=self.device)
            earlier = position.unsqueeze(0) < position.unsqueeze(1)  # [k, j]: j before k
            hits = (candidates.unsqueeze(-1) == batch_dst.view(1, 1, -1)) & earlier.unsqueeze(1)
            mass += size * r * hits.sum(-1).double() / position.clamp(min=1).unsqueeze(1).double()
            uniform[0] += r  # event 0 has no earlier event: its recent draw is uniform
        return torch.log(uniform + mass).float()


def _slots(num: int, historical_ratio: float, recent_ratio: float) -> tuple[int, int]:
    """Historical and recent slots among ``num > 1`` negatives per event (the rest uniform)."""
    n_hist = int(round(num * historical_ratio))
    return n_hist, min(int(round(num * recent_ratio)), num - n_hist)
