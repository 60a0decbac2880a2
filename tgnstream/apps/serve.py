"""Composition root of ``tgnstream serve``: builds the live engine, the ingest loop and the gRPC
server, wires them together and runs until SIGTERM/SIGINT. The services never import each other;
this module is the one place that knows both."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from grpc_health.v1 import health_pb2
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from tgnstream.apps.reader_pool import ReaderPool
from tgnstream.apps.serve_config import ModelSource, ServeConfig
from tgnstream.core.checkpoint import load_checkpoint
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.spec import ModelSpec, build_engine
from tgnstream.ingest.dlq import DeadLetterPublisher, dlq_topic
from tgnstream.ingest.loop import IngestLoop
from tgnstream.model_server.grpc_server import SERVICE_NAME, build_server, check_tls, close_servicer
from tgnstream.runtime.health import HealthHttpServer, Readiness
from tgnstream.runtime.hot_swap import HotSwapper, open_store
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.metrics import ReaderMetrics, ServerMetrics
from tgnstream.runtime.snapshots import SnapshotStore
from tgnstream.runtime.sysinfo import resolve_device, usable_cpus
from tgnstream.stream.config import KafkaConfig
from tgnstream.stream.consumers import throttle_kafka_python_logs
from tgnstream.stream.kafka_admin import create_topic, unreachable
from tgnstream.stream.prefetch import FatalIngestError, Prefetcher
from tgnstream.stream.records import RecordDecoder

__all__ = ["initial_engine", "run_server", "ServingProcess"]

log = logging.getLogger(__name__)


def checkpoint_version(source: ModelSource) -> str:
    """The served version of ``source.checkpoint``: ``ckpt-<first 12 hex of its SHA-256>``
    (or ``source.version``)."""
    digest = hashlib.sha256(Path(source.checkpoint).read_bytes()).hexdigest()[:12]
    return source.version or f"ckpt-{digest}"


#: ModelSource fields that describe an architecture (the preset and every ModelSpec field): with
#: a checkpoint, the checkpoint's win, so setting them too is a contradiction unless they agree.
_ARCHITECTURE_FIELDS = ("preset", *ModelSpec.model_fields)


def initial_engine(source: ModelSource, device: torch.device) -> tuple[MemoryEngine, str]:
    """The engine to start from when there is no snapshot, and its model version. Settings that
    contradict the checkpoint's architecture are an error (``ValueError``), not ignored."""
    if source.checkpoint is not None:
        path = Path(source.checkpoint)
        if not path.is_file():
            raise ValueError(
                f"model.checkpoint {path}: no such file (`tgnstream train --out DIR` writes "
                "DIR/checkpoint.pt)"
            )
        try:
            engine, _ = load_checkpoint(path, device)
        except Exception as e:
            raise ValueError(
                f"model.checkpoint {path} is not a tgnstream checkpoint: {type(e).__name__}: {e}"
            ) from None
        _check_architecture(source, engine.config)
        if not source.keep_checkpoint_state:
            engine.reset_state()
        return engine, checkpoint_version(source)
    spec = source.model_spec()
    torch.manual_seed(source.seed)
    engine = build_engine(spec, device, source.initial_capacity)
    engine.eval()
    return engine, source.version or f"init-{source.preset}-s{source.seed}"


def _check_architecture(source: ModelSource, trained: ModelSpec) -> None:
    # A preset agrees with a checkpoint of its architecture (tgn, jodie: what the label names).
    have = {**trained.model_dump(), "preset": trained.label.removesuffix("+pair")}
    if "preset" in source.model_fields_set:
        preset_arch = ModelSpec.preset(source.preset).label.removesuffix("+pair")
        if preset_arch == have["preset"]:
            have["preset"] = source.preset
    wrong = [
        f"{k} = {getattr(source, k)!r} (the checkpoint has {have[k]!r})"
        for k in _ARCHITECTURE_FIELDS
        if k in source.model_fields_set and getattr(source, k) not in (None, have[k])
    ]
    if wrong:
        raise ValueError(
            f"model settings contradict the checkpoint {source.checkpoint}: {'; '.join(wrong)}. The "
            "checkpoint defines the architecture: remove these settings (or use another checkpoint)"
        )


