"""Metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import pytest
import torch

from tgnstream.core.evaluation import average_precision, ranking_metrics, reciprocal_ranks, roc_auc

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", range(5))
def test_ap_auc_match_sklearn_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (300,), generator=g).float()  # heavy ties
    labels = (torch.rand(300, generator=g) < 0.4).long()
    assert average_precision(scores, labels) == pytest.approx(
        sklearn_metrics.average_precision_score(labels.numpy(), scores.numpy()), abs=1e-12
    )
    assert roc_auc(scores, labels) == pytest.approx(
        sklearn_metrics.roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12
    )


def test_reciprocal_ranks_hand_computed():
    pos = torch.tensor([0.9, 0.5, 0.1])
    neg = torch.tensor(
        [
            [0.1, 0.2, 0.3],  # best: rank 1
            [0.5, 0.7, float("-inf")],  # one above, one tie: rank 1 + 1 + 0.5 = 2.5
            [0.2, 0.3, 0.4],  # worst of 4: rank 4
        ]
    )
    torch.testing.assert_close(
        reciprocal_ranks(pos, neg), torch.tensor([1.0, 1 / 2.5, 0.25], dtype=torch.float64)
    )
    m = ranking_metrics(pos, neg, k=2)
    assert m["mrr"] == pytest.approx((1 + 0.4 + 0.25) / 3)
    assert m["hits@2"] == pytest.approx(1 / 3)


def test_metric_errors_are_clear():
    with pytest.raises(ValueError, match="positive"):
        average_precision(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="both"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
