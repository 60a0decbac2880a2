"""Continual training on the stream (docs/architecture.md §6): a window of recent events, rounds of
fine-tuning with large PRES-corrected batches (optionally pipelined, MSPipe), and a promotion gate.

Pure engine work (tensors in, tensors out): the Kafka side (``BatchReader``), publication and
metrics are wired by ``trainer.service``. Three engines share one architecture:

* ``head``: the current weights (the last published, or the start model) and the node state at
  the trainer's position on the topic. Every stream batch is applied to it with the serving
  apply (``TemporalStep.prepare_live`` / ``commit_live``), exactly as a server applies it, so a
  server replaying the same batches with the same weights reaches the same state.
* ``tail``: the same weights with the node state at the start of the window. A batch that
  leaves the window is applied to it, so fine-tuning can replay the window from its start.
* a round's ``candidate``: a copy of the head's weights, trained for ``epochs`` passes over the
  window minus its newest ``holdout_events`` (each pass restarts from the tail's state), then
  scored on the holdout against the published weights replayed over the same events from the
  same state, with the same negatives (``evaluate_stream``: the project's one protocol).

A candidate that is not worse than the published weights by more than the gate's margins (AP
and MRR) becomes the head (its state has run through the whole window, so it stands at the
trainer's position); otherwise it is dropped and the head goes on.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch, TemporalDataset
from tgnstream.core.negatives import NegativeSampler
from tgnstream.core.step import TemporalStep
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream, summarise
from tgnstream.trainer.continual_config import FineTuneConfig, GateConfig
from tgnstream.trainer.distributed import ShardedBatches, run_epoch_distributed, wrap
from tgnstream.trainer.offline import make_batches, make_optimizer, run_epoch

__all__ = ["ContinualTrainer", "RoundResult", "WindowBatch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowBatch:
    """One stream batch of the window: ``events`` (``[B]``, time-ordered, the trainer's dense
    ids, on CPU) and the offsets it spans: per partition, its first offset and the next one."""

    events: EventBatch
    first_offsets: dict[int, int]
    next_offsets: dict[int, int]


@dataclass(frozen=True)
class RoundResult:
    """What one round did. ``decision``: ``published``, ``rejected`` (by the gate) or ``skipped``
    (no holdout to gate on: nothing trained); ``reason`` in words;
    ``candidate`` / ``published``: the gate's metrics (``ap``, ``auc``, ``mrr``, ``hits@10``,
    ``n_events``) of the two models on the holdout; ``loss``: the last epoch's mean training loss;
    ``train_events``: events per epoch; ``train_events_per_s``: training throughput;
    ``staleness``: the pipeline's staleness statistics (empty without a pipeline)."""

    decision: str
    reason: str
    candidate: dict
    published: dict
    loss: float
    train_events: int
    holdout_events: int
    train_events_per_s: float
    seconds: float
    staleness: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "decision": self.decision,
            "reason": self.reason,
            "candidate": self.candidate,
            "published": self.published,
            "loss": self.loss,
            "train_events": self.train_events,
            "holdout_events": self.holdout_events,
            "train_events_per_s": self.train_events_per_s,
            "seconds": self.seconds,
            "staleness": self.staleness,
        }


def _serving_apply(engine: MemoryEngine, events: EventBatch) -> None:
    """Apply a stream batch as a server's ingest does (apply + fold, ``prepare/commit_live``)."""
    if len(events):
        engine.ensure_capacity(int(torch.maximum(events.src.max(), events.dst.max())) + 1)
        step = TemporalStep(engine)
        step.commit_live(step.prepare_live(events.to(engine.device)))


