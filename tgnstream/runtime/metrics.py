"""Prometheus metrics of the serving process (ingest + gRPC), prefix ``tgnstream_``.

One object per process, built on a registry of its own so tests can run several servers in
one interpreter. Names follow Prometheus conventions: base units, ``_total`` counters, no node
ids in labels; gRPC uses the conventional ``grpc_server_*`` names (py-grpc-prometheus parity).
"""

from __future__ import annotations

import threading

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from tgnstream.runtime.preflight import REFUSAL_REASONS
from tgnstream.stream.records import REASONS as RECORD_REASONS

__all__ = [
    "standard_collectors",
    "ServerMetrics",
    "INGEST_RESULTS",
    "NONFINITE_WHERE",
    "reader_families",
    "ReaderMetrics",
]

# Every reason a record is dead-lettered for (decoding, time screening, a damaged model).
DLQ_REASONS = (*RECORD_REASONS, "too_late", "too_far_ahead", "node_limit", "non_finite_state")

# Every value the ``result`` label of tgnstream_ingest_events_total takes.
INGEST_RESULTS = ("applied", "late_clamped", "dlq")

# Where a NaN/inf can be caught: a batch about to be applied, or a reply about to be sent.
NONFINITE_WHERE = ("ingest", "score", "topk", "embed")

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def standard_collectors(registry: CollectorRegistry) -> None:
    """``process_*`` (CPU, RSS, open fds), ``python_*`` (GC, platform) and
    ``tgnstream_build_info`` on a process's own registry."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    try:
        ours = version("tgnstream")
    except PackageNotFoundError:
        ours = "unknown"
    Info("tgnstream_build", "Versions of this process's software", registry=registry).info(
        {"version": ours, "python": platform.python_version(), "torch": torch.__version__}
    )


class ServerMetrics:
    """All metrics a ``tgnstream serve`` process exports (docs/serving.md, "Metrics")."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        standard_collectors(r)
        # --- ingest
        self.ingest_events = Counter(
            "tgnstream_ingest_events_total",
            "Kafka records handled by the ingest loop, by result: applied (to memory), "
            "late_clamped (applied with its time gap clamped at 0; not counted again as applied), "
            "dlq (sent to the dead-letter topic)",
            ["result"],
            registry=r,
        )
        for result in INGEST_RESULTS:
            self.ingest_events.labels(result)
        self.ingest_dlq = Counter(
            "tgnstream_ingest_dlq_total",
            "Records sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        for reason in DLQ_REASONS:
            self.ingest_dlq.labels(reason)
        self.nonfinite = Counter(
            "tgnstream_nonfinite_total",
            "NaN/inf caught before it reached the state or a client: events dead-lettered as "
            "non_finite_state (where=ingest), replies refused with INTERNAL (where=score/topk/embed)",
            ["where"],
            registry=r,
        )
        for where in NONFINITE_WHERE:
            self.nonfinite.labels(where)
        self.ingest_batch_seconds = Histogram(
            "tgnstream_ingest_batch_seconds",
            "Wall time to apply one micro-batch to memory (decode excluded)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ingest_batch_events = Histogram(
            "tgnstream_ingest_batch_events",
            "Events per applied micro-batch",
            buckets=(1, 10, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
            registry=r,
        )
        self.ingest_lag_records = Gauge(
            "tgnstream_ingest_lag_records",
            "Records in the partition not yet applied (high watermark - next offset, >= 0)",
            ["topic", "partition"],
            registry=r,
        )
        self.ingest_lag_seconds = Gauge(
            "tgnstream_ingest_lag_seconds",
            "Wall-clock age of the newest applied record (now - its Kafka timestamp); 0 when caught up",
            ["topic", "partition"],
            registry=r,
        )
        self.ingest_connected = Gauge(
            "tgnstream_ingest_connected",
            "1 while the Kafka consumer has a working broker connection, 0 while it cannot reach one",
            registry=r,
        )
        self.ingest_restarts = Counter(
            "tgnstream_ingest_restarts_total",
            "Times the ingest side (fetch process + loop) failed and was restarted",
            registry=r,
        )
        self.ingest_log_resets = Counter(
            "tgnstream_ingest_log_resets_total",
            "Times a partition's position was moved to the log start because the log moved behind "
            "it (policy on_log_gap=reset)",
            ["topic", "partition"],
            registry=r,
        )
        self.ready = Gauge(
            "tgnstream_ready",
            "1 when the process is ready (restored, ingest up, broker reachable, lag within bound)",
            registry=r,
        )
        self.ingest_watermark = Gauge(
            "tgnstream_ingest_watermark_seconds", "Latest event time applied (event clock)", registry=r
        )
        # --- memory
        self.memory_nodes = Gauge("tgnstream_memory_nodes", "Nodes known to the live memory", registry=r)
        self.memory_pairs = Gauge(
            "tgnstream_memory_pairs", "Node pairs held in the pair history (after retention)", registry=r
        )
        self.pairs_forgotten = Counter(
            "tgnstream_pairs_forgotten_total",
            "Pairs the pair-history retention forgot, by rule (age, count)",
            ["rule"],
            registry=r,
        )
        for rule in ("age", "count"):  # exported at zero: without retention they stay there
            self.pairs_forgotten.labels(rule)
        self.memory_device_bytes = Gauge(
            "tgnstream_memory_device_bytes",
            "Bytes held by the engine's state and weights on its device",
            registry=r,
        )
        self.events_applied = Gauge(
            "tgnstream_events_applied",
            "Events reflected in the live memory (restored + ingested)",
            registry=r,
        )
        # --- snapshots
        self.snapshot_age = Gauge(
            "tgnstream_snapshot_age_seconds",
            "Seconds since the oldest applied change that no durable snapshot holds yet (0 when the newest "
            "snapshot holds the whole state, e.g. on an idle topic)",
            registry=r,
        )
        self.snapshot_seconds = Histogram(
            "tgnstream_snapshot_duration_seconds",
            "Wall time to write one snapshot (copy + serialise + fsync)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.snapshots = Counter(
            "tgnstream_snapshots_total", "Snapshot attempts by result (ok/error)", ["result"], registry=r
        )
        for result in ("ok", "error"):
            self.snapshots.labels(result)
        # --- live quality (prequential: scored before the events are applied)
        self.online_ap = Gauge(
            "tgnstream_online_ap", "Rolling average precision of the served model on live events", registry=r
        )
        self.online_mrr = Gauge(
            "tgnstream_online_mrr",
            "Rolling mean reciprocal rank of the served model on live events",
            registry=r,
        )
        self.online_scored = Counter(
            "tgnstream_online_scored_events_total", "Live events scored for online quality", registry=r
        )
        # --- model
        self.model_info = Info("tgnstream_model", "The model being served", registry=r)
        self.model_swaps = Counter(
            "tgnstream_model_swaps_total",
            "Published versions handled by hot swap, by result: swapped (now serving it; reason empty), "
            "refused (reason: unloadable, manifest, nonfinite_weights, architecture, topic, offsets, replay, "
            "canary; see docs/serving.md)",
            ["result", "reason"],
            registry=r,
        )
        self.model_swaps.labels("swapped", "")
        for reason in REFUSAL_REASONS:
            self.model_swaps.labels("refused", reason)
        self.model_lineage_changes = Counter(
            "tgnstream_model_lineage_changes_total",
            "Times the models store started a new lineage (wiped, or another trainer), which the server "
            "then follows (its versions pass the same pre-flight)",
            registry=r,
        )
        self.model_swap_seconds = Histogram(
            "tgnstream_model_swap_seconds",
            "From picking up a published version to serving it (load + catch-up + swap)",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250),
            registry=r,
        )
        self.model_swap_pause_seconds = Histogram(
            "tgnstream_model_swap_pause_seconds",
            "How long a hot swap held the write lock (queries and ingest wait that long)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # --- gRPC (conventional names)
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.grpc_started = Counter(
            "grpc_server_started_total", "RPCs started on the server", labels, registry=r
        )
        self.grpc_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code",
            [*labels, "grpc_code"],
            registry=r,
        )
        self.grpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to sending its reply",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.grpc_inflight = Gauge(
            "tgnstream_grpc_inflight_requests", "RPCs being handled right now", registry=r
        )
        # --- reader processes (sequence-lock reads of the shared state)
        self.reader_retries = Counter(
            "tgnstream_reader_retries_total",
            "Answers computed again because the writer changed the state while they were computed",
            registry=r,
        )
        self.reader_fallbacks = Counter(
            "tgnstream_reader_fallbacks_total",
            "Answers computed under the commit lock (the writer waited) after repeated retries",
            registry=r,
        )
        self.topk_cache_entries = Counter(
            "tgnstream_topk_cache_entries_total",
            "TopK candidate-embedding entries a reader process obtained, by source: computed "
            "(by this reader) or shared (copied from the reader that computed it)",
            ["source"],
            registry=r,
        )
        self.topk_candidates_embedded = Counter(
            "tgnstream_topk_candidates_embedded_total",
            "Candidate embeddings in the TopK entries a reader process computed: computed now, or "
            "reused from its previous entry (grpc.topk_candidate_time=last_change)",
            ["how"],
            registry=r,
        )
        self.reader_restarts = Counter(
            "tgnstream_reader_restarts_total", "Reader processes that died and were restarted", registry=r
        )
        self.readers_alive = Gauge("tgnstream_readers_alive", "Reader processes running", registry=r)


