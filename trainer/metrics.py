"""Prometheus metrics of the continual trainer process, prefix ``tgnstream_trainer_``.

A registry of its own (tests run several in one interpreter); every labelled series is created
at start so dashboards and alerts see 0, not absence.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from tgnstream.runtime.metrics import standard_collectors

__all__ = ["ROUND_RESULTS", "TrainerMetrics"]

#: Values of the ``result`` label of tgnstream_trainer_rounds_total.
ROUND_RESULTS = ("published", "rejected", "skipped", "failed")
_MODELS = ("candidate", "published")


class TrainerMetrics:
    """All metrics a ``tgnstream trainer`` process exports (docs/training.md)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        standard_collectors(r)
        self.events = Counter(
            "tgnstream_trainer_events_total", "Stream events applied to the trainer's state", registry=r
        )
        self.rejected = Counter(
            "tgnstream_trainer_records_rejected_total",
            "Records of the topic that are not events, by reason (the server dead-letters the same ones)",
            ["reason"],
            registry=r,
        )
        self.rounds = Counter(
            "tgnstream_trainer_rounds_total",
            "Fine-tuning rounds by result: published (passed the gate), rejected (by the gate), "
            "skipped (no holdout to gate on, nothing trained), failed (error)",
            ["result"],
            registry=r,
        )
        for result in ROUND_RESULTS:
            self.rounds.labels(result)
        self.round_seconds = Histogram(
            "tgnstream_trainer_round_seconds",
            "Duration of a round (fine-tuning + gate)",
            buckets=(1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.loss = Gauge(
            "tgnstream_trainer_loss", "Mean training loss of the last round's last epoch", registry=r
        )
        self.train_events_per_second = Gauge(
            "tgnstream_trainer_train_events_per_second", "Training throughput of the last round", registry=r
        )
        self.gate_ap = Gauge(
            "tgnstream_trainer_gate_ap",
            "Holdout AP of the last gate, by model (candidate, published)",
            ["model"],
            registry=r,
        )
        self.gate_mrr = Gauge(
            "tgnstream_trainer_gate_mrr",
            "Holdout MRR of the last gate, by model (candidate, published)",
            ["model"],
            registry=r,
        )
        for m in _MODELS:
            self.gate_ap.labels(m)
            self.gate_mrr.labels(m)
        self.lag_records = Gauge(
            "tgnstream_trainer_lag_records",
            "Records between the trainer's position and the log end",
            registry=r,
        )
        self.window_events = Gauge(
            "tgnstream_trainer_window_events", "Events in the training window", registry=r
        )
        self.pipeline_staleness = Gauge(
            "tgnstream_trainer_pipeline_staleness_batches",
            "Largest number of write-backs a memory read missed in the last round (MSPipe bound; "
            "0 sequential)",
            registry=r,
        )
        self.pipeline_stale_share = Gauge(
            "tgnstream_trainer_pipeline_stale_rows_ratio",
            "Share of memory rows read stale in the last round",
            registry=r,
        )
        self.last_publish = Gauge(
            "tgnstream_trainer_last_publish_timestamp_seconds",
            "Unix time of the last published version",
            registry=r,
        )
        self.published = Info(
            "tgnstream_trainer_published", "The newest version this trainer published", registry=r
        )
        self.checkpoints = Counter(
            "tgnstream_trainer_checkpoints_total",
            "Trainer checkpoints by result (ok, error)",
            ["result"],
            registry=r,
        )
        for result in ("ok", "error"):
            self.checkpoints.labels(result)

    def observe_round(self, result) -> None:
        """Record a ``RoundResult``."""
        self.rounds.labels(result.decision).inc()
        if result.decision == "skipped":
            return  # nothing trained or measured
        self.round_seconds.observe(result.seconds)
        self.loss.set(result.loss)
        self.train_events_per_second.set(result.train_events_per_s)
        for model, metrics in (("candidate", result.candidate), ("published", result.published)):
            if "ap" in metrics:
                self.gate_ap.labels(model).set(metrics["ap"])
            if "mrr" in metrics:
                self.gate_mrr.labels(model).set(metrics["mrr"])
        st = result.staleness
        self.pipeline_staleness.set(st.get("max_staleness", 0))
        rows = st.get("memory_rows_read", 0)
        self.pipeline_stale_share.set(st.get("stale_node_rows", 0) / rows if rows else 0.0)