class ContinualTrainer:
    """The window, the rounds and the gate over one engine (see the module docstring).

    Args:
        engine: the start: current weights and the node state at ``next_offsets``.
        training, gate: settings.
        stream_batch: the stream's batch size in records (``batch_max_events``): the gate scores
            and replays the holdout in batches of this size, the granularity a server applies.
        optimizer_state: Adam's state to continue from (a restored trainer).
    """

    def __init__(
        self,
        engine: MemoryEngine,
        training: FineTuneConfig,
        gate: GateConfig,
        stream_batch: int,
        optimizer_state: dict | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        self.rank, self.world = rank, world
        self.training = training
        self.gate = gate
        self.stream_batch = int(stream_batch)
        self.head = engine.eval()
        self.tail = copy.deepcopy(engine).eval()
        self.window: deque[WindowBatch] = deque()
        self.window_events = 0
        self.new_events = 0  # since the last round
        self.rounds = 0
        self.optimizer_state = optimizer_state
        self._last_round_at = time.monotonic()

    # ------------------------------------------------------------------------------ stream
    @property
    def next_offsets(self) -> dict[int, int]:
        """Per partition, the next offset after the newest batch observed (empty before any)."""
        out: dict[int, int] = {}
        for b in self.window:
            out.update(b.next_offsets)
        return out

    def observe(
        self, events: EventBatch, first_offsets: dict[int, int], next_offsets: dict[int, int]
    ) -> None:
        """Apply one stream batch to the head and add it to the window; batches that leave the
        window are applied to the tail."""
        _serving_apply(self.head, events)
        self.window.append(WindowBatch(events.to("cpu"), dict(first_offsets), dict(next_offsets)))
        self.window_events += len(events)
        self.new_events += len(events)
        while (
            len(self.window) > 1
            and self.window_events - len(self.window[0].events) >= self.training.window_events
        ):
            old = self.window.popleft()
            self.window_events -= len(old.events)
            _serving_apply(self.tail, old.events)

    def due(self, now: float | None = None) -> bool:
        """A round is due: enough new events (or enough time with some), and a window that
        holds more than the holdout."""
        t = self.training
        if self.new_events < t.min_new_events or self.window_events <= t.holdout_events:
            return False
        now = time.monotonic() if now is None else now
        return self.new_events >= t.every_events or now - self._last_round_at >= t.every_seconds

    # ------------------------------------------------------------------------------- round
    def _window_data(self) -> tuple[TemporalDataset, int]:
        """The window as a dataset (the head's dense ids) and where its holdout starts (a batch
        boundary: at least ``holdout_events`` newest events)."""
        batches = list(self.window)
        events = EventBatch.concat([b.events for b in batches])
        holdout, split = 0, len(batches)
        while split > 1 and holdout < self.training.holdout_events:
            split -= 1
            holdout += len(batches[split].events)
        start = len(events) - holdout
        destinations = self.head.destinations().cpu()
        sources = torch.unique(events.src)
        bipartite = not bool(torch.isin(sources, destinations).any())
        data = TemporalDataset(
            events=events,
            labels=torch.zeros(len(events), dtype=torch.long),
            num_nodes=max(len(self.head.ids), int(events.src.max()) + 1, int(events.dst.max()) + 1),
            dst_nodes=destinations,
            bipartite=bipartite,
            name="window",
        )
        return data, start

    def run_round(self) -> tuple[RoundResult, MemoryEngine | None]:
        """Fine-tune a candidate on the window and gate it. Returns the result and, when the
        gate passed, the candidate (already adopted as the head). A round is a pure function of
        the trainer's state (its own RNG stream: dropout draws are seeded per round)."""
        devices = [self.head.device] if self.head.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.training.seed + 104_729 * (self.rounds + 1))
            return self._run_round()

    def _run_round(self) -> tuple[RoundResult, MemoryEngine | None]:
        started = time.perf_counter()
        cfg = self.training
        data, split = self._window_data()
        if len(data) - split < self.gate.min_holdout_events:
            return self._skip(data, split, started), None
        device = self.head.device
        candidate = copy.deepcopy(self.head)
        optimizer = make_optimizer(candidate.model.parameters(), cfg.lr)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        step = TemporalStep(candidate, cfg.pres_beta)
        pool = data.dst_nodes if data.bipartite else torch.arange(data.num_nodes)
        sampler = NegativeSampler(
            pool, seed=cfg.seed + self.rounds, device=device, sampling_correction=cfg.sampling_correction
        )
        loss, staleness, train_s = float("nan"), {}, 0.0
        ddp = wrap(step) if self.world > 1 else None
        for _ in range(cfg.epochs):
            candidate.copy_state_from(self.tail)
            t0 = time.perf_counter()
            if ddp is not None:
                # Ranks split each batch (sequential step: the pipeline's thread is not used).
                batches = ShardedBatches(
                    step,
                    data,
                    split,
                    cfg.batch_size,
                    sampler,
                    cfg.neg_historical_ratio,
                    rank=self.rank,
                    world=self.world,
                )
                loss = run_epoch_distributed(ddp, batches, optimizer, reset=False)
            else:
                batches = make_batches(
                    step, data, split, cfg.batch_size, sampler, cfg.neg_historical_ratio, cfg.pipeline_depth
                )
                try:
                    loss = run_epoch(step, batches, optimizer, reset=False)
                finally:
                    close = getattr(batches, "close", None)
                    if close is not None:
                        close()
            train_s += time.perf_counter() - t0
            staleness = batches.staleness.as_dict() if cfg.pipeline_depth is not None else {}
        settings = EvalSettings(
            batch_size=self.stream_batch,
            rank=True,
            rank_all_max=self.gate.rank_all_max,
            sampled_negatives=self.gate.sampled_negatives,
            seed=cfg.seed + 7919 * (self.rounds + 1),
        )
        cand_scores = evaluate_stream(candidate, data, split, len(data), settings)
        published = copy.deepcopy(self.tail)
        replay = TemporalStep(published)  # the published weights over the window, unscored
        for i in range(0, split, self.stream_batch):
            replay.apply(data.events.slice(i, min(i + self.stream_batch, split)).to(device))
        pub_scores = evaluate_stream(published, data, split, len(data), settings)
        cand_m, pub_m = summarise(cand_scores), summarise(pub_scores)
        decision, reason = self._decide(loss, cand_m, pub_m)
        if self.world > 1:  # every rank computed the same; rank 0's word is final
            agreed = [decision, reason]
            dist.broadcast_object_list(agreed, src=0)
            decision, reason = agreed
        self.rounds += 1
        self.new_events = 0
        self._last_round_at = time.monotonic()
        adopted = None
        if decision == "published":
            candidate.ids = copy.deepcopy(self.head.ids)
            self.head = candidate.eval()
            # The window's first state stays (it is what the log produced); its weights move on.
            self.tail.copy_learned_from(candidate)
            self.optimizer_state = optimizer.state_dict()
            adopted = candidate
        result = RoundResult(
            decision,
            reason,
            cand_m,
            pub_m,
            float(loss),
            split,
            len(data) - split,
            cfg.epochs * split / train_s if train_s > 0 else 0.0,
            time.perf_counter() - started,
            staleness,
        )
        log.info(
            "round %d: %s (%s); holdout AP %.4f vs %.4f, MRR %.4f vs %.4f (candidate vs published); "
            "loss %.4f, %d train events at %.0f ev/s",
            self.rounds,
            decision,
            reason,
            cand_m.get("ap", float("nan")),
            pub_m.get("ap", float("nan")),
            cand_m.get("mrr", float("nan")),
            pub_m.get("mrr", float("nan")),
            result.loss,
            split,
            result.train_events_per_s,
        )
        return result, adopted

    def _skip(self, data: TemporalDataset, split: int, started: float) -> RoundResult:
        """No gate without a holdout: a window of one batch (or of batches larger than the holdout
        allows) leaves none. Nothing is trained; the round waits for more events."""
        holdout = len(data) - split
        reason = (
            f"the holdout would hold {holdout} events, fewer than gate.min_holdout_events "
            f"({self.gate.min_holdout_events}): the window has {len(self.window)} batch(es) of "
            f"{len(data)} events and the holdout takes whole batches after the first"
        )
        self.new_events = 0
        self._last_round_at = time.monotonic()
        log.warning("round skipped: %s", reason)
        return RoundResult(
            "skipped", reason, {}, {}, float("nan"), split, holdout, 0.0, time.perf_counter() - started
        )

    def _decide(self, loss: float, cand: dict, pub: dict) -> tuple[str, str]:
        g = self.gate
        if not math.isfinite(loss):
            return "rejected", f"training loss is {loss}"
        if cand.get("n_events", 0) == 0:
            return "rejected", "empty holdout"
        ap_drop = pub["ap"] - cand["ap"]
        mrr_drop = pub["mrr"] - cand["mrr"]
        if ap_drop > g.max_ap_drop:
            return "rejected", f"AP {ap_drop:.4f} below the published model's (max drop {g.max_ap_drop})"
        if mrr_drop > g.max_mrr_drop:
            return "rejected", f"MRR {mrr_drop:.4f} below the published model's (max drop {g.max_mrr_drop})"
        return "published", f"AP {-ap_drop:+.4f}, MRR {-mrr_drop:+.4f} against the published model"

    # ------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        """Everything a restarted trainer needs besides the head's checkpoint (see ``service``):
        the tail's state, the window and its offsets, the optimizer, counters."""
        return {
            "tail": {k: v.detach().cpu() for k, v in self.tail.state_dict().items()},
            "tail_capacity": self.tail.capacity,
            "window": [
                {
                    "src": b.events.src,
                    "dst": b.events.dst,
                    "t": b.events.t,
                    "feats": b.events.feats,
                    "first_offsets": b.first_offsets,
                    "next_offsets": b.next_offsets,
                }
                for b in self.window
            ],
            "new_events": self.new_events,
            "rounds": self.rounds,
            "optimizer": self.optimizer_state,
        }

    def restore(self, state: dict) -> None:
        """Undo ``state()`` onto a trainer built from the head's checkpoint."""
        tail = MemoryEngine(self.head.config, state["tail_capacity"], self.head.device)
        tail.load_state_dict(state["tail"])
        self.tail = tail.eval()
        self.window = deque(
            WindowBatch(
                EventBatch(w["src"], w["dst"], w["t"], w["feats"]), w["first_offsets"], w["next_offsets"]
            )
            for w in state["window"]
        )
        self.window_events = sum(len(b.events) for b in self.window)
        self.new_events = int(state["new_events"])
        self.rounds = int(state["rounds"])
        self.optimizer_state = state["optimizer"]
