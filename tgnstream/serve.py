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
from pathlib import Path

import torch
from kafka import KafkaProducer
from prometheus_client import start_http_server

from tgnstream.core.checkpoint import load_checkpoint
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.ingest.config import KafkaConfig
from tgnstream.ingest.dlq import DeadLetterPublisher, dlq_topic
from tgnstream.ingest.loop import IngestLoop
from tgnstream.ingest.prefetch import Prefetcher
from tgnstream.ingest.records import RecordDecoder
from tgnstream.kafka_admin import create_topic
from tgnstream.live import LiveEngine
from tgnstream.metrics import ServerMetrics
from tgnstream.model_server.grpc_server import build_server, stop_server
from tgnstream.serve_config import ModelSource, ServeConfig
from tgnstream.snapshots import SnapshotStore
from tgnstream.sysinfo import resolve_device

__all__ = ["initial_engine", "run_server", "ServingProcess"]

log = logging.getLogger(__name__)


def initial_engine(source: ModelSource, device: torch.device) -> tuple[MemoryEngine, str]:
    """The engine to start from when there is no snapshot, and its model version."""
    if source.checkpoint is not None:
        engine, _ = load_checkpoint(source.checkpoint, device)
        if not source.keep_checkpoint_state:
            engine.reset_state()
        digest = hashlib.sha256(Path(source.checkpoint).read_bytes()).hexdigest()[:12]
        return engine, source.version or f"ckpt-{digest}"
    cfg = ModelConfig.preset(
        source.preset, width=source.memory_dim, pair_features=source.pair_features, edge_dim=source.edge_dim
    )
    torch.manual_seed(source.seed)
    engine = MemoryEngine(cfg, source.initial_capacity, device)
    engine.eval()
    return engine, source.version or f"init-{source.preset}-s{source.seed}"


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
    """One serving process: live engine + ingest thread + gRPC server + /metrics."""

    def __init__(self, config: ServeConfig):
        self.config = config
        cfg = config
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000)
        device = resolve_device(cfg.device)
        self.metrics = ServerMetrics()
        self.store = SnapshotStore(cfg.snapshots.dir, cfg.snapshots.keep)
        topic = cfg.ingest.kafka.topic
        restored = self.store.restore_latest(device, topic=topic)
        if restored is not None:
            snap, engine = restored
            version, offsets = snap.model_version, snap.next_offsets
            log.info("restored %s: %d events, offsets %s", snap.path.name, snap.events_applied, offsets)
        else:
            engine, version = initial_engine(cfg.model, device)
            offsets = {}
            log.info(
                "no snapshot in %s: starting %s from the beginning of %s", self.store.root, version, topic
            )
        engine.eval()
        engine.fold_pending()  # a checkpoint may hold pending messages; queries then never fold
        self.live = LiveEngine(engine, version, offsets)
        self.metrics.model_info.info(
            {"version": version, "model": engine.config.label, "device": str(device)}
        )
        self.metrics.events_applied.set(int(engine.events_applied))
        self.metrics.memory_nodes.set(len(engine.ids))

        kafka = cfg.ingest.kafka
        self.fetcher = Prefetcher(cfg.ingest, offsets)
        self.fetcher.start()
        self.live.next_offsets = dict(self.fetcher.start_offsets)
        dead_letters = None
        if cfg.ingest.dlq_enabled:
            _ensure_topic(kafka, dlq_topic(topic))
            producer = KafkaProducer(**kafka.client_kwargs(), acks="all", linger_ms=5, max_block_ms=10_000)
            dead_letters = DeadLetterPublisher(producer, topic)
        decoder = RecordDecoder(
            edge_dim=engine.config.edge_dim,
            encoding=cfg.ingest.encoding,
            max_record_bytes=cfg.ingest.max_record_bytes,
            allow_self_loops=cfg.ingest.allow_self_loops,
            max_abs_ts_s=cfg.ingest.max_abs_ts_s,
        )
        self.loop = IngestLoop(
            cfg.ingest,
            self.live,
            self.fetcher,
            decoder,
            dead_letters,
            self.store,
            cfg.snapshots,
            self.metrics,
        )
        self.server, self.health, self.grpc_port = build_server(self.live, cfg.grpc, self.metrics)
        self._ingest_thread = threading.Thread(target=self._ingest, name="ingest", daemon=True)
        self._stopped = threading.Event()
        self.ingest_error: BaseException | None = None

    def _ingest(self) -> None:
        try:
            self.loop.run()
        except BaseException as e:  # keep serving the last state, but say so loudly
            self.ingest_error = e
            log.exception("ingest loop died; serving the last applied state")

    def start(self) -> None:
        cfg = self.config
        http, _ = start_http_server(cfg.metrics_port, cfg.metrics_host, registry=self.metrics.registry)
        self.metrics_port = http.server_port
        self.server.start()
        self._ingest_thread.start()
        log.info(
            "serving %s: gRPC on %s:%d, metrics on http://%s:%d/metrics",
            self.live.model_version,
            cfg.grpc.host,
            self.grpc_port,
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

    def stop(self, grace: float | None = None) -> None:
        """Stop ingest (final snapshot), then drain gRPC (health says NOT_SERVING first)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.loop.stop()
        self._ingest_thread.join(timeout=60)
        stop_server(self.server, self.health, self.config.grpc.shutdown_grace_s if grace is None else grace)


def run_server(config: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    proc = ServingProcess(config)
    done = threading.Event()

    def _on_signal(signum, _frame):
        log.info("signal %d: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    proc.start()
    while not done.wait(0.5):
        pass
    proc.stop()
    return 1 if proc.ingest_error is not None else 0
