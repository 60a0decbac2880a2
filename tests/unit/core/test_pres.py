"""PRES: statistics against a naive per-node computation, the fusion formula by hand, the
gamma = beta = 0 step against the plain step (bitwise), and a coherence term with gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.negatives import NegativeSampler
from tgnstream.core.pres import TransitionStats, coherence_loss
from tgnstream.core.step import TemporalStep
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream
from tgnstream.core.synthetic import generate_stream

SMALL = dict(memory_dim=8, time_dim=8, embedding_dim=8, decoder_hidden=8, num_neighbors=4)


def _stream(n=600, nodes=40, seed=0) -> EventBatch:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(nodes, (n,), generator=g)
    dst = (src + 1 + torch.randint(nodes - 1, (n,), generator=g)) % nodes
    t = torch.cumsum(torch.rand(n, generator=g, dtype=torch.float64) * 5, 0)
    return EventBatch(src, dst, t, torch.zeros(n, 0))


def test_welford_statistics_equal_a_naive_per_node_computation():
    g = torch.Generator().manual_seed(1)
    stats = TransitionStats(capacity=12, memory_dim=5)
    seen: dict[int, list[np.ndarray]] = {}
    for _ in range(60):
        nodes = torch.randperm(12, generator=g)[: int(torch.randint(1, 12, (1,), generator=g))]
        delta = torch.randn(nodes.numel(), 5, generator=g)
        stats.update(nodes, delta)
        for node, d in zip(nodes.tolist(), delta.double().numpy()):
            seen.setdefault(node, []).append(d)
    for node in range(12):
        obs = np.array(seen.get(node, np.zeros((0, 5))))
        assert int(stats.count[node]) == len(obs)
        if len(obs):
            np.testing.assert_allclose(stats.mean[node].double().numpy(), obs.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                stats.variance(torch.tensor([node]))[0].double().numpy(), obs.var(0), rtol=1e-4, atol=1e-6
            )


def _memory_before_fold(engine: MemoryEngine) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per node with a pending message: (memory, mail, dt) as the naive fold would read them."""
    mem = engine.memory
    out = {}
    for node in mem.has_mail.nonzero().squeeze(1).tolist():
        dt = max(0.0, float(mem.mail_ts[node] - mem.last_update[node]))
        out[node] = (mem.memory[node].clone(), mem.mail[node].clone(), dt)
    return out


