"""Seeded synthetic interaction streams for scale benchmarks, and a dense-array dataset builder.

The generator mimics the traits that make real temporal graphs hard for memory-based TGNs:
heavy-tailed source activity, bursts of repeated (source, destination) pairs, a heavy-tailed
destination popularity that may drift over time, and exponential inter-event gaps.
"""

from __future__ import annotations

import numpy as np
import torch

from tgnstream.core.events import EventBatch, TemporalDataset

__all__ = ["dataset_from_arrays", "generate_stream"]

# How many recent destinations each source remembers for re-interactions.
_HISTORY = 8
# Chunks start small so that even short streams get repeats (a chunk only sees the
# history left by earlier chunks), then grow so that long streams stay vectorised.
_FIRST_CHUNK = 256
_MAX_CHUNK = 1 << 16


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def dataset_from_arrays(
    src,
    dst,
    t,
    feats=None,
    labels=None,
    *,
    name: str = "dataset",
    num_nodes: int | None = None,
    raw_ids: list[str] | None = None,
) -> TemporalDataset:
    """Build a :class:`TemporalDataset` from dense, time-ordered arrays (numpy or torch).

    Args:
        src: ``[E]`` integer source ids in ``[0, num_nodes)``.
        dst: ``[E]`` integer destination ids in ``[0, num_nodes)``.
        t: ``[E]`` finite, non-decreasing event times.
        feats: ``[E, d]`` edge features, or None for ``d = 0``.
        labels: ``[E]`` integer labels, or None for all zeros.
        name: dataset name for reports.
        num_nodes: node count; defaults to ``len(raw_ids)`` if given, else ``max id + 1``.
            Pass it when some ids never occur in the stream (isolated nodes).
        raw_ids: original id per dense index, kept for mapping results back.

    Returns:
        A dataset with ``src``/``dst``/``labels`` int64, ``t`` float64, ``feats`` float32,
        ``dst_nodes`` the sorted unique destinations and ``bipartite`` True when no id is
        both a source and a destination.

    Raises:
        ValueError: on mismatched lengths, negative or out-of-range ids, non-integer ids,
            non-finite or decreasing times.
    """
    src_np, dst_np = _as_numpy(src), _as_numpy(dst)
    t_np = _as_numpy(t).astype(np.float64, copy=False)
    n = src_np.shape[0]
    if src_np.ndim != 1 or dst_np.shape != (n,) or t_np.shape != (n,):
        raise ValueError(
            f"src, dst, t must be 1-D of equal length; got {src_np.shape}, {dst_np.shape}, {t_np.shape}"
        )
    for label, ids in (("src", src_np), ("dst", dst_np)):
        if n and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{label} must be integer ids, got dtype {ids.dtype}")
    src_np = src_np.astype(np.int64, copy=False)
    dst_np = dst_np.astype(np.int64, copy=False)

    if n and not np.isfinite(t_np).all():
        raise ValueError(f"t has a non-finite value at index {int(np.argmin(np.isfinite(t_np)))}")
    if n > 1:
        back = np.diff(t_np) < 0
        if back.any():
            i = int(np.argmax(back)) + 1
            raise ValueError(f"t decreases at index {i}: {t_np[i - 1]} -> {t_np[i]}")

    max_id = int(max(src_np.max(), dst_np.max())) if n else -1
    min_id = int(min(src_np.min(), dst_np.min())) if n else 0
    if min_id < 0:
        raise ValueError(f"ids must be non-negative, found {min_id}")
    if num_nodes is None:
        num_nodes = len(raw_ids) if raw_ids is not None else max_id + 1
    if raw_ids is not None and len(raw_ids) != num_nodes:
        raise ValueError(f"raw_ids has {len(raw_ids)} entries but num_nodes is {num_nodes}")
    if max_id >= num_nodes:
        raise ValueError(f"id {max_id} out of range for num_nodes={num_nodes}")

    if feats is None:
        feats_np = np.zeros((n, 0), dtype=np.float32)
    else:
        feats_np = _as_numpy(feats).astype(np.float32, copy=False)
        if feats_np.ndim != 2 or feats_np.shape[0] != n:
            raise ValueError(f"feats must be [{n}, d], got {feats_np.shape}")
    if labels is None:
        labels_np = np.zeros(n, dtype=np.int64)
    else:
        labels_np = _as_numpy(labels).astype(np.int64, copy=False)
        if labels_np.shape != (n,):
            raise ValueError(f"labels must be [{n}], got {labels_np.shape}")

    # Boolean masks over the id range are O(E + N), cheaper than set intersections at 10M events.
    is_src = np.zeros(num_nodes, dtype=bool)
    is_dst = np.zeros(num_nodes, dtype=bool)
    is_src[src_np] = True
    is_dst[dst_np] = True

    events = EventBatch(
        torch.from_numpy(np.ascontiguousarray(src_np)),
        torch.from_numpy(np.ascontiguousarray(dst_np)),
        torch.from_numpy(np.ascontiguousarray(t_np)),
        torch.from_numpy(np.ascontiguousarray(feats_np)),
    )
    return TemporalDataset(
        events=events,
        labels=torch.from_numpy(np.ascontiguousarray(labels_np)),
        num_nodes=int(num_nodes),
        dst_nodes=torch.from_numpy(np.flatnonzero(is_dst).astype(np.int64)),
        bipartite=not bool((is_src & is_dst).any()),
        name=name,
        raw_ids=raw_ids,
    )


