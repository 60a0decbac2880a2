"""The continual trainer's engine work against independent references: the head and the tail are
the states a plain engine reaches by applying the same batches the way a server does; the
window keeps contiguous offsets; the gate's published-side metrics are those of the published
weights replayed over the window; a restored trainer goes on exactly like one never stopped."""

from __future__ import annotations

import copy

import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.step import TemporalStep
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream, summarise
from tgnstream.core.synthetic import generate_stream
from tgnstream.trainer.continual import ContinualTrainer
from tgnstream.trainer.continual_config import FineTuneConfig, GateConfig

BATCH = 100
MODEL = ModelConfig.preset(
    "tgn", width=16, pair_features=True, activity_features=True, num_neighbors=5, pres=True
)


def _stream():
    return generate_stream(3_000, num_src=60, num_dst=40, seed=4)


def _engine() -> MemoryEngine:
    torch.manual_seed(0)
    return MemoryEngine(MODEL, 16).eval()


def _batches(data):
    ev = data.events
    for i in range(0, len(ev), BATCH):
        yield ev.slice(i, min(i + BATCH, len(ev))), {0: i}, {0: min(i + BATCH, len(ev))}


def _serving_reference(engine: MemoryEngine, batches) -> MemoryEngine:
    """A plain engine applying batches as the server's ingest does."""
    for events, *_ in batches:
        engine.ensure_capacity(int(max(events.src.max(), events.dst.max())) + 1)
        step = TemporalStep(engine)
        step.commit_live(step.prepare_live(events))
    return engine


def _assert_same_state(a: MemoryEngine, b: MemoryEngine) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _trainer(**training) -> ContinualTrainer:
    cfg = FineTuneConfig(
        **{
            "window_events": 1_000,
            "holdout_events": 200,
            "every_events": 500,
            "min_new_events": 100,
            "batch_size": 200,
            "lr": 1e-3,
            **training,
        }
    )
    return ContinualTrainer(_engine(), cfg, GateConfig(), BATCH)


def test_head_tail_and_window_follow_the_stream_like_a_server():
    data = _stream()
    batches = list(_batches(data))[:25]
    trainer = _trainer()
    for events, first, nxt in batches:
        trainer.observe(events, first, nxt)
    _assert_same_state(trainer.head, _serving_reference(_engine(), batches))
    kept = len(trainer.window)
    assert trainer.window_events == kept * BATCH and 1_000 <= trainer.window_events < 1_000 + BATCH
    _assert_same_state(trainer.tail, _serving_reference(_engine(), batches[: len(batches) - kept]))
    spans = [(b.first_offsets[0], b.next_offsets[0]) for b in trainer.window]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "window offsets must be contiguous"
    assert spans[-1][1] == 25 * BATCH and trainer.next_offsets == {0: 25 * BATCH}


def test_a_round_trains_gates_and_adopts_a_passing_candidate():
    data = _stream()
    batches = list(_batches(data))[:12]
    trainer = _trainer()
    trainer.gate = GateConfig(max_ap_drop=1.0, max_mrr_drop=1.0)  # always passes
    for b in batches:
        trainer.observe(*b)
    assert trainer.due()
    before = copy.deepcopy(trainer.head)
    tail_before = copy.deepcopy(trainer.tail)
    result, adopted = trainer.run_round()
    assert result.decision == "published" and adopted is trainer.head
    assert result.holdout_events == 200 and result.train_events == trainer.window_events - 200
    # The gate's published side: the old weights replayed from the window's start state over
    # the training part, then scored on the holdout with the round's negatives.
    window = list(trainer.window)
    published = copy.deepcopy(tail_before)
    split = result.train_events
    events = torch.cat([b.events.src for b in window])
    assert events.numel() == trainer.window_events
    data_w, split_w = trainer._window_data()
    assert split_w == split
    for i in range(0, split, BATCH):
        TemporalStep(published).apply(data_w.events.slice(i, min(i + BATCH, split)))
    settings = EvalSettings(batch_size=BATCH, rank=True, seed=0 + 7919 * 1)
    expected = summarise(evaluate_stream(published, data_w, split, len(data_w), settings))
    assert result.published == pytest.approx(expected, abs=1e-12)
    # Adopted: new weights, state at the trainer's position; the tail keeps its state and
    # takes the new weights.
    changed = [
        k
        for k, v in trainer.head.model.state_dict().items()
        if not torch.equal(v, before.model.state_dict()[k])
    ]
    assert changed, "fine-tuning changed no weight"
    assert int(trainer.head.events_applied) == int(before.events_applied)
    assert trainer.head.ids.names(list(range(len(before.ids)))) == before.ids.names(
        list(range(len(before.ids)))
    )
    for k, v in trainer.tail.model.state_dict().items():
        assert torch.equal(v, trainer.head.model.state_dict()[k])
    n = tail_before.capacity  # PRES statistics of the candidate may have grown the tail's slots
    assert torch.equal(trainer.tail.memory.memory[:n], tail_before.memory.memory)
    assert int(trainer.tail.events_applied) == int(tail_before.events_applied)
    assert trainer.new_events == 0 and not trainer.due()
    # The head goes on from there like a server serving the new version would.
    nxt = list(_batches(data))[12]
    reference = _serving_reference(copy.deepcopy(trainer.head), [nxt])
    trainer.observe(*nxt)
    _assert_same_state(trainer.head, reference)


