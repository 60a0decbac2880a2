"""Learnable building blocks of TGN-family models. Each has one ``forward``; shapes in docstrings."""

from __future__ import annotations

import math

import torch
from torch import nn

from tgnstream.core.config import ModelConfig

__all__ = [
    "TimeEncoder",
    "IdentityMessage",
    "MLPMessage",
    "TemporalAttentionEmbedding",
    "TimeProjectionEmbedding",
    "LinkDecoder",
    "PAIR_FEATURE_DIM",
    "encode_pair_features",
    "pair_feature_dim",
    "MAX_TIME_GAP_S",
    "bounded_gap",
]

#: Largest time gap (seconds, about 317 years) the model ever sees. Events are validated at the
#: door, but a state restored from elsewhere or a query time near the allowed edge can still
#: produce a huge gap; beyond float32's range it would turn into inf, and cos(inf) or
#: 0 * inf into NaN. Clamping keeps every output finite for any finite input.
MAX_TIME_GAP_S = 1e10


def bounded_gap(dt: torch.Tensor) -> torch.Tensor:
    """``dt`` clamped to ``[-MAX_TIME_GAP_S, MAX_TIME_GAP_S]`` as float32 (NaN stays NaN)."""
    return dt.clamp(-MAX_TIME_GAP_S, MAX_TIME_GAP_S).float()


class TimeEncoder(nn.Module):
    """phi(dt) = cos(w * dt + b), w initialised to 10^-linspace(0, 9, d) (TGAT / TGN).

    ``learnable=False`` keeps w, b at their initial values (GraphMixer's fixed encoding): they
    become buffers, so checkpoints keep the same keys, and backward no longer needs sin(.) or
    the gradient of every matmul that consumes phi(dt) with respect to its input.

    ``forward(dt [*]) -> [*, d]``; ``dt`` in seconds, any float dtype.
    """

    def __init__(self, dim: int, learnable: bool = True):
        super().__init__()
        w = 10.0 ** -torch.linspace(0, 9, dim)
        b = torch.zeros(dim)
        if learnable:
            self.w, self.b = nn.Parameter(w), nn.Parameter(b)
        else:
            self.register_buffer("w", w)
            self.register_buffer("b", b)

    def forward(self, dt: torch.Tensor) -> torch.Tensor:
        return torch.cos(bounded_gap(dt).unsqueeze(-1) * self.w + self.b)

    def at_zero(self) -> torch.Tensor:
        """``phi(0)`` as ``[1, d]``: ``cos(0 * w + b)`` is exactly ``cos(b)``, in one op."""
        return torch.cos(self.b).unsqueeze(0)


class IdentityMessage(nn.Module):
    """Message = raw mail ``[s_self, s_other, e]`` concatenated with phi(dt).

    ``forward(mail [M, d_mail], time_enc [M, d_time]) -> [M, d_mail + d_time]``.
    """

    def __init__(self, mail_dim: int, time_dim: int):
        super().__init__()
        self.out_dim = mail_dim + time_dim

    def forward(self, mail: torch.Tensor, time_enc: torch.Tensor) -> torch.Tensor:
        return torch.cat([mail, time_enc], dim=-1)