def _power_law_cdf(n: int, exponent: float) -> np.ndarray:
    """``[n]`` CDF of Zipf-like weights ``1 / rank**exponent`` (rank 1 first)."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(w)
    return cdf / cdf[-1]


def _sample(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    # Clip guards against u landing past a CDF whose last entry rounds below 1.
    return np.minimum(np.searchsorted(cdf, u, side="right"), cdf.shape[0] - 1)


def _update_history(history: np.ndarray, filled: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    """Push one chunk's destinations, in event order, onto each source's recent list (in place).

    ``history[s, 0]`` is the most recent destination of ``s``; ``filled[s]`` counts valid slots.
    """
    k = history.shape[1]
    order = np.argsort(src, kind="stable")
    s_sorted, d_sorted = src[order], dst[order]
    uniq, start, counts = np.unique(s_sorted, return_index=True, return_counts=True)
    group = np.repeat(np.arange(uniq.shape[0]), counts)
    age = counts[group] - 1 - (np.arange(s_sorted.shape[0]) - start[group])  # 0 = latest
    keep = age < k
    recent = np.full((uniq.shape[0], k), -1, dtype=history.dtype)
    recent[group[keep], age[keep]] = d_sorted[keep]
    taken = np.minimum(counts, k)
    # Older entries slide right by the number of new ones; the oldest fall off the end.
    cols = np.arange(k)[None, :] - taken[:, None]
    older = np.take_along_axis(history[uniq], np.clip(cols, 0, k - 1), axis=1)
    history[uniq] = np.where(cols < 0, recent, older)
    filled[uniq] = np.minimum(filled[uniq] + counts, k)


def generate_stream(
    num_events: int,
    *,
    num_src: int = 1000,
    num_dst: int = 500,
    bipartite: bool = True,
    activity_exponent: float = 1.5,
    repeat_prob: float = 0.6,
    drift: float = 0.0,
    edge_dim: int = 0,
    seed: int = 0,
    start_time: float = 0.0,
    mean_gap: float = 1.0,
) -> TemporalDataset:
    """Generate a seeded synthetic interaction stream.

    Model, per event:

    * the source is drawn with Zipf-like weights ``rank ** -activity_exponent`` over a random
      permutation of the sources (so hubs are not simply the low ids);
    * with probability ``repeat_prob`` (and if the source has history) the destination is one
      of the source's last 8 destinations: the ``j``-th most recent (``j = 0, 1, ...``) with
      probability ``2 ** -(j + 1)``, the leftover mass on the oldest one remembered;
    * otherwise the destination is drawn by popularity, Zipf-like with the same exponent; with
      ``drift > 0`` the popularity ranking rotates by ``drift * num_dst`` positions over the
      whole stream (``drift = 1``: each destination's rank moves through every position once);
    * gaps between consecutive events are exponential with mean ``mean_gap``.

    Node ids: bipartite mode uses sources ``[0, num_src)`` and destinations
    ``[num_src, num_src + num_dst)``; non-bipartite mode uses one node set ``[0, num_src)`` for
    both roles (``num_dst`` is ignored) and replaces self loops by a uniform other node.

    Approximation: events are generated in chunks (256 events, doubling up to 65,536), and a
    chunk's repeats only see the history left by earlier chunks, so a source that is active
    several times within one chunk re-uses slightly stale history. The repeat rate itself is
    unaffected except for sources without any history yet, which fall back to popularity.

    Same arguments (including ``seed``) give identical output. With ``drift == 0`` the stream
    of ``n`` events is exactly the first ``n`` events of any longer stream with the same
    arguments.

    Args:
        num_events: number of events ``E`` (>= 0).
        edge_dim: width ``d`` of i.i.d. standard-normal float32 edge features.

    Returns:
        A :class:`TemporalDataset` with ``src``/``dst`` ``[E]`` int64, ``t`` ``[E]`` float64
        non-decreasing with the first at ``start_time``, ``feats`` ``[E, d]`` float32,
        ``labels`` ``[E]`` zeros, and ``num_nodes`` ``num_src + num_dst`` (bipartite) or ``num_src``.
    """
    if num_events < 0:
        raise ValueError(f"num_events must be >= 0, got {num_events}")
    if num_src < 1 or (bipartite and num_dst < 1) or (not bipartite and num_src < 2):
        raise ValueError(
            f"need num_src >= 1 and num_dst >= 1 (bipartite) or num_src >= 2 (non-bipartite); "
            f"got num_src={num_src}, num_dst={num_dst}, bipartite={bipartite}"
        )
    if not 0.0 <= repeat_prob <= 1.0:
        raise ValueError(f"repeat_prob must be in [0, 1], got {repeat_prob}")
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"drift must be in [0, 1], got {drift}")
    if activity_exponent < 0 or mean_gap < 0 or edge_dim < 0:
        raise ValueError("activity_exponent, mean_gap and edge_dim must be non-negative")

    rng = np.random.default_rng(seed)
    n_pop = num_dst if bipartite else num_src
    dst_offset = num_src if bipartite else 0
    src_perm = rng.permutation(num_src)
    dst_perm = rng.permutation(n_pop) + dst_offset
    src_cdf = _power_law_cdf(num_src, activity_exponent)
    dst_cdf = _power_law_cdf(n_pop, activity_exponent)

    history = np.full((num_src, _HISTORY), -1, dtype=np.int64)
    filled = np.zeros(num_src, dtype=np.int64)
    src_out = np.empty(num_events, dtype=np.int64)
    dst_out = np.empty(num_events, dtype=np.int64)
    t_out = np.empty(num_events, dtype=np.float64)
    feats_out = np.empty((num_events, edge_dim), dtype=np.float32)

    pos, chunk, now = 0, _FIRST_CHUNK, float(start_time)
    while pos < num_events:
        # Chunks are always drawn whole and then truncated, which keeps streams prefix-stable.
        end = min(pos + chunk, num_events)
        keep = end - pos
        src = src_perm[_sample(src_cdf, rng.random(chunk))]

        rank = _sample(dst_cdf, rng.random(chunk))
        if drift > 0:
            progress = (pos + np.arange(chunk)) / num_events
            rank = (rank + np.floor(drift * progress * n_pop).astype(np.int64)) % n_pop
        dst = dst_perm[rank]

        have = filled[src]
        repeat = (rng.random(chunk) < repeat_prob) & (have > 0)
        slot = np.minimum(rng.geometric(0.5, size=chunk) - 1, np.maximum(have - 1, 0))
        dst = np.where(repeat, history[src, slot], dst)

        if not bipartite:
            loop = dst == src
            other = (src + 1 + rng.integers(0, num_src - 1, size=chunk)) % num_src
            dst = np.where(loop, other, dst)

        # The first event sits at start_time; offsets come from one cumsum so that times
        # stay non-decreasing under rounding, also across chunk boundaries.
        offsets = np.cumsum(rng.exponential(mean_gap, size=chunk))
        t = now + np.concatenate(([0.0], offsets[:-1]))
        feats = rng.standard_normal((chunk, edge_dim), dtype=np.float32)

        src_out[pos:end], dst_out[pos:end], t_out[pos:end] = src[:keep], dst[:keep], t[:keep]
        feats_out[pos:end] = feats[:keep]
        _update_history(history, filled, src[:keep], dst[:keep])
        now = now + float(offsets[keep - 1])
        pos, chunk = end, min(chunk * 2, _MAX_CHUNK)

    return dataset_from_arrays(
        src_out,
        dst_out,
        t_out,
        feats_out,
        name=f"synthetic-{num_events}-seed{seed}",
        num_nodes=num_src + num_dst if bipartite else num_src,
    )