def test_training_statistics_equal_naive_per_node_transitions():
    """Drive training steps; independently fold every consumed message one node at a time with
    the same weights and keep per-node lists of (raw update - previous memory)."""
    torch.manual_seed(0)
    stream = _stream()
    engine = MemoryEngine(ModelConfig.preset("tgn", **SMALL, pres=True), capacity=40)
    step = TemporalStep(engine, 0.1)
    opt = torch.optim.Adam(engine.model.parameters(), lr=1e-2)
    sampler = NegativeSampler(torch.arange(40), seed=0)
    engine.train()
    engine.model.embedding.dropout.p = 0.0
    observed: dict[int, list[np.ndarray]] = {}
    for i in range(0, len(stream), 50):
        batch = stream.slice(i, i + 50)
        pending = _memory_before_fold(engine)
        scored = step.score_batch(batch, sampler.sample(batch.src))
        loss = step.loss(scored)
        folded = (
            set(scored.fresh.nodes[scored.fresh.folded].tolist())
            if scored.fresh.folded is not None
            else set()
        )
        with torch.no_grad():
            for node in sorted(folded):
                prev, mail, dt = pending[node]
                raw = engine.model.update_memory(
                    mail.unsqueeze(0), torch.tensor([dt], dtype=torch.float64), prev.unsqueeze(0)
                )[0]
                observed.setdefault(node, []).append((raw - prev).double().numpy())
        step.apply(scored, learn=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert len(observed) > 20
    for node, obs in observed.items():
        obs = np.array(obs)
        assert int(engine.pres.count[node]) == len(obs), node
        np.testing.assert_allclose(engine.pres.mean[node].double().numpy(), obs.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            engine.pres.variance(torch.tensor([node]))[0].double().numpy(), obs.var(0), rtol=1e-3, atol=1e-5
        )
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[list(observed)] = False
    assert int(engine.pres.count[untouched].sum()) == 0


def test_fusion_by_hand_and_only_where_statistics_exist():
    torch.manual_seed(0)
    engine = MemoryEngine(ModelConfig.preset("tgn", **SMALL, pres=True, pres_gamma=0.9), capacity=4)
    engine.eval()
    TemporalStep(engine).apply(EventBatch.from_lists([0], [1], [1.0]))
    prev = engine.memory.memory[[0, 1]].clone()
    mail = engine.memory.mail[[0, 1]].clone()
    mean = torch.randn(2, 8)
    engine.pres.mean[[0, 1]] = mean
    engine.pres.count[0] = 3  # node 1 has no statistics yet: its update stays unfused
    fresh = engine.fresh_memory(torch.tensor([0, 1]))
    with torch.no_grad():
        raw = engine.model.update_memory(mail, torch.tensor([1.0, 1.0], dtype=torch.float64), prev)
    assert torch.allclose(fresh.memory[0], 0.9 * (prev[0] + mean[0]) + 0.1 * raw[0], atol=1e-6)
    assert torch.allclose(fresh.memory[1], raw[1], atol=1e-6)
    assert torch.allclose(fresh.raw_memory, raw, atol=1e-6)


def _train(pres: bool, batches: int = 8) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    stream = _stream(seed=3)
    cfg = ModelConfig.preset("tgn", **SMALL, pres=pres, pres_gamma=0.0)
    engine = MemoryEngine(cfg, capacity=40)
    step = TemporalStep(engine, coherence_weight=0.0)
    opt = torch.optim.Adam(engine.model.parameters(), lr=1e-2)
    sampler = NegativeSampler(torch.arange(40), seed=0)
    engine.train()
    losses = []
    for i in range(0, 50 * batches, 50):
        batch = stream.slice(i, i + 50)
        scored = step.score_batch(batch, sampler.sample(batch.src))
        loss = step.loss(scored)
        step.apply(scored, learn=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, engine.state_dict()


def test_gamma_zero_beta_zero_is_the_plain_step_bitwise():
    plain_losses, plain_state = _train(pres=False)
    pres_losses, pres_state = _train(pres=True)
    assert pres_losses == plain_losses
    assert any(k.startswith("pres.") for k in pres_state)
    for key, value in plain_state.items():
        assert torch.equal(pres_state[key], value), key


def test_coherence_term_has_gradient_on_the_updater():
    torch.manual_seed(0)
    stream = _stream(seed=5)
    engine = MemoryEngine(ModelConfig.preset("tgn", **SMALL, pres=True), capacity=40)
    step = TemporalStep(engine, 0.1)
    sampler = NegativeSampler(torch.arange(40), seed=0)
    engine.train()
    for i in range(0, 200, 50):  # give nodes a memory, so their next update has a direction
        batch = stream.slice(i, i + 50)
        scored = step.score_batch(batch, sampler.sample(batch.src))
        step.apply(scored, learn=True)
    batch = stream.slice(200, 250)
    scored = step.score_batch(batch, sampler.sample(batch.src))
    term = coherence_loss(scored.fresh.raw_memory, scored.fresh.prev_memory)
    assert 0 < float(term.detach()) < 2
    engine.model.zero_grad()
    term.backward()
    for name in ("weight_ih", "weight_hh"):
        grad = getattr(engine.model.updater, name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    # ... and beta scales it into the training loss.
    with_beta = step.loss(step.score_batch(batch, sampler.sample(batch.src)))
    step.coherence_weight = 0.0
    without = step.loss(step.score_batch(batch, sampler.sample(batch.src)))
    assert float(with_beta.detach()) != float(without.detach())


def test_evaluation_never_teaches_the_statistics():
    data = generate_stream(num_events=1500, num_src=30, num_dst=20, bipartite=True, seed=2)
    engine = MemoryEngine(ModelConfig.preset("tgn", **SMALL, pres=True), capacity=data.num_nodes)
    engine.pres.count[:5] = 2
    before = {k: v.clone() for k, v in engine.pres.state_dict().items()}
    evaluate_stream(engine, data, 0, len(data), EvalSettings(rank=False))
    for k, v in engine.pres.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("learn", [False, True])
def test_gamma_is_a_parameter_only_when_learnt(learn):
    engine = MemoryEngine(ModelConfig.preset("tgn", **SMALL, pres=True, pres_learn_gamma=learn), capacity=4)
    params = dict(engine.model.named_parameters())
    assert ("pres_gamma_logit" in params) is learn
    assert abs(float(engine.model.pres_gamma().detach()) - 0.9) < 1e-4