class MLPMessage(nn.Module):
    """Two-layer MLP over ``[mail, phi(dt)]``; ``forward -> [M, message_dim]``."""

    def __init__(self, mail_dim: int, time_dim: int, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(
            nn.Linear(mail_dim + time_dim, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim)
        )

    def forward(self, mail: torch.Tensor, time_enc: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([mail, time_enc], dim=-1))


#: Queries one attention pass takes at once: larger sets (a catalog's candidates) go in chunks of
#: this many, so the per-edge tensors stay a few hundred MB. Sets up to it compute as one pass.
ATTENTION_CHUNK = 1 << 15


class TemporalAttentionEmbedding(nn.Module):
    """One layer of temporal graph attention over each query node's K most recent neighbours.

    Query ``[h_i, phi(0)]``; keys/values ``[h_j]`` projected per node plus ``[e_ij, phi(t - t_j)]``
    projected per edge (the edge term is shared by key and value, as in PyG's TransformerConv);
    output ``MLP([h_i, attention])``. Nodes without neighbours get a zero attention vector.

    ``forward(node_mem [U, d_mem], q_idx [M], nb_idx [M, K], nb_dt [M, K], nb_feats [M, K, d_e],
    mask [M, K]) -> [M, d_emb]`` where ``q_idx``/``nb_idx`` index rows of ``node_mem``.
    """

    def __init__(self, cfg: ModelConfig, time_encoder: TimeEncoder):
        super().__init__()
        d, e = cfg.memory_dim, cfg.embedding_dim
        self.heads = cfg.num_heads
        self.head_dim = e // cfg.num_heads
        self.time_encoder = time_encoder
        self.q = nn.Linear(d + cfg.time_dim, e)
        self.kv_node = nn.Linear(d, 2 * e, bias=False)
        self.kv_edge = nn.Linear(cfg.edge_dim + cfg.time_dim, e)
        self.merge = nn.Sequential(nn.Linear(d + e, e), nn.ReLU(), nn.Linear(e, e))
        self.dropout = nn.Dropout(cfg.dropout)
        self.out_dim = e

    def forward(self, node_mem, q_idx, nb_idx, nb_dt, nb_feats, mask):
        # Project per node, then gather per edge: K times fewer rows through the matmul.
        kv_nodes = self.kv_node(node_mem)
        m = q_idx.shape[0]
        if m <= ATTENTION_CHUNK:
            return self._attend(node_mem, kv_nodes, q_idx, nb_idx, nb_dt, nb_feats, mask)
        # A catalog's worth of queries: the per-edge tensors ([M, K, width] several times over)
        # would take gigabytes at once; queries are independent, so they go in chunks.
        return torch.cat(
            [
                self._attend(
                    node_mem,
                    kv_nodes,
                    *(x[i : i + ATTENTION_CHUNK] for x in (q_idx, nb_idx, nb_dt, nb_feats, mask)),
                )
                for i in range(0, m, ATTENTION_CHUNK)
            ]
        )

    def _attend(self, node_mem, kv_nodes, q_idx, nb_idx, nb_dt, nb_feats, mask):
        m, k = nb_idx.shape
        h_q = node_mem.index_select(0, q_idx)
        phi0 = self.time_encoder.at_zero().expand(m, -1)
        q = self.q(torch.cat([h_q, phi0], -1)).view(m, self.heads, self.head_dim)
        # Explicit sizes, not -1: zero queries (a TopK before any event) must reshape too.
        kv = kv_nodes.index_select(0, nb_idx.reshape(-1)).view(m, k, 2 * self.out_dim)
        edge_in = self.time_encoder(nb_dt)
        if nb_feats.shape[-1]:
            edge_in = torch.cat([nb_feats, edge_in], -1)
        edge = self.kv_edge(edge_in)
        key, value = kv.chunk(2, dim=-1)
        key = (key + edge).view(m, k, self.heads, self.head_dim)
        value = (value + edge).view(m, k, self.heads, self.head_dim)
        logits = torch.einsum("mhc,mkhc->mhk", q, key) / math.sqrt(self.head_dim)
        logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
        has_nb = mask.any(1)
        # Rows with no neighbour would softmax to NaN; give them zero attention instead.
        logits = torch.where(has_nb.view(m, 1, 1), logits, torch.zeros_like(logits))
        weights = self.dropout(torch.softmax(logits, -1)) * has_nb.view(m, 1, 1)
        attn = torch.einsum("mhk,mkhc->mhc", weights, value).reshape(m, self.out_dim)
        return self.merge(torch.cat([h_q, attn], -1))


class TimeProjectionEmbedding(nn.Module):
    """JODIE: ``z = s * (1 + w * log1p(dt))``; ``forward(mem [M, d], dt [M]) -> [M, d]``.

    log1p keeps the projection bounded for raw second-scale gaps (JODIE normalises dt instead).
    """

    def __init__(self, memory_dim: int):
        super().__init__()
        self.proj = nn.Linear(1, memory_dim)
        nn.init.normal_(self.proj.weight, 0.0, 0.1)
        nn.init.zeros_(self.proj.bias)
        self.out_dim = memory_dim

    def forward(self, mem: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        return mem * (1 + self.proj(torch.log1p(bounded_gap(dt).clamp(min=0)).unsqueeze(-1)))


# Pair features: [seen, log1p(count), RBF(log-time since last u-v event), log1p(common),
# then for each endpoint: [this pair is its latest interaction, RBF(log-time it is behind that)].
_RBF_CENTRES = torch.arange(0.0, 18.0, 2.0)
_NR = _RBF_CENTRES.numel()
PAIR_FEATURE_DIM = 3 + _NR + 2 * (1 + _NR)
# Activity features: per endpoint [active at all, RBF(log-time since its latest interaction),
# log1p(its number of interactions), that log-time itself], then the pair's log-time since its
# last event. The raw log-times are monotone, so the decoder's linear term can order candidates
# by exact recency (RBFs alone blur gaps that fall under one bump).
ACTIVITY_FEATURE_DIM = 2 * (3 + _NR) + 1
_LOG_GAP_SCALE = 1.0 / 18.0  # log1p of the largest gap the RBF centres cover


def pair_feature_dim(activity: bool) -> int:
    """Width of ``encode_pair_features``'s output."""
    return PAIR_FEATURE_DIM + (ACTIVITY_FEATURE_DIM if activity else 0)


def _rbf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * (x.unsqueeze(-1) - _RBF_CENTRES.to(x.device)) ** 2)


def encode_pair_features(stats, t: torch.Tensor, activity: bool = False) -> torch.Tensor:
    """Fixed encoding of ``PairStats`` at query times ``t`` (broadcastable) -> ``[*, F]`` float32.

    RBFs over log-time let a linear layer learn smooth recency curves; the per-endpoint terms
    say how recent the pair is *relative to the endpoint's other partners*, which is what
    decides a ranking among a user's past destinations. ``activity`` adds each endpoint's own
    recency and popularity, whether or not the pair met before: what ranks the many candidates
    a source never met (global recency / popularity, the heuristics' tie-breakers).
    """
    seen = stats.count > 0
    t = torch.broadcast_to(t, seen.shape)
    # The three gaps share one RBF pass (a 1-pair query is dominated by per-op cost): time since
    # the last u-v event, and how far that event is behind u's and v's latest interaction.
    gaps = torch.stack([t - stats.last, stats.latest_u - stats.last, stats.latest_v - stats.last], -1)
    on = seen.unsqueeze(-1)
    x = x_pair = torch.log1p(bounded_gap(torch.where(on, gaps, torch.zeros_like(gaps))).clamp(min=0))
    rbf = torch.exp(-0.5 * (x.unsqueeze(-1) - _RBF_CENTRES.to(x.device)) ** 2) * on.unsqueeze(-1)
    is_latest = (on & (gaps[..., 1:] <= 0)).float()  # [*, 2]: for u, for v
    parts = [
        on.float(),
        torch.log1p(stats.count.float()).unsqueeze(-1),
        rbf[..., 0, :],
        torch.log1p(stats.common.float()).unsqueeze(-1),
        is_latest[..., :1],
        rbf[..., 1, :],
        is_latest[..., 1:],
        rbf[..., 2, :],
    ]
    if activity:
        for latest, count in ((stats.latest_u, stats.count_u), (stats.latest_v, stats.count_v)):
            latest = torch.broadcast_to(latest, seen.shape)
            active = (torch.broadcast_to(count, seen.shape) > 0).unsqueeze(-1)
            idle = torch.where(active[..., 0], t - latest, torch.zeros_like(latest))
            x = torch.log1p(bounded_gap(idle).clamp(min=0))
            parts += [
                active.float(),
                _rbf(x) * active,
                torch.log1p(torch.broadcast_to(count, seen.shape).float()).unsqueeze(-1),
                x.unsqueeze(-1) * _LOG_GAP_SCALE,
            ]
        parts.append(x_pair[..., :1] * _LOG_GAP_SCALE)
    return torch.cat(parts, -1)


class LinkDecoder(nn.Module):
    """Link logit from two embeddings (and optional pair features).

    ``w . relu(W_s z_u + W_d z_v + W_p f_uv) + v . f_uv``: the linear pair term lets plain
    recency/frequency orderings pass straight to the logit. The source and destination terms are
    separable, so ``rank`` scores P sources against Q candidates without building P*Q embeddings.

    ``forward(z_src [B, d], z_dst [B, d], pair [B, F] | None) -> [B]``;
    ``rank(z_src [P, d], z_cand [Q, d], pair [P, Q, F] | None) -> [P, Q]``.
    """

    def __init__(self, in_dim: int, hidden: int, pair_dim: int = 0):
        super().__init__()
        self.lin_src = nn.Linear(in_dim, hidden)
        self.lin_dst = nn.Linear(in_dim, hidden, bias=False)
        self.lin_pair = nn.Linear(pair_dim, hidden, bias=False) if pair_dim else None
        self.pair_skip = nn.Linear(pair_dim, 1, bias=False) if pair_dim else None
        self.lin_out = nn.Linear(hidden, 1)

    def forward(self, z_src, z_dst, pair=None):
        h = self.lin_src(z_src) + self.lin_dst(z_dst)
        if self.lin_pair is None:
            return self.lin_out(torch.relu(h)).squeeze(-1)
        h = h + self.lin_pair(pair)
        return (self.lin_out(torch.relu(h)) + self.pair_skip(pair)).squeeze(-1)

    def rank(self, z_src, z_cand, pair=None):
        h = self.lin_src(z_src).unsqueeze(1) + self.lin_dst(z_cand).unsqueeze(0)
        if self.lin_pair is None:
            return self.lin_out(torch.relu(h)).squeeze(-1)
        h = h + self.lin_pair(pair)
        return (self.lin_out(torch.relu(h)) + self.pair_skip(pair)).squeeze(-1)
