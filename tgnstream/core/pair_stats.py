"""Exact causal pair statistics: history tables plus earlier events of the batch being scored.

Memory is batch-granular (every prediction in a batch sees the same memory, which is what makes
training parallel). Pair statistics need no gradient, so they are exact per event instead: a
query at batch position ``k`` also counts the batch's events ``0..k-1``. A query never sees its
own event or a later one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from tgnstream.core.batch_index import KeyedBatch
from tgnstream.core.edge_history import EdgeHistory, pair_keys
from tgnstream.core.events import EventBatch
from tgnstream.core.neighbors import RecentNeighbors

__all__ = ["PairStats", "pairwise_stats", "ranking_stats"]

_NEG_INF = float("-inf")


@dataclass
class PairStats:
    """Raw statistics of pairs (shape ``[*]``; float64 times, -inf = never).

    count: past u-v events; last: time of the last u-v event; latest_u / latest_v: time of the
    endpoint's latest interaction with anyone; common: common recent neighbours (tables only);
    count_u / count_v: the endpoint's past events with anyone (either role).
    """

    count: torch.Tensor
    last: torch.Tensor
    latest_u: torch.Tensor
    latest_v: torch.Tensor
    common: torch.Tensor
    count_u: torch.Tensor
    count_v: torch.Tensor

    def rows(self, start: int, stop: int) -> PairStats:
        """Rows ``start:stop`` of ``[P, Q]`` statistics (views)."""
        return PairStats(*(getattr(self, f.name)[start:stop] for f in fields(self)))


def _latest(nb_ids: torch.Tensor, nb_ts: torch.Tensor) -> torch.Tensor:
    """Newest time in each row of neighbour-table rows ``[*, K]`` (-inf for an empty row)."""
    return torch.where(nb_ids >= 0, nb_ts, torch.full_like(nb_ts, _NEG_INF)).amax(-1)


# Above this many [*, K, K] comparison cells the loop below is used instead (bounded memory).
_COMMON_DENSE_CELLS = 1 << 22


def _common(nb_u: torch.Tensor, nb_v: torch.Tensor) -> torch.Tensor:
    """Common neighbours of the rows of the neighbour-id tables ``nb_u [*u, K]``, ``nb_v [*v, K]``
    (broadcast over ``*u`` and ``*v``; -1 = empty slot)."""
    k = nb_u.shape[-1]
    shape = torch.broadcast_shapes(nb_u.shape[:-1], nb_v.shape[:-1])
    if shape.numel() * k * k <= _COMMON_DENSE_CELLS:
        # Small queries (serving, training batches): one broadcast compare instead of K passes.
        hit = (nb_u.unsqueeze(-1) == nb_v.unsqueeze(-2)).any(-1) & (nb_u >= 0)
        return hit.long().sum(-1).expand(shape)
    common = None
    for i in range(nb_u.shape[-1]):  # K is small: avoids a [*, K, K] intermediate
        col = nb_u[..., i : i + 1]
        hit = ((nb_v == col).any(-1) & (col[..., 0] >= 0)).long()
        common = hit if common is None else common + hit
    return common


def _history(history: EdgeHistory, u: torch.Tensor, v: torch.Tensor):
    count, last = history.lookup(*torch.broadcast_tensors(u, v))
    return count, torch.nan_to_num(last, nan=_NEG_INF)


def _latest_before(
    index: KeyedBatch, sorted_times: torch.Tensor, q_keys: torch.Tensor, q_visible: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: how many batch entries share its key among events ``< q_visible``, and the time
    of the newest of them (-inf if none). ``sorted_times``: entry times in ``index.order``; the
    batch is in time order, so the newest is the last."""
    start, count = index.lookup(q_keys, q_visible)
    newest = sorted_times[(start + count - 1).clamp(min=0)]
    return count, torch.where(count > 0, newest, torch.full_like(newest, _NEG_INF))


def _pair_index(context: EventBatch) -> tuple[KeyedBatch, torch.Tensor]:
    """The context's events keyed by pair, and their times in index order (built once)."""

    def build():
        index = KeyedBatch(pair_keys(context.src, context.dst), context.src.numel())
        return index, context.t[index.order]

    return context.derived("pair_index", build)


def _endpoint_index(context: EventBatch) -> tuple[KeyedBatch, torch.Tensor]:
    """The context's events keyed by each endpoint, and their times in index order (built once)."""

    def build():
        index = KeyedBatch(torch.cat([context.src, context.dst]), context.src.numel())
        return index, context.t.repeat(2)[index.order]

    return context.derived("endpoint_index", build)