def test_the_gate_rule():
    trainer = _trainer()
    trainer.gate = GateConfig(max_ap_drop=0.01, max_mrr_drop=0.02)
    pub = {"n_events": 10, "ap": 0.90, "mrr": 0.50}
    assert trainer._decide(0.5, {"n_events": 10, "ap": 0.895, "mrr": 0.485}, pub)[0] == "published"
    assert trainer._decide(0.5, {"n_events": 10, "ap": 0.885, "mrr": 0.60}, pub)[0] == "rejected"
    assert trainer._decide(0.5, {"n_events": 10, "ap": 0.95, "mrr": 0.47}, pub)[0] == "rejected"
    assert trainer._decide(float("nan"), {"n_events": 10, "ap": 0.95, "mrr": 0.6}, pub)[0] == "rejected"


def test_a_restored_trainer_goes_on_like_one_that_never_stopped(tmp_path):
    data = _stream()
    batches = list(_batches(data))[:20]
    # Sequential step: a pipeline's staleness depends on thread timing, so only the sequential
    # rounds are reproducible bit for bit.
    trainer = _trainer(pipeline_depth=None)
    trainer.gate = GateConfig(max_ap_drop=1.0, max_mrr_drop=1.0)
    for b in batches[:12]:
        trainer.observe(*b)
    trainer.run_round()
    for b in batches[12:15]:
        trainer.observe(*b)
    # What the service checkpoints: the head as a checkpoint, plus the trainer's own state.
    torch.save(
        {"head": trainer.head.state_dict(), "cap": trainer.head.capacity, "rest": trainer.state()},
        tmp_path / "t.pt",
    )
    saved = torch.load(tmp_path / "t.pt", weights_only=False)
    head = MemoryEngine(MODEL, saved["cap"])
    head.load_state_dict(saved["head"])
    restored = ContinualTrainer(head, trainer.training, trainer.gate, BATCH)
    restored.restore(saved["rest"])
    assert [b.first_offsets for b in restored.window] == [b.first_offsets for b in trainer.window]
    for b in batches[15:]:
        trainer.observe(*b)
        restored.observe(*b)
    _assert_same_state(restored.head, trainer.head)
    _assert_same_state(restored.tail, trainer.tail)
    assert restored.new_events == trainer.new_events and restored.rounds == trainer.rounds == 1
    r1, _ = trainer.run_round()
    r2, _ = restored.run_round()
    assert r1.decision == r2.decision and r1.candidate == pytest.approx(r2.candidate, abs=1e-9)
    _assert_same_state(restored.head, trainer.head)


def test_a_window_without_a_holdout_skips_the_round_with_a_reason_and_trains_nothing():
    """One batch larger than the holdout: the holdout takes whole batches after the first, so it
    would be empty (before: ``torch.cat(): expected a non-empty list`` in evaluate_stream)."""
    from tgnstream.trainer.metrics import TrainerMetrics

    data = _stream()
    trainer = _trainer(window_events=600, holdout_events=200, every_events=100, min_new_events=100)
    trainer.observe(data.events.slice(0, 300), {0: 0}, {0: 300})
    assert trainer.due() and len(trainer.window) == 1
    head = copy.deepcopy(trainer.head)
    result, adopted = trainer.run_round()
    assert (result.decision, adopted, result.holdout_events) == ("skipped", None, 0)
    assert "fewer than gate.min_holdout_events" in result.reason
    _assert_same_state(trainer.head, head)
    assert trainer.new_events == 0 and not trainer.due()
    metrics = TrainerMetrics()
    metrics.observe_round(result)
    assert metrics.registry.get_sample_value("tgnstream_trainer_rounds_total", {"result": "skipped"}) == 1
    # More events make a holdout: the next round trains and gates.
    trainer.gate = GateConfig(max_ap_drop=1.0, max_mrr_drop=1.0)
    trainer.observe(data.events.slice(300, 600), {0: 300}, {0: 600})
    assert trainer.due()
    result, _ = trainer.run_round()
    assert result.decision == "published" and result.holdout_events == 300


def test_a_holdout_below_the_minimum_is_skipped_too():
    data = _stream()
    trainer = _trainer()
    trainer.gate = GateConfig(min_holdout_events=500)  # more than the 200 the window gives
    for b in list(_batches(data))[:12]:
        trainer.observe(*b)
    result, adopted = trainer.run_round()
    assert result.decision == "skipped" and adopted is None and result.holdout_events == 200


def test_evaluating_an_empty_range_is_defined():
    data = _stream()
    scores = evaluate_stream(_engine(), data, 500, 500, EvalSettings(batch_size=BATCH, rank=True))
    assert all(v.numel() == 0 for v in scores.values())
    assert summarise(scores) == {"n_events": 0}
