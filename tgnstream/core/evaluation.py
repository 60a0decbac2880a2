"""Link-prediction metrics: AP and ROC-AUC (one negative per positive), MRR and hits@k (ranking).

All functions are pure and accept CPU or device tensors; they return Python floats or CPU tensors.
Scores are ``[*]`` floats, or ``[*, J]`` keys compared lexicographically (a heuristic that breaks
ties of its first key by a second one, e.g. pair recency then destination recency): key 0
decides, key 1 breaks its ties, and so on; equal in every key is a tie.
"""

from __future__ import annotations

import torch

__all__ = ["average_precision", "roc_auc", "reciprocal_ranks", "ranking_metrics", "as_scalar_scores"]


def as_scalar_scores(*scores: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Scalar scores ``[*]`` with the same order as the given ones, jointly comparable: the
    tensors themselves when they are scalar (``[*]``), else the dense lexicographic rank of each
    key row ``[*, J]`` among all rows of all tensors (float64)."""
    if all(s.dim() <= 1 for s in scores):
        return scores
    flat = [s.detach().double().reshape(-1, s.shape[-1]).cpu() for s in scores]
    _, rank = torch.unique(torch.cat(flat), dim=0, return_inverse=True)  # rows sorted lexicographically
    out, at = [], 0
    for s, f in zip(scores, flat):
        out.append(rank[at : at + f.shape[0]].double().reshape(s.shape[:-1]))
        at += f.shape[0]
    return tuple(out)


def _sorted_by_score(scores: torch.Tensor, labels: torch.Tensor):
    scores = scores.detach().double().flatten().cpu()
    labels = labels.detach().flatten().cpu().double()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ")
    order = torch.argsort(scores, descending=True, stable=True)
    return scores[order], labels[order]


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Average precision, step-wise (no interpolation), tied scores form one threshold.

    Matches ``sklearn.metrics.average_precision_score``.
    """
    (scores,) = as_scalar_scores(scores)
    s, y = _sorted_by_score(scores, labels)
    n_pos = float(y.sum())
    if n_pos == 0:
        raise ValueError("average_precision needs at least one positive")
    tp = torch.cumsum(y, 0)
    fp = torch.cumsum(1 - y, 0)
    # Only the last index of each run of equal scores is a threshold.
    last_of_run = torch.ones_like(s, dtype=torch.bool)
    last_of_run[:-1] = s[1:] != s[:-1]
    tp, fp = tp[last_of_run], fp[last_of_run]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    recall_prev = torch.cat([torch.zeros(1, dtype=recall.dtype), recall[:-1]])
    return float(((recall - recall_prev) * precision).sum())


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: P(score_pos > score_neg) + 0.5 P(tie)."""
    (scores,) = as_scalar_scores(scores)
    scores = scores.detach().double().flatten().cpu()
    labels = labels.detach().flatten().cpu().bool()
    n_pos = int(labels.sum())
    n_neg = int(labels.numel() - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both positives and negatives")
    # Mid-ranks handle ties exactly (Mann-Whitney U).
    order = torch.argsort(scores, stable=True)
    s_sorted = scores[order]
    ranks = torch.empty_like(scores)
    _, inverse, counts = torch.unique_consecutive(s_sorted, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mid = ends - (counts.double() - 1) / 2
    ranks[order] = mid[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def reciprocal_ranks(
    pos_scores: torch.Tensor, neg_scores: torch.Tensor, present: torch.Tensor | None = None
) -> torch.Tensor:
    """Reciprocal rank of each positive among its own negatives; ties count half (TGB).

    Args:
        pos_scores: ``[P]`` score of each positive (or ``[P, J]`` lexicographic keys).
        neg_scores: ``[P, Q]`` scores of the Q negatives of each positive (or ``[P, Q, J]``).
        present: optional ``[P, Q]`` bool, False for entries that are not negatives (e.g. the
            positive's own column when ranking against every destination); those never count.

    Returns:
        ``[P]`` float64 reciprocal ranks, rank = 1 + #(neg > pos) + 0.5 * #(neg == pos).
    """
    if pos_scores.dim() == 2:  # lexicographic keys: compare key by key
        pos = pos_scores.detach().double().unsqueeze(1)  # [P, 1, J]
        neg = neg_scores.detach().double()
        greater = torch.zeros(neg.shape[:2], dtype=torch.bool, device=neg.device)
        equal = torch.ones_like(greater)
        for j in range(neg.shape[-1]):
            greater |= equal & (neg[..., j] > pos[..., j])
            equal &= neg[..., j] == pos[..., j]
        if present is not None:
            greater &= present
            equal &= present
        rank = 1.0 + greater.sum(1).double() + 0.5 * equal.sum(1).double()
        return (1.0 / rank).cpu()
    pos = pos_scores.detach().double().reshape(-1, 1)
    neg = neg_scores.detach().double()
    greater, ties = neg > pos, neg == pos
    if present is not None:
        greater &= present
        ties &= present
    greater, ties = greater.sum(1).double(), ties.sum(1).double()
    rank = 1.0 + greater + 0.5 * ties
    return (1.0 / rank).cpu()


def ranking_metrics(pos_scores: torch.Tensor, neg_scores: torch.Tensor, k: int = 10) -> dict:
    """MRR and hits@k of positives ranked against their negatives (see ``reciprocal_ranks``)."""
    rr = reciprocal_ranks(pos_scores, neg_scores)
    rank = 1.0 / rr
    return {"mrr": float(rr.mean()), f"hits@{k}": float((rank <= k).double().mean())}
