"""Retrieval vectors for TopK over large catalogs: the link decoder linearised into a maximum
inner product search (MIPS), so that an ANN index can shortlist candidates before the exact
ranking (``MemoryForward.rank_forward``) scores the shortlist.

The decoder (``LinkDecoder``) scores a source ``u`` against a candidate ``v`` as

    logit(u, v) = w . relu(a_u + c_v + W_p f_uv) + v_p . f_uv,   a_u = W_s z_u + b,  c_v = W_d z_v.

For a pair that never met, the pair features ``f_uv`` hold only the endpoints' own activity (and
common neighbours); recency and popularity of candidates are left to the shortlist's other
members (see ``tgnstream.model_server.catalog``). Dropping them and linearising the ReLU around
the candidate distribution gives

    logit(u, v) ~= const(u) + sum_j w_j g_j(u) c_vj,   g_j(u) = P_v(a_uj + c_vj > 0),

a MIPS with candidate vectors ``x_v = c_v`` and query vectors ``y_u = w * g(u)``. ``g`` is the
expected ReLU slope of hidden unit ``j`` for this source over the candidates, with ``c_vj``
modelled per unit as a normal distribution (``gate="soft"``), or the slope at the mean candidate
(``gate="hard"``: ``1[a_uj + mean_v c_vj > 0]``).

Everything here is a pure function of the decoder's weights and the given embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tgnstream.core.modules import LinkDecoder

__all__ = ["GateStats", "candidate_vectors", "gate_stats", "query_vectors", "score_weights"]

# Rows of the candidate matrix the gate statistics read: a fixed stride over the (id-sorted)
# candidates, so the statistics are a function of the candidate set and its vectors.
_GATE_SAMPLE = 16_384


@dataclass(frozen=True)
class GateStats:
    """Per-hidden-unit mean and standard deviation (``[h]`` float64 each) of the candidate
    vectors ``c_v``: where the decoder's ReLUs are linearised."""

    mean: torch.Tensor
    std: torch.Tensor


@torch.no_grad()
def candidate_vectors(decoder: LinkDecoder, z_cand: torch.Tensor) -> torch.Tensor:
    """Candidate vectors ``x [Q, h]`` float32 (``c_v = W_d z_v``) of embeddings ``z_cand [Q, d]``."""
    return decoder.lin_dst(z_cand).float().contiguous()


@torch.no_grad()
def gate_stats(x: torch.Tensor) -> GateStats:
    """``GateStats`` of candidate vectors ``x [Q, h]`` (``Q >= 1``), from at most ``_GATE_SAMPLE``
    rows at a fixed stride (float64, so they do not depend on how ``x`` was batched)."""
    step = max(1, x.shape[0] // _GATE_SAMPLE)
    sample = x[::step].double()
    return GateStats(sample.mean(0), sample.std(0, unbiased=False).clamp(min=1e-6))


@torch.no_grad()
def query_vectors(
    decoder: LinkDecoder, z_src: torch.Tensor, gates: GateStats, gate: str = "soft"
) -> torch.Tensor:
    """Query vectors ``y [P, h]`` float32 (``w * g(u)``) of source embeddings ``z_src [P, d]``.

    ``gate``: ``"soft"`` (expected ReLU slope under a per-unit normal model of the candidates)
    or ``"hard"`` (slope at the mean candidate).
    """
    a = decoder.lin_src(z_src).double()  # [P, h], bias included
    w = decoder.lin_out.weight[0].double()  # [h]
    if gate == "soft":
        g = 0.5 * (1.0 + torch.erf((a + gates.mean) / (gates.std * math.sqrt(2.0))))
    elif gate == "hard":
        g = (a + gates.mean > 0).double()
    else:
        raise ValueError(f"gate must be 'soft' or 'hard', got {gate!r}")
    return (w * g).float().contiguous()


@torch.no_grad()
def score_weights(decoder: LinkDecoder, y: torch.Tensor) -> torch.Tensor:
    """``[P, d]`` float64 weights ``q = W_d^T y`` such that ``y . x_v == q . z_v``: the retrieval
    score straight from a candidate's embedding, in float64 (for exact re-scoring)."""
    return y.double() @ decoder.lin_dst.weight.double()
