"""The pipelined batch source (MSPipe): exact at depth 0, bounded and monotone above it."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.inputs import EmbeddingInputs, MemoryRows
from tgnstream.core.loaders import load_dataset
from tgnstream.core.negatives import NegativeSampler
from tgnstream.core.step import TemporalStep
from tgnstream.trainer.offline import make_batches, make_optimizer, run_epoch
from tgnstream.trainer.pipeline import PipelinedBatches, mitigate_staleness


@pytest.fixture(scope="module")
def wiki(wikipedia_csv):
    return load_dataset(wikipedia_csv, limit=3000)


def _digest(engine) -> str:
    h = hashlib.sha256()
    for k, v in sorted(engine.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _run(data, depth, pair=False, pres=False, eager=False, watch=None, batch_size=100, epochs=2):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tgn", width=32, pair_features=pair, pres=pres)
    engine = MemoryEngine(cfg, capacity=data.num_nodes)
    opt = make_optimizer(engine.model.parameters(), 1e-3)
    step = TemporalStep(engine, 0.1)
    sampler = NegativeSampler(data.dst_nodes, seed=0)
    losses, stats = [], []
    for _ in range(epochs):
        batches = make_batches(step, data, 2000, batch_size, sampler, 0.5 if pair else 0.0, depth, 0.9, eager)
        if watch is not None:
            watch(batches)
        losses.append(run_epoch(step, batches, opt))
        stats.append(batches.staleness)
    return losses, _digest(engine), stats


@pytest.fixture
def one_torch_thread():
    """Float sums are ordered by the intra-op thread count, and the pipeline's producer runs on
    one thread fewer than the caller's: with one thread both paths reduce alike (the result then
    no longer depends on what earlier tests left torch's thread count at)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("pair,pres", [(False, False), (True, True)])
def test_depth_zero_is_the_sequential_step_bitwise(wiki, pair, pres, one_torch_thread):
    seq_losses, seq_state, _ = _run(wiki, None, pair, pres)
    pipe_losses, pipe_state, stats = _run(wiki, 0, pair, pres)
    assert pipe_losses == seq_losses
    assert pipe_state == seq_state
    assert all(s.max_staleness == 0 and s.stale_nodes == 0 for s in stats)


@pytest.mark.parametrize("depth", [1, 2])
def test_staleness_is_bounded_and_times_never_move_backwards(wiki, depth):
    violations = []

    def watch(batches: PipelinedBatches):
        engine = batches.step.engine
        apply = batches.apply

        def checked_apply(scored):
            before_last = engine.memory.last_update.clone()
            before_mail = engine.memory.mail_ts.clone()
            apply(scored)
            if bool((engine.memory.last_update < before_last).any()):
                violations.append("last_update decreased")
            if bool((engine.memory.mail_ts < before_mail).any()):
                violations.append("mail_ts decreased")

        batches.apply = checked_apply

    losses, _, stats = _run(wiki, depth, eager=True, watch=watch)
    assert not violations, violations[:3]
    for s in stats:
        assert s.max_staleness <= depth
        assert sum(s.batches) == 20
    # Eager fetching does read stale memory (otherwise this test would show nothing).
    assert max(s.max_staleness for s in stats) >= 1
    assert sum(s.stale_nodes for s in stats) > 0 and sum(s.mitigated for s in stats) > 0
    assert all(loss == loss and loss < 1.4 for loss in losses)  # finite, below chance (2 ln 2)


def test_mitigation_by_hand():
    # Rows: nodes 3 (query, stale), 5 and 7 (its neighbours), 9 (neighbour, older than 3).
    memory = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0], [8.0, 8.0]])
    rows = MemoryRows(
        nodes=torch.tensor([3, 5, 7, 9]),
        memory=memory,
        last_update=torch.tensor([5.0, 6.0, 7.0, 1.0], dtype=torch.float64),
        pending=torch.zeros(0, dtype=torch.long),
        mail=torch.zeros(0, 4),
        mail_ts=torch.zeros(0, dtype=torch.float64),
        pres_mean=None,
        pres_count=None,
    )
    inputs = EmbeddingInputs(
        inv=torch.tensor([0]),
        query_nodes=torch.tensor([3]),
        t_query=torch.tensor([10.0], dtype=torch.float64),
        nodes=rows.nodes,
        q_idx=torch.tensor([0]),
        nb_idx=torch.tensor([[1, 2, 3, 0]]),
        nb_dt=torch.zeros(1, 4, dtype=torch.float64),
        nb_feats=torch.zeros(1, 4, 0),
        mask=torch.tensor([[True, True, True, False]]),
    )
    stale = torch.tensor([True, False, False, False])
    fixed, n = mitigate_staleness(rows, inputs, stale, 0.9)
    # Neighbours updated after node 3: 5 and 7 (9 is older); mean [2, 3].
    assert n == 1
    assert torch.allclose(fixed.memory[0], torch.tensor([0.9 * 1 + 0.1 * 2, 0.1 * 3]))
    assert torch.equal(fixed.memory[1:], memory[1:])
    assert torch.equal(rows.memory, memory)  # the input rows are not modified
    none, n = mitigate_staleness(rows, inputs, torch.zeros(4, dtype=torch.bool), 0.9)
    assert n == 0 and torch.equal(none.memory, memory)


def test_producer_failure_surfaces_in_the_trainer(wiki):
    torch.manual_seed(0)
    engine = MemoryEngine(ModelConfig.preset("tgn", width=16), capacity=wiki.num_nodes)
    step = TemporalStep(engine)
    sampler = NegativeSampler(wiki.dst_nodes, seed=0)

    def broken(*args, **kwargs):
        raise RuntimeError("sampler exploded")

    sampler.sample = broken
    batches = make_batches(step, wiki, 1000, 200, sampler, 0.0, 1)
    with pytest.raises(RuntimeError, match="producer failed") as info:
        run_epoch(step, batches, make_optimizer(engine.model.parameters(), 1e-3))
    assert "sampler exploded" in str(info.value.__cause__)


def test_pipeline_needs_capacity_for_every_node(wiki):
    engine = MemoryEngine(ModelConfig.preset("tgn", width=16), capacity=10)
    with pytest.raises(ValueError, match="capacity"):
        make_batches(TemporalStep(engine), wiki, 1000, 200, NegativeSampler(wiki.dst_nodes), 0.0, 0)


def test_thread_setting_is_restored_after_the_epoch(wiki):
    """torch's intra-op setting is process-wide: the pipeline lowers it for its epoch only."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        torch.manual_seed(0)
        engine = MemoryEngine(ModelConfig.preset("tgn", width=16), capacity=wiki.num_nodes)
        step = TemporalStep(engine)
        batches = make_batches(step, wiki, 600, 200, NegativeSampler(wiki.dst_nodes), 0.0, 0)
        for gathered in batches:
            seen.append(torch.get_num_threads())
            batches.apply(step.score(gathered))
        assert seen == [1, 1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
