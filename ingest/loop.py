"""The ingest loop: Kafka micro-batches -> decoded, validated events -> the live engine, with
dead letters, prequential quality, snapshots and metrics. The only writer of the live state."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

from tgnstream.core.engine import PreparedBatch
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep
from tgnstream.health import Readiness
from tgnstream.ingest.config import IngestConfig
from tgnstream.ingest.dlq import DeadLetterPublisher
from tgnstream.ingest.prefetch import FetchedBatch, Prefetcher
from tgnstream.ingest.quality import PrequentialQuality
from tgnstream.ingest.records import DecodedBatch, RecordDecoder
from tgnstream.ingest.source import SourceRecord
from tgnstream.ingest.time_policy import TimePolicy
from tgnstream.live import LiveEngine
from tgnstream.metrics import ServerMetrics
from tgnstream.snapshots import SnapshotConfig, SnapshotStore

__all__ = ["IngestLoop"]

log = logging.getLogger(__name__)


class IngestLoop:
    """Applies the event stream to ``live`` with exactly-once state.

    Per micro-batch: decode (bad records -> dead letters), screen event times (too late, too far
    ahead -> dead letters; ``time_policy.py``), sort by time, register new node ids, score a sample before
    applying (prequential quality), then the shared step's serving apply (apply + fold pending
    messages; ``TemporalStep.prepare_live``/``commit_live``) and advance the offsets in one
    write-locked step. Snapshots (state + offsets) every N events or T seconds; Kafka's
    committed offsets follow each durable snapshot (monitoring only).
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
        last_snapshot_wall: float | None = None,
    ):
        self.config = config
        self.live = live
        self.fetcher = fetcher
        self.decoder = decoder
        self.topic = config.kafka.topic
        self.dead_letters = dead_letters
        self.snapshots = snapshots
        self.snapshot_config = snapshot_config
        self.metrics = metrics
        self.readiness = readiness if readiness is not None else Readiness()
        self.ready_max_lag_records = ready_max_lag_records
        self.topic_id = topic_id  # the Kafka topic id the state was built from (None: unknown)
        self.quality = PrequentialQuality(config.quality)
        self.time_policy = TimePolicy(
            config.max_lateness_s, config.max_future_s, config.max_ahead_of_record_time_s
        )
        self._stop = threading.Event()
        self._since_snapshot = 0
        self._last_snapshot_at = time.monotonic()
        # Age is measured from the newest durable snapshot, or from process start without one.
        self._last_snapshot_wall = time.time() if last_snapshot_wall is None else last_snapshot_wall
        self._snapshot_failures = 0  # consecutive
        self._snapshot_retry_at = 0.0  # time.monotonic() before which a failed snapshot is not retried
        self._quality_published_at = float("-inf")
        self.batches = 0
        self.final_snapshot_ok: bool | None = None  # set when run() returns after stop()

    # ----------------------------------------------------------------------------- control
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Loop until ``stop()`` (then the final snapshot is written, its outcome in
        ``final_snapshot_ok``, and returns) or a failure of the fetch side (raises: the owner
        decides about restarts and calls ``final_snapshot`` itself). The fetcher is stopped
        either way (after the final snapshot, so it still commits the group offsets)."""
        if self.fetcher is None:
            raise RuntimeError("IngestLoop.run needs a fetcher")
        log.info("ingest loop started")
        try:
            while not self._stop.is_set():
                self.step()
            self.final_snapshot_ok = self.final_snapshot()
        finally:
            self.fetcher.stop()
            log.info("ingest loop stopped")

    def step(self) -> int:
        """Handle one micro-batch (or an idle poll); returns the number of records handled."""
        batch = self.fetcher.get(timeout=self.config.poll_timeout_ms / 1000)
        self._handle_resets()
        if self.fetcher.topic_id is not None:
            self.topic_id = self.fetcher.topic_id
        if batch is not None:
            self._handle(batch)
        else:
            self._publish_state_metrics(force=True)  # idle: make the gauges current
        self._update_connection()
        self._update_lag(batch)
        if self._snapshot_due():
            self.snapshot()
        return 0 if batch is None else batch.num_records

    def _handle_resets(self) -> None:
        """Positions the fetch side moved to the log start (policy on_log_gap=reset)."""
        resets, self.fetcher.resets = self.fetcher.resets, []
        if not resets:
            return
        with self.live.write():
            for r in resets:
                self.live.next_offsets[r.partition] = r.new
        for r in resets:
            self.metrics.ingest_log_resets.labels(self.topic, str(r.partition)).inc()
        self._since_snapshot += 1  # the position changed: the next snapshot must record it

    # ------------------------------------------------------------------------------- batch
    def _handle(self, batch: FetchedBatch) -> None:
        started = time.perf_counter()
        decoded = self.decoder.decode(batch.values)
        for rej in decoded.rejected:
            self._dead_letter(batch.record(rej.position), rej.reason, rej.detail)
        keep = self._apply_time_policy(batch, decoded)
        events = self._register(decoded, keep)
        prepared = None
        if events is not None:
            self.metrics.online_scored.inc(self.quality.observe(self.live, events))
            prepared = self._prepare(batch, decoded, keep, events)
        with self.live.write() as engine:
            if prepared is not None:
                events = prepared.batch
                late = int((events.t < engine.watermark).sum())
                TemporalStep(engine).commit_live(prepared)
                self.metrics.ingest_events.labels("applied").inc(len(events))
                if late:
                    self.metrics.ingest_events.labels("late_clamped").inc(late)
            self.live.next_offsets = dict(batch.next_offsets)
        self._since_snapshot += batch.num_records
        self.batches += 1
        m = self.metrics
        m.ingest_batch_seconds.observe(time.perf_counter() - started)
        m.ingest_batch_events.observe(0 if events is None else len(events))
        self._publish_state_metrics()

    def _apply_time_policy(self, batch: FetchedBatch, decoded: DecodedBatch) -> np.ndarray:
        """Indices (into ``decoded``) of events to apply; the others become dead letters."""
        record_time_s = batch.timestamps_ms[decoded.positions] / 1000.0
        watermark = float(self.live.engine.watermark)  # only this thread writes it
        keep, rejected = self.time_policy.screen(decoded.ts, record_time_s, watermark)
        for r in rejected:
            self._dead_letter(batch.record(int(decoded.positions[r.index])), r.reason, r.detail)
        return keep

    def _prepare(
        self, batch: FetchedBatch, decoded: DecodedBatch, keep: np.ndarray, events: EventBatch
    ) -> PreparedBatch | None:
        """The serving apply's heavy phase (messages, memory updater) under the shared lock, so
        queries go on. Last line of defence: events whose update would write a non-finite row
        (a damaged model; validated input cannot cause it) are dead-lettered, never applied."""
        rows = keep[np.argsort(decoded.ts[keep], kind="stable")]  # decoded index of each event
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
                    batch.record(int(decoded.positions[rows[i]])),
                    "non_finite_state",
                    "applying this event would write a non-finite memory row (the model is damaged)",
                )
            if bool(hit.all()):
                return None
            kept = torch.nonzero(~hit).squeeze(1)
            rows = rows[kept.numpy()]
            events = events.select(kept.to(events.device))
        log.error("ingest: a batch still gave non-finite memory after dropping its events; skipped")
        return None

    def _register(self, decoded: DecodedBatch, keep: np.ndarray) -> EventBatch | None:
        """Map external ids to dense ids (new ids get slots: they read as cold start until their
        events are applied) and build a time-ordered batch; None when nothing is left."""
        if keep.size == 0:
            return None
        order = keep[np.argsort(decoded.ts[keep], kind="stable")]
        # Ids are registered in event order, src before dst (what an offline replay does).
        names: list[str] = [""] * (2 * order.size)
        if order.size == len(decoded.src) and bool((np.diff(order) > 0).all()):
            names[0::2], names[1::2] = decoded.src, decoded.dst  # the usual case: nothing moved
        else:
            picked = order.tolist()
            names[0::2] = [decoded.src[i] for i in picked]
            names[1::2] = [decoded.dst[i] for i in picked]
        with self.live.write() as engine:
            dense, _ = engine.ids.lookup(names, create=True)
            engine.ids.flush()  # leaving write() also reserves the cold-start slot for new ids
        dense = dense.view(-1, 2)
        device = self.live.engine.device
        return EventBatch(
            dense[:, 0].contiguous(),
            dense[:, 1].contiguous(),
            torch.from_numpy(np.ascontiguousarray(decoded.ts[order], dtype=np.float64)),
            torch.from_numpy(np.ascontiguousarray(decoded.features[order], dtype=np.float32)),
        ).to(device)

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
        m.events_applied.set(int(engine.events_applied))
        m.memory_nodes.set(len(engine.ids))
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
        applied = self.live.next_offsets
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
        m.snapshot_age.set(time.time() - self._last_snapshot_wall)
        if unknown:
            detail = f"log end of partitions {unknown} not known yet"
        elif worst > self.ready_max_lag_records:
            detail = f"replaying a backlog: {worst} records behind (ready at <= {self.ready_max_lag_records})"
        else:
            detail = None
        self.readiness.set("catching_up", detail)

    # --------------------------------------------------------------------------- snapshots
    def _snapshot_due(self) -> bool:
        if self.snapshots is None or self._since_snapshot == 0:
            return False
        now = time.monotonic()
        if now < self._snapshot_retry_at:
            return False
        cfg = self.snapshot_config
        return self._since_snapshot >= cfg.every_events or now - self._last_snapshot_at >= cfg.every_seconds

    def final_snapshot(self) -> bool:
        """The snapshot on the way out (call after ``run`` returned): True when the state on
        disk reflects everything applied (written now, or nothing changed since the last)."""
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
                self.dead_letters.flush(timeout=30)
            # This thread is the only writer, so reading without the lock sees a batch boundary.
            snap = self.snapshots.write(
                self.live.engine, self.live.model_version, self.live.next_offsets, self.topic, self.topic_id
            )
        except Exception as e:
            self._snapshot_failed(e, final)
            return False
        self.metrics.snapshots.labels("ok").inc()
        self.metrics.snapshot_seconds.observe(time.perf_counter() - started)
        if self._snapshot_failures:
            log.warning("snapshots work again after %d failed attempts", self._snapshot_failures)
        self._snapshot_failures = 0
        self._snapshot_retry_at = 0.0
        self._since_snapshot = 0
        self._last_snapshot_at = time.monotonic()
        self._last_snapshot_wall = time.time()
        if self.fetcher is not None:
            self.fetcher.request_commit(snap.next_offsets)
        log.info("snapshot %s (%d events)", snap.path.name, snap.events_applied)
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
