"""The ingest loop: Kafka micro-batches -> decoded, validated events -> the live engine, with
dead letters, prequential quality, snapshots and metrics. The only writer of the live state."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from tgnstream.core.engine import PreparedBatch
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep
from tgnstream.ingest.config import IngestConfig
from tgnstream.ingest.dlq import DeadLetterPublisher
from tgnstream.ingest.quality import PrequentialQuality
from tgnstream.runtime.health import Readiness
from tgnstream.runtime.live import LiveEngine, OpenBatch
from tgnstream.runtime.metrics import ServerMetrics
from tgnstream.runtime.snapshots import Changes, SnapshotConfig, SnapshotStore
from tgnstream.stream.assemble import BatchAssembler, RecordRejection, known_in
from tgnstream.stream.batcher import ClosedBatch
from tgnstream.stream.prefetch import FetchedBatch, Prefetcher
from tgnstream.stream.records import RecordDecoder
from tgnstream.stream.source import SourceRecord

__all__ = ["IngestLoop"]

log = logging.getLogger(__name__)


class IngestLoop:
    """Applies the event stream to ``live`` with exactly-once state.

    Per micro-batch, on the shared path (``tgnstream.stream.assemble``): decode (bad records ->
    dead letters), screen event times (too late, too far ahead -> dead letters), register new
    node ids, sort by time. Here: score a sample before applying (prequential quality), then the
    shared step's serving apply (apply + fold pending messages; ``TemporalStep.prepare_live`` /
    ``commit_live``) and advance the offsets in one write-locked step. Snapshots (state +
    offsets) every N events or T seconds; Kafka's committed offsets follow each durable snapshot
    (monitoring only).
    """

    def __init__(
        self,
        config: IngestConfig,
        live: LiveEngine,
        fetcher: Prefetcher | None,
        decoder: RecordDecoder,
        dead_letters: DeadLetterPublisher | None,
        snapshots: SnapshotStore | None,
        snapshot_config: SnapshotConfig,
        metrics: ServerMetrics,
        readiness: Readiness | None = None,
        ready_max_lag_records: int = 5_000,
        topic_id: str | None = None,
    ):
        self.config = config
        self.live = live
        self.fetcher = fetcher
        self.topic = config.kafka.topic
        self.dead_letters = dead_letters
        self.snapshots = snapshots
        self.snapshot_config = snapshot_config
        self.metrics = metrics
        self.readiness = readiness if readiness is not None else Readiness()
        self.ready_max_lag_records = ready_max_lag_records
        self.topic_id = topic_id  # the Kafka topic id the state was built from (None: unknown)
        self.quality = PrequentialQuality(config.quality)
        self._stop = threading.Event()
        self._stop_deadline: float | None = None  # time.monotonic() by which a stop must be done
        # Held while a step or a snapshot changes or reads the state: another thread may write the
        # final snapshot only between two steps (a stop whose ingest thread is stuck elsewhere).
        self._turn = threading.Lock()
        self.last_snapshot_s = 0.0  # how long the last snapshot took (sizes the stop's reserve)
        self.running = False  # inside run(): steps may hold the state
        self._since_snapshot = 0
        self._last_snapshot_at = time.monotonic()
        self._dirty_since = time.time()  # when the oldest change no snapshot holds happened
        self._snapshot_failures = 0  # consecutive
        self._snapshot_retry_at = 0.0  # time.monotonic() before which a failed snapshot is not retried
        # Nodes and pairs written since the last snapshot (what a delta snapshot holds;
        # docs/snapshots.md says why the set is complete). It counts only once a snapshot of this
        # loop succeeded (the state it started from may differ from the one restored: folds at
        # start-up), and not after the engine was replaced: the next snapshot is then a full base.
        self._changes = Changes()
        self._changes_complete = False
        self._quality_published_at = float("-inf")
        # Pairs forgotten (by age, by count) that the metrics already count: a restored state's
        # own were counted by the process that forgot them.
        self._forgotten_seen = live.engine.history.evicted[:2].tolist()
        self.batches = 0
        self.final_snapshot_ok: bool | None = None  # set when run() returns after stop()
        # Offers a shadow engine to swap in between two batches (tgnstream.runtime.hot_swap); None: off.
        self.swapper = None
        self.on_swap: Callable[[str, float, float], None] | None = None  # (version, total s, pause s)
        self.assembler = BatchAssembler(
            config, live.engine.config.edge_dim, float(live.engine.watermark), live.engine.device, decoder
        )
        self._known = known_in(lambda: self.live.engine.ids)  # for stream.max_nodes

    # ----------------------------------------------------------------------------- control
    def stop(self, deadline: float | None = None) -> None:
        """Ask ``run`` to return; with ``deadline`` (``time.monotonic()``), the final snapshot's
        dead-letter flush and the fetcher's stop are cut to what is left of it."""
        self._stop_deadline = deadline
        self._stop.set()

    def _left(self, default: float) -> float:
        if self._stop_deadline is None:
            return default
        return max(0.1, min(default, self._stop_deadline - time.monotonic()))

    def run(self) -> None:
        """Loop until ``stop()`` (then the final snapshot is written, its outcome in
        ``final_snapshot_ok``, and returns) or a failure of the fetch side (raises: the owner
        decides about restarts and calls ``final_snapshot`` itself). The fetcher is stopped
        either way (after the final snapshot, so it still commits the group offsets)."""
        if self.fetcher is None:
            raise RuntimeError("IngestLoop.run needs a fetcher")
        log.info("ingest loop started")
        self.running = True
        try:
            while not self._stop.is_set():
                with self._turn:
                    self.step()
            with self._turn:
                self.final_snapshot_ok = self._final_snapshot()
        finally:
            self.running = False
            self.fetcher.stop(timeout=self._left(10.0))
            log.info("ingest loop stopped")

    def step(self) -> int:
        """Handle one micro-batch (or an idle poll); returns the number of records handled."""
        batch = self.fetcher.get(timeout=self.config.poll_timeout_ms / 1000)
        self._handle_resets()
        if self.fetcher.topic_id is not None and self.fetcher.topic_id != self.topic_id:
            self.adopt_topic_id(self.fetcher.topic_id)
        if batch is not None:
            self._handle(batch)
        else:
            self._publish_state_metrics(force=True)  # idle: make the gauges current
        if self.swapper is not None:
            self._maybe_swap()
        self._update_connection()
        self._update_lag(batch)
        if self._snapshot_due():
            self.snapshot()
        return 0 if batch is None else batch.num_records

    def adopt_topic_id(self, topic_id: str) -> None:
        """Follow the topic's incarnation the fetch side reads; the hot swap judges versions by it."""
        self.topic_id = topic_id
        if self.swapper is not None:
            self.swapper.set_topic_id(topic_id)

    def _handle_resets(self) -> None:
        """Positions the fetch side moved to the log start (policy on_log_gap=reset)."""
        resets, self.fetcher.resets = self.fetcher.resets, []
        if not resets:
            return
        if self.assembler.open.records:
            log.warning(
                "log gap: the open batch (%d records of the old log) is discarded",
                self.assembler.open.records,
            )
            self.discard_open()
        with self.live.write(state=False):
            for r in resets:
                self.live.next_offsets[r.partition] = r.new
        for r in resets:
            self.metrics.ingest_log_resets.labels(self.topic, str(r.partition)).inc()
        self._changed(1)  # the position changed: the next snapshot must record it

    # ---------------------------------------------------------------------------- hot swap
    def _maybe_swap(self) -> None:
        """Between two batches: swap in the shadow engine the swapper parked at exactly the
        applied position (this thread is the only writer of it, so reading it needs no lock)."""
        ready = self.swapper.take_ready(dict(self.live.next_offsets))
        if ready is not None:
            self.swap_in(ready.engine, ready.version, ready.started)

    def swap_in(self, engine, version: str, started: float | None = None) -> None:
        """Serve ``engine`` (it reflects exactly the applied offsets) from now on. The open
        batch's events are registered in its id map (same names, log order) and stay open;
        queries holding the read lock finish on the old engine first."""
        t0 = time.perf_counter()
        old_ids = self.live.engine.ids

        def remap(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            names: list[str] = [""] * (2 * src.numel())
            names[0::2] = old_ids.names(src)
            names[1::2] = old_ids.names(dst)
            dense, _ = engine.ids.lookup(names, create=True)
            dense = dense.view(-1, 2)
            return dense[:, 0].contiguous(), dense[:, 1].contiguous()

        open_batch = self.assembler.open
        open_batch.remap(remap)
        engine.ids.flush()
        self.assembler.device = engine.device
        events, _ = open_batch.events(engine.device)
        paused = time.perf_counter()
        with self.live.write():
            opened = OpenBatch(events, dict(open_batch.next_offsets)) if open_batch.records else None
            self.live.replace_engine(engine, version, opened)
        pause = time.perf_counter() - paused
        total = time.perf_counter() - t0 if started is None else time.monotonic() - started
        self._changed(1)  # the next snapshot records the new version
        self._changes_complete = False  # another engine: the next snapshot is a full base
        log.info(
            "hot swap: now serving %s at offsets %s (write lock held %.1f ms)",
            version,
            dict(self.live.next_offsets),
            1000 * pause,
        )
        if self.on_swap is not None:
            self.on_swap(version, total, pause)

    # ------------------------------------------------------------------------------- batch
    def discard_open(self) -> None:
        """Forget the open batch (its records are re-read from the applied offsets: after an
        ingest restart, or when a log gap moved the position)."""
        with self.live.write(state=False) as engine:
            self.live.open = None
            self.assembler.discard(float(engine.watermark))

    def _handle(self, fetched: FetchedBatch) -> None:
        """Assemble a fetched chunk on the shared path (``BatchAssembler``): rejected records
        go to dead letters, new events are sampled for prequential quality, each full batch is
        applied before the next record is looked at."""
        self.assembler.feed(
            fetched,
            self._register,
            on_close=self._close,
            on_reject=self._reject,
            on_added=self._score_new,
            known=self._known,
        )
        self._publish_open()
        self._publish_state_metrics()

    def _register(self, names: list[str]) -> torch.Tensor:
        self.live.make_room(new_ids=names)  # any growth copies here, not under the lock
        with self.live.write(state=False) as engine:
            dense, _ = engine.ids.lookup(names, create=True)
            engine.ids.flush()  # leaving write() also reserves the cold-start slot for new ids
        return dense

    def _reject(self, rejection: RecordRejection) -> None:
        self._dead_letter(rejection.record, rejection.reason, rejection.detail)

    def _score_new(self, added: int) -> None:
        """Prequential: the ``added`` newest events are scored before they count anywhere, each
        seeing the applied state and the open batch's events before it (training's batch
        semantics)."""
        if not self.quality.due():
            return
        events, order = self.assembler.open.events(self.live.engine.device)
        where = np.empty_like(order)  # time-ordered position of each event, in log order
        where[order] = np.arange(order.size)
        new = torch.from_numpy(np.sort(where[order.size - added :]))
        self.metrics.online_scored.inc(self.quality.observe(self.live, events, among=new))

    def _publish_open(self) -> None:
        """Show the open batch to queries (batch context) and its position to GetModelInfo."""
        open_batch = self.assembler.open
        events, _ = open_batch.events(self.live.engine.device)
        with self.live.write(state=False):
            self.live.open = OpenBatch(events, dict(open_batch.next_offsets)) if open_batch.records else None

    def _close(self, batch: ClosedBatch) -> int:
        """Apply a full batch and advance the applied offsets, in one write-locked step;
        returns the number of events applied."""
        started = time.perf_counter()
        prepared = self._prepare(batch.events, batch.source) if len(batch.events) else None
        applied = 0
        if prepared is not None:
            self.live.make_room(new_pairs=len(prepared.batch))
        with self.live.write() as engine:
            if prepared is not None:
                events = prepared.batch
                late = int((events.t < engine.watermark).sum())
                # Before the commit: should it fail part-way, its rows are still in the set.
                if self.snapshots is not None:
                    self._changes.add(events.src, events.dst)
                TemporalStep(engine).commit_live(prepared)
                applied = len(events)
                # One result per record: applied on time, applied late (clamped), or dead-lettered.
                self.metrics.ingest_events.labels("applied").inc(applied - late)
                if late:
                    self.metrics.ingest_events.labels("late_clamped").inc(late)
            self.live.next_offsets = {**self.live.next_offsets, **batch.next_offsets}
            self.live.open = None
        self._changed(batch.records)
        self.batches += 1
        self.metrics.ingest_batch_seconds.observe(time.perf_counter() - started)
        self.metrics.ingest_batch_events.observe(applied)
        return applied

    def _prepare(self, events: EventBatch, source: Callable[[int], SourceRecord]) -> PreparedBatch | None:
        """The serving apply's heavy phase (messages, memory updater) under the shared lock, so
        queries go on. Last line of defence: events whose update would write a non-finite row
        (a damaged model; validated input cannot cause it) are dead-lettered, never applied."""
        rows = list(range(len(events)))  # each event's row in the batch ``source`` knows
        for _ in range(2):
            with self.live.read() as engine:
                prepared = TemporalStep(engine).prepare_live(events)
            bad = prepared.nonfinite_nodes()
            if bad.numel() == 0:
                return prepared
            hit = (torch.isin(events.src, bad) | torch.isin(events.dst, bad)).cpu()
            self.metrics.nonfinite.labels("ingest").inc(int(hit.sum()))
            for i in torch.nonzero(hit).squeeze(1).tolist():
                self._dead_letter(
                    source(rows[i]),
                    "non_finite_state",
                    "applying this event would write a non-finite memory row (the model is damaged)",
                )
            if bool(hit.all()):
                return None
            kept = torch.nonzero(~hit).squeeze(1)
            rows = [rows[i] for i in kept.tolist()]
            events = events.select(kept.to(events.device))
        log.error("ingest: a batch still gave non-finite memory after dropping its events; skipped")
        return None

    def _dead_letter(self, record: SourceRecord, reason: str, detail: str) -> None:
        self.metrics.ingest_events.labels("dlq").inc()
        self.metrics.ingest_dlq.labels(reason).inc()
        if self.dead_letters is None:
            log.warning(
                "bad record %s[%d]@%d (%s: %s) dropped: the dead-letter topic is disabled",
                self.topic,
                record.partition,
                record.offset,
                reason,
                detail,
            )
            return
        self.dead_letters.publish(
            key=record.key,
            value=record.value,
            reason=reason,
            detail=detail,
            source_topic=self.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp_ms,
        )

    # ----------------------------------------------------------------------------- metrics
    def _publish_state_metrics(self, force: bool = False) -> None:
        m = self.metrics
        engine = self.live.engine
        m.events_applied.set(self.live.stamp().events_applied)  # what answers reflect
        m.memory_nodes.set(len(engine.ids))
        m.memory_pairs.set(len(engine.history))
        forgotten = engine.history.evicted[:2].tolist()
        for rule, now, seen in zip(("age", "count"), forgotten, self._forgotten_seen):
            if now > seen:  # a restored or swapped-in state may hold fewer: counted from there on
                m.pairs_forgotten.labels(rule).inc(now - seen)
        self._forgotten_seen = forgotten
        if np.isfinite(float(engine.watermark)):
            m.ingest_watermark.set(float(engine.watermark))
        now = time.monotonic()
        # AP sorts the whole window: at most once a second while busy.
        if force or now - self._quality_published_at >= 1.0:
            self._quality_published_at = now
            m.memory_device_bytes.set(_engine_bytes(engine))
            ap, mrr = self.quality.ap(), self.quality.mrr()
            if ap is not None:
                m.online_ap.set(ap)
            if mrr is not None:
                m.online_mrr.set(mrr)

    def _update_connection(self) -> None:
        up = self.fetcher.connected
        self.metrics.ingest_connected.set(1 if up else 0)
        servers = self.config.kafka.bootstrap_servers
        self.readiness.set("broker_unreachable", None if up else f"no connection to {servers}")

    def _update_lag(self, batch: FetchedBatch | None) -> None:
        """Per partition: records between the applied position and the last log end seen (kept
        while the broker is unreachable), and readiness from the largest lag."""
        m, topic = self.metrics, self.topic
        newest = batch.newest_timestamp_ms if batch is not None else {}
        applied = self.live.visible_offsets  # records read into answers (the open batch included)
        unknown, worst = [], 0
        for p in self.fetcher.partitions:
            hw = self.fetcher.highwater.get(p)
            if hw is None:
                unknown.append(p)
                continue
            lag = max(0, hw - applied.get(p, 0))
            worst = max(worst, lag)
            m.ingest_lag_records.labels(topic, str(p)).set(lag)
            if lag == 0:
                m.ingest_lag_seconds.labels(topic, str(p)).set(0.0)
            elif p in newest and newest[p] is not None and newest[p] >= 0:
                m.ingest_lag_seconds.labels(topic, str(p)).set(max(0.0, time.time() - newest[p] / 1000))
        # How long the newest applied change has gone without a snapshot: 0 while nothing changed
        # since the last one (an idle topic is not a stale snapshot).
        m.snapshot_age.set(0.0 if self._since_snapshot == 0 else time.time() - self._dirty_since)
        if unknown:
            detail = f"log end of partitions {unknown} not known yet"
        elif worst > self.ready_max_lag_records:
            detail = f"replaying a backlog: {worst} records behind (ready at <= {self.ready_max_lag_records})"
        else:
            detail = None
        self.readiness.set("catching_up", detail)

    # --------------------------------------------------------------------------- snapshots
    def _changed(self, records: int) -> None:
        """Count a change the newest snapshot does not hold (and when the first one happened)."""
        if self._since_snapshot == 0:
            self._dirty_since = time.time()
        self._since_snapshot += records

    def _snapshot_due(self) -> bool:
        if self.snapshots is None or self._since_snapshot == 0:
            return False
        now = time.monotonic()
        if now < self._snapshot_retry_at:
            return False
        cfg = self.snapshot_config
        return self._since_snapshot >= cfg.every_events or now - self._last_snapshot_at >= cfg.every_seconds

    def final_snapshot(self, timeout: float = -1) -> bool | None:
        """The snapshot on the way out, from a thread other than ``run``'s (after ``run`` returned,
        or while the ingest thread is stuck outside a step): True when the state on disk reflects
        everything applied (written now, or nothing changed since the last), False when writing
        failed, None when a step still held the state after ``timeout`` seconds (-1: wait)."""
        if not self._turn.acquire(timeout=timeout):
            return None
        try:
            return self._final_snapshot()
        finally:
            self._turn.release()

    def _final_snapshot(self) -> bool:
        if self.snapshots is None or self._since_snapshot == 0:
            return True
        return self.snapshot(final=True)

    def snapshot(self, final: bool = False) -> bool:
        """Write a snapshot now (if anything changed since the last one); True on success.

        Dead letters are flushed first: a snapshot's offsets must never move past a bad record
        whose dead letter is not yet durable. A failure is logged once per failure streak (with
        the reason; the traceback at DEBUG), counted, and retried with exponential backoff
        (``retry_initial_s`` doubling up to ``retry_max_s``); the loop keeps running.
        """
        if self.snapshots is None or self._since_snapshot == 0:
            return False
        started = time.perf_counter()
        try:
            if self.dead_letters is not None:
                self.dead_letters.flush(timeout=self._left(30.0) if final else 30.0)
            # This thread is the only writer, so reading without the lock sees a batch boundary.
            cfg = self.snapshot_config
            snap = self.snapshots.write(
                self.live.engine,
                self.live.model_version,
                self.live.next_offsets,
                self.topic,
                self.topic_id,
                changes=self._changes if self._changes_complete else None,
                full_every=cfg.full_every,
                delta_max_fraction=cfg.delta_max_fraction,
            )
        except Exception as e:
            self._snapshot_failed(e, final)
            return False
        self.last_snapshot_s = time.perf_counter() - started
        self.metrics.snapshots.labels("ok").inc()
        self.metrics.snapshot_seconds.observe(self.last_snapshot_s)
        if self._snapshot_failures:
            log.warning("snapshots work again after %d failed attempts", self._snapshot_failures)
        self._snapshot_failures = 0
        self._snapshot_retry_at = 0.0
        self._since_snapshot = 0
        # Only here: after a failed write the set still covers everything since the last snapshot.
        self._changes = Changes()
        self._changes_complete = True
        self._last_snapshot_at = time.monotonic()
        if self.fetcher is not None:
            self.fetcher.request_commit(snap.next_offsets)
        log.info("snapshot %s (%s, %d events)", snap.path.name, snap.kind, snap.events_applied)
        return True

    def _snapshot_failed(self, error: Exception, final: bool) -> None:
        self.metrics.snapshots.labels("error").inc()
        self._snapshot_failures += 1
        cfg = self.snapshot_config
        delay = min(cfg.retry_max_s, cfg.retry_initial_s * 2 ** (self._snapshot_failures - 1))
        self._snapshot_retry_at = time.monotonic() + delay
        log.debug("snapshot failure", exc_info=error)
        if final:
            log.error("final snapshot failed: %s: %s", type(error).__name__, error)
        elif self._snapshot_failures == 1:
            log.error(
                "snapshot failed: %s: %s; retrying with backoff (%.0f s, doubling up to %.0f s); "
                'tgnstream_snapshots_total{result="error"} counts the attempts',
                type(error).__name__,
                error,
                delay,
                cfg.retry_max_s,
            )


def _engine_bytes(engine: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(engine.parameters()) + list(engine.buffers()))