# Families a reader process owns (the request side); the serving process exports them per reader.
_READER_PREFIXES = (
    "grpc_server_",
    "tgnstream_grpc_",
    "tgnstream_reader_retries",
    "tgnstream_reader_fallbacks",
    "tgnstream_topk_cache_entries",
    "tgnstream_topk_candidates_embedded",
)
_READER_NONFINITE = "tgnstream_nonfinite"


def reader_families(registry: CollectorRegistry) -> list[Metric]:
    """The request-side families of a reader's registry (picklable, sent to the serving process)."""
    out = []
    for fam in registry.collect():
        if fam.name.startswith(_READER_PREFIXES):
            out.append(fam)
        elif fam.name == _READER_NONFINITE:
            fam.samples = [s for s in fam.samples if s.labels.get("where") != "ingest"]
            out.append(fam)
    return out


class ReaderMetrics:
    """A collector that merges the serving process's own families with the latest ones each
    reader sent, adding a ``reader`` label to theirs (one family per name, as the exposition
    format requires). Register it on a fresh registry together with nothing else."""

    def __init__(self, own: CollectorRegistry):
        self._own = own
        self._lock = threading.Lock()
        self._readers: dict[int, list[Metric]] = {}

    def update(self, index: int, families: list[Metric]) -> None:
        with self._lock:
            self._readers[index] = families

    def collect(self):
        with self._lock:
            readers = dict(self._readers)
        merged: dict[str, Metric] = {}
        for fam in self._own.collect():
            merged[fam.name] = fam
        for index in sorted(readers):
            for fam in readers[index]:
                target = merged.get(fam.name)
                if target is None:
                    target = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                target.samples.extend(
                    Sample(s.name, {**s.labels, "reader": str(index)}, s.value, s.timestamp, s.exemplar)
                    for s in fam.samples
                )
        yield from merged.values()