def _ensure_topic(kafka: KafkaConfig, name: str) -> None:
    """Create the dead-letter topic with one partition if it is missing (a broker that
    auto-creates topics would pick its own partition count). Lacking the right to create topics
    is not fatal: dead letters then fail at the next snapshot, loudly."""
    extra = {k: v for k, v in kafka.client_kwargs().items() if k != "bootstrap_servers"}
    try:
        create_topic(kafka.bootstrap_servers, name, 1, exist_ok=True, **extra)
    except Exception as e:
        log.warning("could not create dead-letter topic %r (%s); create it yourself", name, e)


class ServingProcess:
    """One serving process: live engine + supervised ingest thread + gRPC server + HTTP
    ``/metrics``, ``/livez``, ``/readyz``.

    Start-up order: the HTTP endpoints first (not ready: restoring), then the restore, then gRPC
    (its LinkPrediction health NOT_SERVING until ready), then ingest. Until ingest has caught up
    with the log once, the process is still restoring: queries get UNAVAILABLE and health ``""``
    says NOT_SERVING too (``health.serve_while_restoring`` turns that off). The ingest side is
    supervised: a failure (the fetch process died, the broker was unreachable at start-up) is
    retried with backoff while readiness says ``ingest_down``; after
    ``health.ingest_max_failures`` consecutive failures, or at once for an error no restart can
    fix (a log gap under ``on_log_gap=fail``), the process stops with a non-zero exit code.
    ``done`` is set when the process should stop by itself.
    """

    def __init__(self, config: ServeConfig):
        self._started_at = time.monotonic()
        self.config = config
        cfg = config
        # Reader processes would each find a TLS problem and die with a traceback: say it once, here.
        check_tls(cfg.grpc)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000)
        device = resolve_device(cfg.device)
        self.metrics = ServerMetrics()
        # /metrics: this process's series plus those its reader processes send (reader label).
        self.exported = ReaderMetrics(self.metrics.registry)
        exposition = CollectorRegistry(auto_describe=True)
        exposition.register(self.exported)
        self.readiness = Readiness(self.metrics.ready)
        self.readiness.set("restoring", "loading the newest snapshot or the initial model")
        self.done = threading.Event()
        self.exit_code = 0
        self.ingest_error: BaseException | None = None
        self._stopped = threading.Event()
        self._ingest_thread = threading.Thread(target=self._supervise_ingest, name="ingest", daemon=True)
        self.http = HealthHttpServer(
            cfg.metrics_host, cfg.metrics_port, exposition, self.readiness, self._alive
        )
        self.metrics_port = self.http.port
        self.http.start()

        self.store = SnapshotStore(cfg.snapshots.dir, cfg.snapshots.keep)
        topic = cfg.ingest.kafka.topic
        restored = self.store.restore_latest(device, topic=topic)
        if restored is not None and cfg.model.checkpoint is not None and cfg.models.dir is None:
            restored = self._check_snapshot_model(restored[0], restored)
        published = None
        if restored is None and cfg.models.dir is not None:
            published = self._first_published(device)
        if restored is not None:
            snap, engine = restored
            version, offsets, topic_id = snap.model_version, snap.next_offsets, snap.topic_id
            log.info(
                "serving %s: restored from snapshot %s (%d events, offsets %s)",
                version,
                snap.path,
                snap.events_applied,
                offsets,
            )
        elif published is not None:
            version_meta, engine = published
            version, offsets, topic_id = (
                version_meta.version,
                version_meta.next_offsets,
                version_meta.topic_id,
            )
            log.info(
                "serving %s: the newest published version in %s (no snapshot yet; offsets %s)",
                version,
                cfg.models.dir,
                offsets,
            )
        else:
            engine, version = initial_engine(cfg.model, device)
            offsets, topic_id = {}, None
            if cfg.model.checkpoint is not None:
                log.info(
                    "serving %s: checkpoint %s (%s), from the beginning of %s",
                    version,
                    cfg.model.checkpoint,
                    "with its node state" if cfg.model.keep_checkpoint_state else "empty node state",
                    topic,
                )
            else:
                log.warning(
                    "serving %s: FRESH RANDOM WEIGHTS (no snapshot, no model.checkpoint, no published "
                    "version): answers are meaningless until a model is configured, e.g. model.checkpoint "
                    '= "runs/wikipedia/checkpoint.pt" from `make train`',
                    version,
                )
        engine.eval()
        engine.fold_pending()  # a checkpoint may hold pending messages; queries then never fold
        self.live = LiveEngine(engine, version, offsets)
        # No answers until the state has caught up with the log once (health.serve_while_restoring).
        self.live.restoring = not cfg.health.serve_while_restoring
        self.metrics.model_info.info(
            {"version": version, "model": engine.config.label, "device": str(device)}
        )
        self.metrics.events_applied.set(int(engine.events_applied))
        self.metrics.memory_nodes.set(len(engine.ids))

        kafka = cfg.ingest.kafka
        down = unreachable(kafka.bootstrap_servers)
        if down is not None:
            log.error(
                "cannot reach the Kafka broker (%s): serving %s without ingest for now, not ready "
                "while ingest retries with backoff. Check ingest.kafka.bootstrap_servers",
                down,
                version,
            )
        dead_letters = None
        if cfg.ingest.dlq_enabled:
            if down is None:
                _ensure_topic(kafka, dlq_topic(topic))

            def make_producer() -> KafkaProducer:
                return KafkaProducer(**kafka.client_kwargs(), acks="all", linger_ms=5, max_block_ms=10_000)

            dead_letters = DeadLetterPublisher(make_producer, topic)
        decoder = RecordDecoder.from_config(cfg.ingest, engine.config.edge_dim)
        self.loop = IngestLoop(
            cfg.ingest,
            self.live,
            None,  # the supervisor starts (and restarts) the fetch process
            decoder,
            dead_letters,
            self.store,
            cfg.snapshots,
            self.metrics,
            readiness=self.readiness,
            ready_max_lag_records=cfg.health.ready_max_lag_records,
            topic_id=topic_id,
        )
        self.swapper: HotSwapper | None = None
        if cfg.models.dir is not None:
            self.swapper = HotSwapper(
                cfg.models,
                cfg.ingest,
                self.live,
                version,
                on_refused=self._swap_refused,
                topic_id=topic_id,
                served_lineage=published[0].lineage if published is not None else None,
                on_lineage_change=lambda old, new: self.metrics.model_lineage_changes.inc(),
            )
            self.loop.swapper = self.swapper
            self.loop.on_swap = self._swapped
        readers = cfg.grpc.readers
        if readers is None:
            readers = min(usable_cpus(), cfg.grpc.max_default_readers)
        # Readers drain in-flight RPCs for at most half the stop's grace.
        grpc_cfg = cfg.grpc.model_copy(
            update={"shutdown_grace_s": min(cfg.grpc.shutdown_grace_s, cfg.stop_grace_s / 2)}
        )
        self.pool: ReaderPool | None = None
        self.server = self.health = None
        self.stop_seconds = 0.0
        if readers > 0:
            self.pool = ReaderPool(
                self.live,
                grpc_cfg,
                readers,
                self.metrics,
                self.readiness,
                collector=self.exported,
                open_capacity=cfg.ingest.batch_max_events,
                node_capacity=cfg.node_capacity,
                pair_capacity=cfg.pair_capacity or cfg.node_capacity,
                torch_threads=cfg.grpc.reader_torch_threads,
                log_level=cfg.log_level,
            )
            self.grpc_port = self.pool.port
        else:
            self.server, self.health, self.grpc_port = build_server(self.live, cfg.grpc, self.metrics)
            self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
            if self.live.restoring:
                self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.readiness.add_listener(self._on_readiness)
        self.readiness.set("ingest_down", "the Kafka fetch process is starting")
        if self.live.restoring:
            self.restored_after_s: float | None = None
            self.readiness.hold_until_ready(
                "restoring",
                "replaying the log to its end; queries get UNAVAILABLE until then",
                self._restored,
            )
        else:
            self.restored_after_s = 0.0
            self.readiness.set("restoring", None)

    def _first_published(self, device: torch.device):
        """The newest published version; with ``models.wait_for_first``, waits for one."""
        cfg = self.config.models
        store = open_store(cfg)
        found = store.load_latest(device)
        if found is None and cfg.wait_for_first:
            self.readiness.set("restoring", f"waiting for the first published version in {cfg.dir}")
            log.info(
                "waiting for the first published version in %s (the trainer publishes one when it starts)",
                cfg.dir,
            )
            while found is None:
                time.sleep(cfg.watch_interval_s)
                found = store.load_latest(device)
        return found

    def _check_snapshot_model(self, snap, restored):
        """A snapshot built with another model than the configured checkpoint: refuse, or (with
        ``model.on_model_change = "start_over"``) set the snapshots aside and start from it."""
        want = checkpoint_version(self.config.model)
        if snap.model_version == want:
            return restored
        if self.config.model.on_model_change != "start_over":
            raise ValueError(
                f"the newest snapshot ({snap.path}) was built with model {snap.model_version}, but "
                f"model.checkpoint {self.config.model.checkpoint} is {want}. To serve the checkpoint, start "
                'over from it: set model.on_model_change = "start_over" (the snapshots are moved to '
                f"{self.store.root}/superseded-*/ and the topic is read from its start), or remove "
                "model.checkpoint to keep serving the snapshot"
            )
        aside = self.store.set_aside()
        log.warning(
            "model.checkpoint is %s, the snapshots were built with %s: they are moved to %s; starting "
            "over from the checkpoint",
            want,
            snap.model_version,
            aside,
        )
        return None

    # ---------------------------------------------------------------------------- hot swap
    def _swapped(self, version: str, total_s: float, pause_s: float) -> None:
        m = self.metrics
        m.model_swaps.labels("swapped", "").inc()
        m.model_swap_seconds.observe(total_s)
        m.model_swap_pause_seconds.observe(pause_s)
        engine = self.live.engine
        m.model_info.info({"version": version, "model": engine.config.label, "device": str(engine.device)})

    def _swap_refused(self, version: str, reason: str, message: str) -> None:
        self.metrics.model_swaps.labels("refused", reason).inc()

    # ------------------------------------------------------------------------------ health
    def _alive(self) -> bool:
        return not self.done.is_set() or self._stopped.is_set()

    def _restored(self) -> None:
        """The state reflects the log (restored, caught up once): answer queries from now on."""
        self.live.restoring = False
        self.restored_after_s = time.monotonic() - self._started_at
        if self.health is not None and not self._stopped.is_set():
            self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "restored and caught up with the log %.1f s after start: answering queries", self.restored_after_s
        )

    def _on_readiness(self, ready: bool, reasons: dict[str, str]) -> None:
        if self._stopped.is_set():
            return  # shutting down: stop_server owns the health status now
        if self.pool is not None:
            self.pool.set_ready(ready)
            return
        status = health_pb2.HealthCheckResponse
        self.health.set(SERVICE_NAME, status.SERVING if ready else status.NOT_SERVING)

    # ------------------------------------------------------------------------------ ingest
    def _start_fetcher(self) -> Prefetcher:
        self.loop.discard_open()  # its records are read again from the applied offsets
        with self.live.read():
            offsets = dict(self.live.next_offsets)
        fetcher = Prefetcher(self.config.ingest, offsets, self.loop.topic_id)
        fetcher.start()
        with self.live.write(state=False):
            # A fresh start learns where the log begins; a restored one keeps its offsets.
            self.live.next_offsets = {**fetcher.start_offsets, **offsets}
        if fetcher.topic_id is not None:
            self.loop.adopt_topic_id(fetcher.topic_id)
        return fetcher

    def _supervise_ingest(self) -> None:
        hc = self.config.health
        failures, delay = 0, hc.ingest_restart_initial_s
        while not self._stopped.is_set():
            started_at, applied_before = time.monotonic(), int(self.live.engine.events_applied)
            try:
                self.loop.fetcher = self._start_fetcher()
                if self._stopped.is_set():  # stopped while connecting: stop() writes the snapshot
                    self.loop.fetcher.stop(timeout=0)
                    return
                # Until the first fetch reports the log end, the lag is unknown: not ready yet.
                self.readiness.set("catching_up", "log end not known yet")
                self.readiness.set("ingest_down", None)
                self.loop.run()
                return  # stopped on request
            except FatalIngestError as e:
                self._fail(e, f"ingest cannot continue: {e}")
                return
            except Exception as e:
                if self._stopped.is_set():
                    return
                ran_well = time.monotonic() - started_at >= 60
                if ran_well or int(self.live.engine.events_applied) > applied_before:
                    failures, delay = 0, hc.ingest_restart_initial_s
                failures += 1
                self.metrics.ingest_restarts.inc()
                self.readiness.set("ingest_down", f"{type(e).__name__}: {e}")
                if failures >= hc.ingest_max_failures:
                    self._fail(e, f"ingest failed {failures} times in a row, giving up: {e}")
                    return
                log.error(
                    "ingest failed (%s: %s); restarting in %.1f s (failure %d of %d allowed)",
                    type(e).__name__,
                    e,
                    delay,
                    failures,
                    hc.ingest_max_failures,
                )
                self._stopped.wait(delay)
                delay = min(2 * delay, hc.ingest_restart_max_s)

    def _fail(self, error: BaseException, message: str) -> None:
        log.error("%s; stopping (exit code 1) so that a supervisor restarts the process", message)
        self.ingest_error = error
        self.exit_code = 1
        self.readiness.set("ingest_down", message)
        self.done.set()

    # ----------------------------------------------------------------------------- control
    def start(self) -> None:
        cfg = self.config
        if self.pool is not None:
            self.pool.start()
        else:
            self.server.start()
        self._ingest_thread.start()
        if self.swapper is not None:
            self.swapper.start()
        log.info(
            "serving %s: gRPC on %s:%d (%s), metrics and /livez, /readyz on http://%s:%d",
            self.live.model_version,
            cfg.grpc.host,
            self.grpc_port,
            f"{self.pool.count} reader processes" if self.pool is not None else "in this process",
            cfg.metrics_host,
            self.metrics_port,
        )
        if cfg.ready_file is not None:
            tmp = Path(str(cfg.ready_file) + ".tmp")
            tmp.write_text(
                json.dumps(
                    {"grpc_port": self.grpc_port, "metrics_port": self.metrics_port, "pid": os.getpid()}
                )
            )
            os.replace(tmp, cfg.ready_file)

    def stop(self, grace: float | None = None) -> int:
        """Stop within ``stop_grace_s`` whatever the broker does: health says NOT_SERVING and
        gRPC starts draining at once, ingest stops, the final snapshot is written (by the ingest
        thread, or here when that thread is stuck outside a step, e.g. reconnecting to a broker
        that is gone), then the drain is awaited. Returns the exit code: non-zero when ingest
        failed for good or the final snapshot could not be written in time."""
        if self._stopped.is_set():
            return self.exit_code
        started = time.monotonic()
        deadline = started + self.config.stop_grace_s
        self._stopped.set()
        grace = self.config.grpc.shutdown_grace_s if grace is None else grace
        # In-flight RPCs drain while ingest stops; the drain may not eat the snapshot's time.
        grace = min(grace, self.config.stop_grace_s / 2)
        if self.pool is not None:
            self.pool.set_ready(False)
            self.pool.begin_stop()
            drained = None
        else:
            self.health.enter_graceful_shutdown()
            drained = self.server.stop(grace)
        if self.swapper is not None:
            self.swapper.stop(timeout=max(0.0, deadline - time.monotonic()) / 4)
        # Keep what a final snapshot took last time (at least 1 s) for writing it here if needed.
        reserve = max(1.0, 2 * self.loop.last_snapshot_s)
        self.loop.stop(deadline=deadline - reserve / 2)
        # The loop writes the final snapshot after its current step; an ingest thread outside the
        # loop (reconnecting, backing off) holds no state, so the snapshot is written from here.
        while time.monotonic() < deadline - reserve and self._ingest_thread.is_alive():
            if self.loop.final_snapshot_ok is not None or not self.loop.running:
                break
            self._ingest_thread.join(0.02)
        final_ok = self.loop.final_snapshot_ok
        if final_ok is None:  # ingest was down or stuck outside a step: write it from here
            final_ok = self.loop.final_snapshot(timeout=max(0.0, deadline - reserve / 2 - time.monotonic()))
            if final_ok is None:
                log.error("ingest did not reach a batch boundary in time: no final snapshot")
        if not final_ok:
            log.error("the final snapshot failed: events since the last snapshot will be re-read on restart")
            self.exit_code = 1
        # The loop stops its fetch process itself (within the deadline); one still starting is killed.
        self._ingest_thread.join(timeout=max(0.0, min(1.0, deadline - reserve / 2 - time.monotonic())))
        if self._ingest_thread.is_alive() and self.loop.fetcher is not None and not self.loop.running:
            self.loop.fetcher.stop(timeout=0)
        if self.pool is not None:
            self.pool.stop(grace, deadline=deadline)
        else:
            drained.wait(max(0.0, deadline - time.monotonic()))
            close_servicer(self.server)
        self.http.stop()
        self.stop_seconds = time.monotonic() - started
        return self.exit_code


def run_server(config: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT/SIGHUP (or a failure ingest cannot recover from); returns the
    process exit code."""
    throttle_kafka_python_logs()  # the dead-letter producer's reconnect attempts, while a broker is down
    proc = ServingProcess(config)

    def _on_signal(signum, _frame):
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        proc.done.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    proc.start()
    while not proc.done.wait(0.5):
        pass
    code = proc.stop()
    log.info("stopped in %.1f s, exit code %d", proc.stop_seconds, code)
    return code
