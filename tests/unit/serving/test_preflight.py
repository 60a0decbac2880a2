"""Pre-flight of hot-swap candidates: finite weights and state, shapes, the canary's probe set and
its judgement, against hand-computed expectations."""

from __future__ import annotations

import copy

import pytest
import torch

from tgnstream.apps.testing import small_engine
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep
from tgnstream.runtime.preflight import (
    Answers,
    CanaryConfig,
    Refused,
    answers,
    canary,
    check_shapes,
    check_weights,
    judge,
    probe_set,
)


def test_one_nan_in_one_decoder_weight_is_found_and_named():
    engine = small_engine(50)
    check_weights(engine)  # a healthy engine passes
    with torch.no_grad():
        engine.model.decoder.lin_out.weight[0, 0] = float("nan")
    with pytest.raises(Refused) as e:
        check_weights(engine)
    assert e.value.reason == "nonfinite_weights"
    assert "model.decoder.lin_out.weight" in str(e.value) and "holds 1 non-finite value" in str(e.value)


def test_state_buffers_are_checked_and_only_the_empty_time_bounds_may_be_infinite():
    fresh = MemoryEngine(ModelConfig(memory_dim=8, time_dim=4, embedding_dim=8, num_neighbors=3), capacity=4)
    assert float(fresh.watermark) == float("-inf")
    check_weights(fresh)  # -inf / +inf time bounds of an empty state are by design
    engine = small_engine(50)
    with torch.no_grad():
        engine.memory.memory[3, 1] = float("inf")
    with pytest.raises(Refused, match=r"memory\.memory"):
        check_weights(engine)
    fresh.watermark.fill_(float("nan"))
    with pytest.raises(Refused, match="watermark"):
        check_weights(fresh)


def test_another_architecture_is_refused_naming_what_differs():
    engine = small_engine(0)
    check_shapes(copy.deepcopy(engine), engine)
    other = MemoryEngine(ModelConfig(memory_dim=16, time_dim=4, embedding_dim=8, num_neighbors=3), capacity=4)
    with pytest.raises(Refused) as e:
        check_shapes(other, engine)
    assert e.value.reason == "architecture" and "memory_dim" in str(e.value)


def _engine_with(events: list[tuple[str, str, float]]) -> MemoryEngine:
    torch.manual_seed(0)
    engine = MemoryEngine(ModelConfig(memory_dim=8, time_dim=4, embedding_dim=8, num_neighbors=3), capacity=8)
    for s, d, t in events:  # one event per batch: the hand-computed tables below follow the log
        dense, _ = engine.ids.lookup([s, d])
        TemporalStep(engine).apply(
            EventBatch(dense[:1], dense[1:], torch.tensor([t], dtype=torch.float64), torch.zeros(1, 0))
        )
    engine.fold_pending()
    return engine.eval()


def test_the_probe_set_is_the_most_recently_active_nodes_with_their_latest_neighbour():
    engine = _engine_with([("a", "b", 1.0), ("c", "d", 2.0), ("a", "e", 3.0)])
    probe = probe_set(engine, CanaryConfig(pairs=4, topk_sources=2))
    # Latest neighbour-table time: a 3 (e), e 3 (a), c 2 (d), d 2 (c), b 1 (a); ties by dense id
    # (a=0, b=1, c=2, d=3, e=4), four pairs kept.
    assert probe.sources == ["a", "e", "c", "d"]
    assert probe.positives == ["e", "a", "d", "c"]
    assert probe.time == 3.0 and probe.topk == ["a", "e"]
    assert set(probe.negatives) <= {"b", "d", "e"}  # drawn among the destinations
    assert probe_set(engine, CanaryConfig(pairs=4, topk_sources=2)) == probe  # a function of the state
    assert probe_set(_engine_with([]), CanaryConfig()) is None


def test_the_canary_passes_the_same_model_and_refuses_non_finite_answers():
    engine = small_engine(200)
    cfg = CanaryConfig(pairs=16, topk_sources=4, k=3, min_pairs=4)
    probe = probe_set(engine, cfg)
    report = canary(copy.deepcopy(engine), engine, probe, cfg)
    assert report.pairs == 16 and report.compared
    assert report.candidate_ap == report.serving_ap and report.topk_overlap == 1.0
    # Finite weights that overflow: rows of +-3e38 send half of the decoder's hidden units to +inf
    # (whatever the sign of the embedding's sum), and output weights of both signs over those
    # units make inf - inf = NaN.
    broken = copy.deepcopy(engine)
    dec = broken.model.decoder
    with torch.no_grad():
        dec.lin_src.weight.fill_(3e38)
        dec.lin_src.weight[::2] *= -1
        dec.lin_dst.weight.zero_()
        j = torch.arange(dec.lin_out.weight.shape[1])
        dec.lin_out.weight.copy_(torch.where(j % 4 < 2, 1.0, -1.0).unsqueeze(0))
    check_weights(broken)  # every weight is finite: only the canary can tell
    with pytest.raises(Refused) as e:
        canary(broken, engine, probe, cfg)
    assert e.value.reason == "canary" and "not finite" in str(e.value)


def _answers(scores: list[float]) -> Answers:
    return Answers(torch.tensor(scores), [], torch.zeros(0))


def test_the_canary_compares_average_precision_with_the_serving_model():
    cfg = CanaryConfig(min_pairs=2, max_ap_drop=0.1)
    # Positives first, negatives second: the serving model ranks both positives on top (AP 1).
    serving = _answers([0.9, 0.8, 0.2, 0.1])
    assert judge(_answers([0.7, 0.6, 0.3, 0.4]), serving, cfg).candidate_ap == 1.0
    # Ranked 0.9 (neg), 0.8 (pos), 0.7 (neg), 0.6 (pos): AP = (1/2 + 2/4) / 2 = 0.5, 0.5 below.
    with pytest.raises(Refused) as e:
        judge(_answers([0.8, 0.6, 0.9, 0.7]), serving, cfg)
    assert e.value.reason == "canary" and "AP 0.500 (serving 1.000)" in str(e.value)
    # Too few pairs to compare: only finiteness and range count.
    assert not judge(_answers([0.8, 0.6, 0.9, 0.7]), serving, CanaryConfig(min_pairs=3)).compared
    with pytest.raises(Refused, match="not in"):
        judge(_answers([1.5, 0.6, 0.9, 0.7]), serving, CanaryConfig(min_pairs=3))


def test_answers_from_an_engine_that_does_not_know_the_probe_are_refused():
    engine = small_engine(100)
    probe = probe_set(engine, CanaryConfig(pairs=8))
    with pytest.raises(Refused, match="unknown"):
        answers(_engine_with([("x", "y", 1.0)]), probe, 3)
