"""Composition root of ``tgnstream trainer``: the topic (shared stream path) -> the continual
trainer -> published versions, with checkpoints, metrics and status lines.

Start, in order of preference: the trainer's own checkpoint (weights, head and tail states,
window, optimizer, the offsets it reflects: a restart resumes exactly there); else the newest
published version (its weights and state, from its offsets, with an empty window); else the
configured start model with an empty state, from the start of the topic.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tgnstream.core.checkpoint import load_checkpoint, save_checkpoint
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.spec import build_engine
from tgnstream.runtime.health import Readiness
from tgnstream.runtime.sysinfo import resolve_device
from tgnstream.stream.assemble import RecordRejection, known_in
from tgnstream.stream.consumers import TopicUnavailableError
from tgnstream.stream.reader import BatchReader
from tgnstream.trainer.continual import ContinualTrainer
from tgnstream.trainer.continual_config import StartModel, TrainerConfig
from tgnstream.trainer.metrics import TrainerMetrics

__all__ = ["TrainerService", "start_engine"]

log = logging.getLogger(__name__)
# Waiting for a missing topic or a silent broker: first retry after 1 s, then doubling up to 30 s.
_RETRY_INITIAL_S = 1.0
_RETRY_MAX_S = 30.0

CHECKPOINT_NAME = "trainer.pt"


def start_engine(start: StartModel, device: torch.device) -> MemoryEngine:
    """The configured start model with an empty state (PRES turned on when asked)."""
    if start.checkpoint is not None:
        engine, _ = load_checkpoint(start.checkpoint, device)
        engine.reset_state()
    else:
        torch.manual_seed(start.seed)
        engine = build_engine(start.model_spec(), device, 1024)
    return with_pres(engine, start.pres, start.pres_gamma)


def with_pres(engine: MemoryEngine, pres: bool, gamma: float = 0.0) -> MemoryEngine:
    """``engine`` with PRES on (statistics start empty, fusion weight ``gamma``) when ``pres``
    and it is off; an engine that has PRES keeps its settings."""
    if not pres or engine.config.pres:
        return engine.eval()
    config = engine.config.model_copy(update={"pres": True, "pres_gamma": gamma})
    out = build_engine(config, engine.device, engine.capacity)
    missing, unexpected = out.load_state_dict(engine.state_dict(), strict=False)
    if unexpected or any(not k.startswith(("pres.", "model.pres_")) for k in missing):
        raise ValueError(
            f"cannot turn PRES on for this checkpoint (missing {missing}, unexpected {unexpected})"
        )
    return out.eval()


class TrainerService:
    """The trainer process: reads, trains, gates, publishes, checkpoints (see the module doc)."""

    def __init__(
        self, cfg: TrainerConfig, metrics: TrainerMetrics | None = None, rank: int = 0, world: int = 1
    ):
        self.cfg = cfg
        # Under torchrun every rank reads the topic (the same batches), trains its shard of each
        # batch and keeps the same state; rank 0 alone writes checkpoints and publishes.
        self.rank, self.world = rank, world
        self.device = resolve_device(cfg.device)
        self.metrics = metrics if metrics is not None else TrainerMetrics()
        self.store = cfg.publish.open_store()
        self.checkpoint_path = Path(cfg.checkpoints.dir) / CHECKPOINT_NAME
        self.topic = cfg.stream.kafka.topic
        self._stop = threading.Event()
        self.readiness = Readiness()
        self.published_version: str | None = None
        # A round's adopted candidate that is checkpointed but perhaps not yet published:
        # {"parent": ..., "gate": ...}. Publication happens after the checkpoint, so a crash in
        # between is finished at restart (published once, never twice, never lost).
        self.pending: dict | None = None
        self.topic_id: str | None = None
        self.trainer, offsets = self._restore()
        self.positions: dict[int, int] = dict(offsets)
        self._since_checkpoint = 0
        self._checkpoint_at = time.monotonic()
        if self.pending is not None and self.rank == 0:
            self._finish_publication()

    # ------------------------------------------------------------------------------ start
    def _restore(self) -> tuple[ContinualTrainer, dict[int, int]]:
        cfg = self.cfg
        if self.checkpoint_path.is_file():
            head, meta = load_checkpoint(self.checkpoint_path, self.device)
            trainer = self._trainer(head.eval())
            trainer.restore(meta["trainer"])
            if meta.get("topic") not in (None, self.topic):
                raise ValueError(
                    f"{self.checkpoint_path} was written for topic {meta['topic']!r}, not {self.topic!r}: "
                    "use another checkpoints.dir, or remove it to start over"
                )
            self.published_version = meta.get("published_version")
            self.pending = meta.get("pending_publish")
            self.topic_id = meta.get("topic_id")
            offsets = {int(p): int(o) for p, o in meta["next_offsets"].items()}
            log.info(
                "resuming from %s: %d events in the window, offsets %s, published version %s",
                self.checkpoint_path,
                trainer.window_events,
                offsets,
                self.published_version,
            )
            return trainer, offsets
        latest = self.store.load_latest(self.device)
        if latest is not None:
            published, engine = latest
            if published.topic and published.topic != self.topic:
                raise ValueError(
                    f"the newest version in {self.store.root} ({published.version}) was trained on topic "
                    f"{published.topic!r}, not {self.topic!r}"
                )
            self.published_version = published.version
            self.topic_id = published.topic_id
            log.info(
                "starting from published version %s at offsets %s", published.version, published.next_offsets
            )
            engine = with_pres(engine, cfg.start.pres, cfg.start.pres_gamma)
            return self._trainer(engine), published.next_offsets
        engine = start_engine(cfg.start, self.device)
        what = cfg.start.checkpoint or f"fresh {cfg.start.preset} weights (seed {cfg.start.seed})"
        log.info("starting from %s with an empty state, from the start of the topic", what)
        if self.rank == 0:
            # Published at once (empty state, offsets: the topic's start), so servers configured
            # with this models directory can start serving the architecture that follows.
            first = self.store.publish(
                engine, {}, self.topic, None, gate={"decision": "start model", "from": str(what)}
            )
            self.published_version = first.version
            log.info("published the start model as %s", first.version)
        return self._trainer(engine), {}

    def _trainer(self, engine: MemoryEngine) -> ContinualTrainer:
        cfg = self.cfg
        return ContinualTrainer(
            engine, cfg.training, cfg.gate, cfg.stream.batch_max_events, rank=self.rank, world=self.world
        )

    # ------------------------------------------------------------------------------- loop
    def stop(self) -> None:
        self._stop.set()

    def _register(self, names: list[str]) -> torch.Tensor:
        ids = self.trainer.head.ids
        dense, _ = ids.lookup(names, create=True)
        ids.flush()
        return dense

    def _reject(self, rejection: RecordRejection) -> None:
        self.metrics.rejected.labels(rejection.reason).inc()

    def run(self) -> None:
        """Read, train and publish until ``stop()``; a final checkpoint on the way out."""
        reader = self._open_reader()
        if reader is None:  # stopped while waiting for the topic
            return
        if reader.fetcher.topic_id is not None:
            self.topic_id = reader.fetcher.topic_id
        self.positions = dict(reader.next_offsets)
        bar = None
        last_status = time.monotonic()
        try:
            while not self._stop.is_set():
                for batch in reader.poll():
                    first = {p: self.positions.get(p, 0) for p in batch.next_offsets}
                    self.trainer.observe(batch.events, first, batch.next_offsets)
                    self.positions.update(batch.next_offsets)
                    self.metrics.events.inc(len(batch.events))
                    self._since_checkpoint += batch.records
                    if self._agree(self.trainer.due()):
                        self._round()
                lag = reader.lag()
                self.metrics.lag_records.set(lag)
                self.metrics.window_events.set(self.trainer.window_events)
                bar = self._progress(bar, lag)
                if self.world == 1 and self.trainer.due():  # time-based, between batches
                    self._round()
                elif self._checkpoint_due():
                    if self.checkpoint() and self.pending is not None:
                        self._finish_publication()
                now = time.monotonic()
                if now - last_status >= self.cfg.status_every_s:
                    last_status = now
                    self._status(lag)
        finally:
            if bar is not None:
                bar.close()
            reader.close()
            self.checkpoint()

    def _open_reader(self) -> BatchReader | None:
        """The reader at the trainer's positions. A missing topic or a broker that does not
        answer is retried with backoff (the reason in the log and in readiness) until it works
        or ``stop()``; None when stopped first."""
        head = self.trainer.head
        delay = _RETRY_INITIAL_S
        while not self._stop.is_set():
            try:
                reader = BatchReader(
                    self.cfg.stream,
                    self.positions,
                    head.config.edge_dim,
                    float(head.watermark),
                    self._register,
                    device="cpu",
                    topic_id=self.topic_id,
                    on_reject=self._reject,
                    known=known_in(lambda: self.trainer.head.ids),
                )
            except TopicUnavailableError as e:  # not a log gap or a bug: those must not loop
                if self._stop.is_set():
                    break
                self.readiness.set("topic_unavailable", str(e))
                log.error("cannot read the topic: %s; retrying in %.0f s", e, delay)
                self._stop.wait(delay)
                delay = min(2 * delay, _RETRY_MAX_S)
                continue
            self.readiness.set("topic_unavailable", None)
            return reader
        return None

    def _agree(self, due: bool) -> bool:
        """Rank 0's decision, on every rank (ranks see the same batches, so they call this equally
        often; time-based decisions may differ between ranks)."""
        if self.world == 1:
            return due
        decision = [due]
        torch.distributed.broadcast_object_list(decision, src=0)
        return bool(decision[0])

    def _progress(self, bar, lag: int):
        """A progress bar while more than a few batches behind the log end."""
        if not self.cfg.progress:
            return None
        behind = lag > 5 * self.cfg.stream.batch_max_events
        if behind and bar is None:
            bar = tqdm(total=lag, desc="catching up", unit="rec", leave=False)
        if bar is not None:
            done = max(0, bar.total - lag)
            if lag > bar.total - bar.n:
                bar.total = bar.n + lag
            bar.update(max(0, done - bar.n))
            if not behind:
                bar.close()
                bar = None
        return bar

    def _status(self, lag: int) -> None:
        rejected = {s.labels["reason"]: int(s.value) for s in self._rejected_samples()}
        log.info(
            "status: offsets %s, lag %d records, rejected records %s, window %d events, %d new since "
            "the last round, %d rounds, published %s",
            self.positions,
            lag,
            rejected or 0,
            self.trainer.window_events,
            self.trainer.new_events,
            self.trainer.rounds,
            self.published_version,
        )

    def _rejected_samples(self):
        for family in self.metrics.rejected.collect():
            yield from (s for s in family.samples if s.name.endswith("_total"))

    def _round(self) -> None:
        try:
            result, adopted = self.trainer.run_round()
        except Exception:
            log.exception("fine-tuning round failed; the current model keeps going")
            self.metrics.rounds.labels("failed").inc()
            self.trainer.new_events = 0  # not again at once: wait for the next round's events
            return
        self.metrics.observe_round(result)
        if adopted is not None:
            self.pending = {"parent": self.published_version, "gate": result.as_dict()}
            if self.rank != 0:
                self.published_version, self.pending = f"(rank 0's, after {self.published_version})", None
                return
            if self.checkpoint():
                self._finish_publication()
            return  # without a checkpoint, the next one retries and then publishes
        self.checkpoint()

    def _finish_publication(self) -> None:
        """Publish the checkpointed head (the adopted candidate) unless a crash happened right
        after doing so: a version with the same parent and offsets is that publication."""
        pending = self.pending
        latest = self.store.latest()
        if (
            latest is not None
            and latest.parent == pending["parent"]
            and latest.next_offsets == self.positions
        ):
            published = latest
            log.info("version %s was published before the restart", published.version)
        else:
            published = self.store.publish(
                self.trainer.head,
                self.positions,
                self.topic,
                self.topic_id,
                parent=pending["parent"],
                gate=pending["gate"],
            )
            log.info("published %s (offsets %s)", published.version, published.next_offsets)
        self.published_version = published.version
        self.pending = None
        self.metrics.last_publish.set(published.created_at)
        self.metrics.published.info({"version": published.version})
        self.checkpoint()

    # -------------------------------------------------------------------------- checkpoints
    def _checkpoint_due(self) -> bool:
        c = self.cfg.checkpoints
        if self._since_checkpoint == 0:
            return False
        return (
            self._since_checkpoint >= c.every_events
            or time.monotonic() - self._checkpoint_at >= c.every_seconds
        )

    def checkpoint(self) -> bool:
        """Write the trainer's checkpoint (one file, atomically replaced; rank 0 only); True on
        success."""
        if self.rank != 0:
            self._since_checkpoint = 0
            return True
        meta = {
            "next_offsets": {str(p): int(o) for p, o in self.positions.items()},
            "topic": self.topic,
            "topic_id": self.topic_id,
            "published_version": self.published_version,
            "pending_publish": self.pending,
            "trainer": self.trainer.state(),
        }
        try:
            save_checkpoint(self.checkpoint_path, self.trainer.head, meta)
        except Exception as e:
            log.error("trainer checkpoint failed: %s: %s", type(e).__name__, e)
            self.metrics.checkpoints.labels("error").inc()
            return False
        self.metrics.checkpoints.labels("ok").inc()
        self._since_checkpoint = 0
        self._checkpoint_at = time.monotonic()
        return True