def pairwise_stats(
    history: EdgeHistory,
    neighbors: RecentNeighbors,
    u: torch.Tensor,
    v: torch.Tensor,
    context: EventBatch | None = None,
    visible: torch.Tensor | None = None,
) -> PairStats:
    """Stats of pairs ``u[i], v[i]`` (``[N]``). Query ``i`` also sees ``context`` events with
    index ``< visible[i]`` (``context`` in time order, as every ``EventBatch`` is)."""
    count, last = _history(history, u, v)
    # One gather for both endpoints' rows (tiny serving queries pay per op, not per element).
    n = u.numel()
    uv = torch.cat([u, v])
    nb = neighbors.ids[uv]  # [2N, K]
    latest = _latest(nb, neighbors.ts[uv])
    activity = neighbors.count[uv]
    common = _common(nb[:n], nb[n:])
    if context is not None and len(context):
        in_pair, pair_last = _latest_before(*_pair_index(context), pair_keys(u, v), visible)
        count = count + in_pair
        last = torch.maximum(last, pair_last)
        # Both endpoints' in-batch interactions in one search: [u; v] against [src; dst].
        touches, touch = _latest_before(*_endpoint_index(context), uv, visible.repeat(2))
        latest = torch.maximum(latest, touch)
        activity = activity + touches
    return PairStats(count, last, latest[:n], latest[n:], common, activity[:n], activity[n:])


def ranking_stats(
    history: EdgeHistory,
    neighbors: RecentNeighbors,
    src: torch.Tensor,
    candidates: torch.Tensor,
    context: EventBatch | None = None,
    visible: torch.Tensor | None = None,
) -> PairStats:
    """Stats of every ``src[p]`` (``[P]``) against every ``candidates[q]`` (``[Q]``): ``[P, Q]``.

    Within-batch events are folded in sparsely (each source has few events in a batch), and
    the candidates' latest times through a running maximum over the batch.
    """
    u, v = src.unsqueeze(1), candidates.unsqueeze(0)
    count, last = _history(history, u, v)
    latest_u = neighbors.latest(src).unsqueeze(1).expand_as(last).clone()
    latest_v = neighbors.latest(candidates).unsqueeze(0).expand_as(last).clone()
    count_u = neighbors.count[src].unsqueeze(1).expand_as(count)
    count_v = neighbors.count[candidates].unsqueeze(0).expand_as(count)
    if context is not None and len(context):
        p_n, q_n = src.numel(), candidates.numel()
        cs, cd, ct = context.src, context.dst, context.t
        b = cs.numel()
        order = torch.argsort(candidates)
        sorted_c = candidates[order]

        def column(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pos = torch.searchsorted(sorted_c, ids).clamp(max=q_n - 1)
            return order[pos], sorted_c[pos] == ids

        seen = torch.arange(b, device=cs.device) < visible.unsqueeze(1)  # [P, B]
        touches = seen & ((cs == u) | (cd == u))
        neg = torch.full_like(ct, _NEG_INF)
        latest_u = torch.maximum(latest_u, torch.where(touches, ct, neg).amax(1, keepdim=True))
        # A self-loop is two of the node's events (as in the tables' counts).
        count_u = count_u + (seen & (cs == u)).sum(1, keepdim=True) + (seen & (cd == u)).sum(1, keepdim=True)
        rows, idx = touches.nonzero(as_tuple=True)
        partner = torch.where(cs[idx] == src[rows], cd[idx], cs[idx])
        col, ok = column(partner)
        flat = (rows * q_n + col)[ok]
        count = count.reshape(-1).index_add(0, flat, torch.ones_like(flat)).view(p_n, q_n)
        last = last.reshape(-1).scatter_reduce(0, flat, ct[idx][ok], reduce="amax").view(p_n, q_n)
        if bool((visible == b).all()):  # every source sees the whole batch (serving): [Q]
            whole = torch.full((q_n,), _NEG_INF, dtype=ct.dtype, device=ct.device)
            times = torch.zeros(q_n, dtype=torch.long, device=ct.device)
            for ends in (cs, cd):
                c, ok2 = column(ends)
                whole = whole.scatter_reduce(0, c[ok2], ct[ok2], reduce="amax")
                times = times.index_add(0, c[ok2], torch.ones_like(c[ok2]))
            latest_v = torch.maximum(latest_v, whole.unsqueeze(0))
            common = _common(neighbors.ids[u], neighbors.ids[v])
            return PairStats(count, last, latest_u, latest_v, common, count_u, count_v + times.unsqueeze(0))
        # Latest time and number of events of each candidate among context events 0..i, for
        # every i: [B, Q].
        running = torch.full((b, q_n), _NEG_INF, dtype=ct.dtype, device=ct.device)
        per_event = torch.zeros(b, q_n, dtype=torch.long, device=ct.device)
        for ends in (cs, cd):
            c, ok2 = column(ends)
            ev = torch.arange(b, device=cs.device)[ok2]
            running[ev, c[ok2]] = ct[ok2]
            per_event.index_put_((ev, c[ok2]), torch.ones_like(ev), accumulate=True)
        running = torch.cummax(running, 0).values
        has_prefix = (visible > 0).unsqueeze(1)
        before = (visible - 1).clamp(min=0)
        prefix = torch.where(has_prefix, running[before], torch.full((1, q_n), _NEG_INF, dtype=ct.dtype))
        latest_v = torch.maximum(latest_v, prefix)
        count_v = count_v + torch.where(has_prefix, torch.cumsum(per_event, 0)[before], 0)
    common = _common(neighbors.ids[u], neighbors.ids[v])
    return PairStats(count, last, latest_u, latest_v, common, count_u, count_v)
