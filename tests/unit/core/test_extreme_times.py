"""No NaN or inf from finite input: huge time gaps (an event far in the future, a query time
near float64's limit) leave memory, embeddings and scores finite, for every model family."""

from __future__ import annotations

import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.modules import MAX_TIME_GAP_S, TimeEncoder, bounded_gap
from tgnstream.core.step import TemporalStep

MODELS = [("tgn", {}), ("tgn", {"pair_features": True}), ("jodie", {}), ("tgn", {"pres": True})]


def _batch(src, dst, t):
    return EventBatch(
        torch.tensor(src), torch.tensor(dst), torch.tensor(t, dtype=torch.float64), torch.zeros(len(t), 0)
    )


@pytest.mark.parametrize("preset,extra", MODELS)
@pytest.mark.parametrize("far", [1e300, 3e38, 1e20, -1e300])
def test_state_and_scores_stay_finite_after_a_far_event(preset, extra, far):
    torch.manual_seed(0)
    engine = MemoryEngine(ModelConfig.preset(preset, width=8, **extra), capacity=8).eval()
    TemporalStep(engine).apply(_batch([0, 1, 2], [3, 3, 4], [1.0, 2.0, 3.0]))
    TemporalStep(engine).apply(_batch([0], [4], [far]))  # bypasses validation: the engine's own defence
    TemporalStep(engine).apply(_batch([1, 2], [4, 3], [4.0, 5.0]))
    engine.fold_pending()
    for name, buf in engine.state_dict().items():
        if buf.is_floating_point() and name not in ("watermark", "first_event_time"):
            assert torch.isfinite(buf).all(), name
    src, dst = torch.tensor([0, 1, 2, 5]), torch.tensor([4, 3, 4, 3])
    for t in (float(engine.watermark), 1e39, 1e308, -1e308, 3.0):
        times = torch.full((4,), t, dtype=torch.float64)
        assert torch.isfinite(engine.score(src, dst, times)).all(), t
        assert torch.isfinite(engine.embed(src, times)).all(), t


def test_bounded_gap_only_changes_gaps_beyond_the_bound():
    dt = torch.tensor([0.0, 1.5, 2.6e6, MAX_TIME_GAP_S, 1e300, -1e300], dtype=torch.float64)
    got = bounded_gap(dt)
    assert got.dtype == torch.float32
    assert got[:4].tolist() == dt[:4].float().tolist()
    assert got[4].item() == pytest.approx(MAX_TIME_GAP_S) and got[5].item() == pytest.approx(-MAX_TIME_GAP_S)
    assert torch.isfinite(TimeEncoder(6)(dt)).all()
