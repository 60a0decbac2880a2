"""``tgnstream demo``: the whole loop on one machine, watched live.

Composition root of the demo: an embedded broker; a start model (``--checkpoint``, or trained
for a few epochs on the first ``--start-frac`` of the dataset) published as ``v000001``; a
server (``tgnstream serve``) and the continual trainer (``tgnstream trainer``) as processes;
the rest of the dataset replayed at ``--rate`` events/s; a steady Score + TopK load through
``tgnstream.client``. A terminal view shows events/s, lag, online AP/MRR, query latency, the
served version and the trainer's last gate decision. It ends after ``--duration-s`` (or on
Ctrl-C / SIGTERM) with a summary, ``summary.json`` and PNG plots in its run folder, and leaves
no process behind. Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DemoConfig", "add_parser", "run_demo", "scrape_metrics"]

log = logging.getLogger(__name__)


class DemoConfig(BaseModel):
    """What the demo runs (every field is a command-line flag)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: Path = Field(Path("../shared/datasets/wikipedia.csv"), description="dataset to replay")
    limit: int | None = Field(None, ge=1000, description="replay only the first N events")
    duration_s: float = Field(120.0, gt=0, description="stop after this long (Ctrl-C stops earlier)")
    rate: float = Field(1000.0, gt=0, description="replay rate after the start, events/s")
    start_frac: float = Field(0.1, gt=0, lt=1, description="share of the stream the start model sees")
    epochs: int = Field(2, ge=1, description="offline epochs of the start model (without --checkpoint)")
    checkpoint: Path | None = Field(None, description="start from these weights (e.g. make train's)")
    batch: int = Field(200, ge=1, description="stream batch of server and trainer")
    query_rate: float = Field(20.0, gt=0, description="Score and TopK requests/s each")
    every_events: int = Field(5_000, ge=100, description="the trainer's round interval, events")
    out: Path = Field(Path("runs/demo"), description="run folders go here")
    live_view: bool = Field(True, description="redraw a terminal view (else: a status line every 5 s)")


@dataclass
class Observed:
    """What the demo saw, over time (wall time first in every row)."""

    server: list[tuple[float, dict]] = field(default_factory=list)
    trainer: list[tuple[float, dict]] = field(default_factory=list)
    queries: list[tuple[float, str, float, bool, str]] = field(default_factory=list)  # t, rpc, s, ok, version
    lock: threading.Lock = field(default_factory=threading.Lock)


def scrape_metrics(port: int) -> dict[str, float]:
    """The samples a local ``/metrics`` endpoint exposes now: ``{series with labels: value}``."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
    return out


def _ready(metrics_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=2) as reply:
            return reply.status == 200
    except OSError:  # 503 (HTTPError) while restoring, or not listening yet
        return False


def _sum(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k == prefix or k.startswith(prefix + "{"))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Demo:
    """One demo run (see the module docstring)."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.run_dir = cfg.out / time.strftime("%Y%m%d-%H%M%S")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stop = threading.Event()
        self.observed = Observed()
        self.procs: dict[str, subprocess.Popen] = {}
        self.versions: list[tuple[float, str]] = []

    # ------------------------------------------------------------------------------ run
    def run(self) -> dict:
        from tgnstream.apps.broker import EmbeddedBroker
        from tgnstream.apps.replay import encode_event
        from tgnstream.core.loaders import load_dataset
        from tgnstream.runtime.models import ModelStore
        from tgnstream.stream.kafka_admin import create_topic
        from tgnstream.trainer.bootstrap import featureless, publish_start_model

        cfg = self.cfg
        if not cfg.data.is_file():
            raise ValueError(f"dataset {cfg.data} not found (see ../shared/datasets/README)")
        data = featureless(load_dataset(cfg.data, limit=cfg.limit))
        n = len(data)
        n0 = max(cfg.batch, int(n * cfg.start_frac) // cfg.batch * cfg.batch)
        topic = "events"
        print(f"tgnstream demo: {cfg.data.name}, {n} events; run folder {self.run_dir}", flush=True)
        print(f"[1/4] start model on the first {n0} events ...", flush=True)
        models = self.run_dir / "models"
        publish_start_model(
            ModelStore(models), data, n0, cfg.batch, topic, cfg.epochs, checkpoint=cfg.checkpoint
        )
        names = data.raw_ids
        ev = data.events
        pairs = [(names[s], names[d]) for s, d in zip(ev.src[:n0].tolist(), ev.dst[:n0].tolist())]
        values = [
            encode_event(names[s], names[d], t)
            for s, d, t in zip(data.events.src.tolist(), data.events.dst.tolist(), data.events.t.tolist())
        ]
        print("[2/4] embedded broker ...", flush=True)
        with EmbeddedBroker(log_path=self.run_dir / "broker.log") as broker:
            create_topic(broker.bootstrap, topic, 1)
            _produce(broker.bootstrap, topic, values[:n0], rate=None, stop=self.stop)
            print("[3/4] server and trainer ...", flush=True)
            ports = self._start_services(broker.bootstrap, topic, models)
            print(
                f"[4/4] replaying {n - n0} events at {cfg.rate:g}/s, up to {cfg.duration_s:g} s; Ctrl-C stops"
            )
            threads = [
                threading.Thread(
                    target=_produce,
                    args=(broker.bootstrap, topic, values[n0:], cfg.rate, self.stop),
                    daemon=True,
                ),
                threading.Thread(target=self._query_load, args=(ports["grpc"], pairs), daemon=True),
                threading.Thread(target=self._watch, args=(ports,), daemon=True),
            ]
            started = time.time()
            for t in threads:
                t.start()
            try:
                self._view(started)
            finally:
                self.stop.set()
                for t in threads:
                    t.join(10)
                self._stop_services()
        return self._summary(started, n, n0)

    # --------------------------------------------------------------------------- services
    def _start_services(self, bootstrap: str, topic: str, models: Path) -> dict[str, int]:
        cfg, d = self.cfg, self.run_dir
        stream = {"batch_max_events": cfg.batch, "batch_max_wait_ms": 50, "max_future_s": 1e12}
        serve = {
            "model": {"preset": "tgn"},
            "ingest": {
                **stream,
                "kafka": {"bootstrap_servers": bootstrap, "topic": topic},
                "dlq_enabled": False,
            },
            "grpc": {"host": "127.0.0.1", "port": 0, "readers": 0},
            "snapshots": {"dir": str(d / "snapshots"), "every_seconds": 30},
            "models": {"dir": str(models), "watch_interval_s": 1.0},
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "torch_threads": 1,
            "ready_file": str(d / "serve.ready"),
        }
        trainer = {
            "stream": {**stream, "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "group_id": None}},
            "training": {
                "window_events": 4 * cfg.every_events,
                "every_events": cfg.every_events,
                "min_new_events": cfg.every_events // 2,
                "holdout_events": max(200, cfg.every_events // 5),
                "batch_size": 1000,
            },
            "publish": {"dir": str(models), "keep": 20},
            "checkpoints": {"dir": str(d / "trainer")},
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "torch_threads": 1,
            "progress": False,
            "ready_file": str(d / "trainer.ready"),
        }
        (d / "serve.json").write_text(json.dumps(serve, indent=1))
        (d / "trainer.json").write_text(json.dumps(trainer, indent=1))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        cli = [sys.executable, "-m", "tgnstream"]
        for name in ("serve", "trainer"):
            self.procs[name] = subprocess.Popen(
                [*cli, name, "--config", str(d / f"{name}.json")],
                stdout=open(d / f"{name}.log", "wb"),
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the demo only; it stops them in order
            )
        ports: dict[str, int] = {}
        deadline = time.monotonic() + 120
        for name, ready in (("serve", "serve.ready"), ("trainer", "trainer.ready")):
            while not (d / ready).exists():
                if self.procs[name].poll() is not None:
                    raise RuntimeError(
                        f"tgnstream {name} exited ({self.procs[name].returncode}); see {d / (name + '.log')}"
                    )
                if time.monotonic() > deadline or self.stop.is_set():
                    raise RuntimeError(f"tgnstream {name} did not start; see {d / (name + '.log')}")
                time.sleep(0.1)
            info = json.loads((d / ready).read_text())
            if name == "serve":
                ports["grpc"], ports["serve_metrics"] = info["grpc_port"], info["metrics_port"]
            else:
                ports["trainer_metrics"] = info["metrics_port"]
        # The server answers once it has restored its state and caught up with the log (/readyz).
        while not _ready(ports["serve_metrics"]):
            if self.procs["serve"].poll() is not None or time.monotonic() > deadline or self.stop.is_set():
                raise RuntimeError(f"tgnstream serve did not become ready; see {d / 'serve.log'}")
            time.sleep(0.1)
        return ports

    def _stop_services(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                log.warning("tgnstream %s did not stop within 60 s: killed", name)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    # ------------------------------------------------------------------------ activity
    def _query_load(self, port: int, pairs: list[tuple[str, str]]) -> None:
        """Score (a pair of the stream) and TopK (its source) at ``query_rate`` each."""
        import grpc

        from tgnstream.client import LinkPredictionClient

        rng = random.Random(0)
        interval = 1.0 / self.cfg.query_rate
        with LinkPredictionClient(f"127.0.0.1:{port}", timeout_s=5, retries=2) as client:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                src, dst = pairs[rng.randrange(len(pairs))]
                for rpc in ("score", "topk"):
                    s = time.perf_counter()
                    try:
                        reply = client.score([(src, dst)]) if rpc == "score" else client.top_k(src, 10)
                        row = (time.time(), rpc, time.perf_counter() - s, True, reply.state.model_version)
                    except grpc.RpcError as e:
                        row = (time.time(), rpc, time.perf_counter() - s, False, e.code().name)
                    with self.observed.lock:
                        self.observed.queries.append(row)
                self.stop.wait(max(0.0, interval - (time.perf_counter() - t0)))

    def _watch(self, ports: dict[str, int]) -> None:
        while not self.stop.is_set():
            now = time.time()
            try:
                sm = scrape_metrics(ports["serve_metrics"])
                with self.observed.lock:
                    self.observed.server.append((now, sm))
            except OSError:
                pass
            try:
                tm = scrape_metrics(ports["trainer_metrics"])
                with self.observed.lock:
                    self.observed.trainer.append((now, tm))
            except OSError:
                pass
            self.stop.wait(1.0)

    # ----------------------------------------------------------------------------- view
    def _state(self, started: float) -> dict:
        with self.observed.lock:
            server = self.observed.server[-6:]
            trainer = self.observed.trainer[-1][1] if self.observed.trainer else {}
            recent = [q for q in self.observed.queries if q[0] >= time.time() - 10]
        s = server[-1][1] if server else {}
        rate = 0.0
        if len(server) >= 2:
            (t0, a), (t1, b) = server[0], server[-1]
            rate = (b.get("tgnstream_events_applied", 0) - a.get("tgnstream_events_applied", 0)) / max(
                1e-9, t1 - t0
            )
        version = next(
            (k.split('version="')[1].split('"')[0] for k in s if k.startswith("tgnstream_model_info{")), "?"
        )
        lat = {rpc: [1000 * q[2] for q in recent if q[1] == rpc and q[3]] for rpc in ("score", "topk")}
        return {
            "elapsed_s": time.time() - started,
            "events_applied": s.get("tgnstream_events_applied", 0),
            "events_per_s": rate,
            "ingest_lag": _sum(s, "tgnstream_ingest_lag_records"),
            "online_ap": s.get("tgnstream_online_ap"),
            "online_mrr": s.get("tgnstream_online_mrr"),
            "version": version,
            "score_p50": _pct(lat["score"], 0.5),
            "score_p99": _pct(lat["score"], 0.99),
            "topk_p50": _pct(lat["topk"], 0.5),
            "topk_p99": _pct(lat["topk"], 0.99),
            "failed": sum(1 for q in recent if not q[3]),
            "trainer_lag": trainer.get("tgnstream_trainer_lag_records"),
            "rounds": {
                r: trainer.get(f'tgnstream_trainer_rounds_total{{result="{r}"}}', 0)
                for r in ("published", "rejected", "failed")
            },
            "gate": (
                trainer.get('tgnstream_trainer_gate_ap{model="candidate"}'),
                trainer.get('tgnstream_trainer_gate_ap{model="published"}'),
            ),
            "window": trainer.get("tgnstream_trainer_window_events"),
        }

    def _view(self, started: float) -> None:
        tty = self.cfg.live_view and sys.stdout.isatty()
        last_line = 0.0
        while not self.stop.is_set() and time.time() - started < self.cfg.duration_s:
            st = self._state(started)
            if st["version"] != "?" and (not self.versions or self.versions[-1][1] != st["version"]):
                self.versions.append((time.time(), st["version"]))
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J" + _panel(st) + "\n")
                sys.stdout.flush()
            elif time.time() - last_line >= 5:
                last_line = time.time()
                print(_line(st), flush=True)
            self.stop.wait(1.0)

    # -------------------------------------------------------------------------- summary
    def _summary(self, started: float, n: int, n0: int) -> dict:
        st = self._state(started)
        queries = self.observed.queries
        ok = {rpc: [1000 * q[2] for q in queries if q[1] == rpc and q[3]] for rpc in ("score", "topk")}
        summary = {
            "run_dir": str(self.run_dir),
            "duration_s": time.time() - started,
            "dataset": str(self.cfg.data),
            "events": n,
            "start_events": n0,
            "events_applied": st["events_applied"],
            "online_ap": st["online_ap"],
            "online_mrr": st["online_mrr"],
            "versions_served": [v for _, v in self.versions],
            "gate_decisions": st["rounds"],
            "queries": {
                rpc: {"ok": len(v), "p50_ms": _pct(v, 0.5), "p99_ms": _pct(v, 0.99)} for rpc, v in ok.items()
            },
            "failed_queries": sum(1 for q in queries if not q[3]),
            "plots": [],
        }
        summary["plots"] = _plots(self.run_dir, self.observed, self.versions)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def _produce(
    bootstrap: str, topic: str, values: list[bytes], rate: float | None, stop: threading.Event
) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    started = time.perf_counter()
    for i, v in enumerate(values):
        if stop.is_set():
            break
        if rate is not None:
            wait = started + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        while True:
            try:
                p.produce(topic, value=v, partition=0)
                break
            except BufferError:
                p.poll(0.05)
        if i % 1000 == 0:
            p.poll(0)
    p.flush(30)


def _fmt(x, spec: str = ".3f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _latency(st: dict) -> str:
    score = f"{_fmt(st['score_p50'], '.1f')} / {_fmt(st['score_p99'], '.1f')}"
    topk = f"{_fmt(st['topk_p50'], '.1f')} / {_fmt(st['topk_p99'], '.1f')}"
    return f"Score p50/p99 {score} ms, TopK p50/p99 {topk} ms"


def _panel(st: dict) -> str:
    r = st["rounds"]
    cand, pub = st["gate"]
    ingest = f"{st['events_per_s']:7.0f} events/s   applied {st['events_applied']:.0f}"
    trainer = f"lag {_fmt(st['trainer_lag'], '.0f')} records, window {_fmt(st['window'], '.0f')} events"
    rounds = f"{r['published']:.0f} published, {r['rejected']:.0f} rejected, {r['failed']:.0f} failed"
    return "\n".join(
        [
            "tgnstream demo  (Ctrl-C stops)",
            f"  elapsed          {st['elapsed_s']:7.0f} s",
            f"  ingest           {ingest}   lag {st['ingest_lag']:.0f} records",
            f"  online quality   AP {_fmt(st['online_ap'])}   MRR {_fmt(st['online_mrr'])}   (prequential)",
            f"  queries (10 s)   {_latency(st)}   failed {st['failed']}",
            f"  served model     {st['version']}",
            f"  trainer          {trainer}; rounds: {rounds}",
            f"  last gate        holdout AP candidate {_fmt(cand)} vs published {_fmt(pub)}",
        ]
    )


def _line(st: dict) -> str:
    r = st["rounds"]
    quality = f"AP {_fmt(st['online_ap'])}, MRR {_fmt(st['online_mrr'])}"
    return (
        f"[{st['elapsed_s']:5.0f} s] {st['events_per_s']:6.0f} ev/s, lag {st['ingest_lag']:.0f}, {quality}, "
        f"{_latency(st)}, model {st['version']}, rounds {r['published']:.0f} published, "
        f"{r['rejected']:.0f} rejected"
    )


def _plots(run_dir: Path, obs: Observed, versions: list[tuple[float, str]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not obs.server:
        return []
    t0 = obs.server[0][0]
    out = []
    fig, ax = plt.subplots(figsize=(9, 4))
    scored = [(t - t0, m) for t, m in obs.server if m.get("tgnstream_online_scored_events_total", 0) > 0]
    for key, label in (("tgnstream_online_ap", "online AP"), ("tgnstream_online_mrr", "online MRR")):
        ax.plot([x for x, _ in scored], [m.get(key, float("nan")) for _, m in scored], label=label)
    for t, v in versions[1:]:
        ax.axvline(t - t0, color="grey", alpha=0.4, lw=1)
        ax.text(t - t0, 0.02, v, rotation=90, fontsize=7, color="grey", transform=ax.get_xaxis_transform())
    ax.set_xlabel("seconds (grey: hot swaps to the named version)")
    ax.set_ylim(0, 1)
    ax.set_title("online quality of the served model (prequential)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "online_quality.png", dpi=100)
    plt.close(fig)
    out.append(str(run_dir / "online_quality.png"))
    fig, ax = plt.subplots(figsize=(9, 4))
    for rpc in ("score", "topk"):
        pts = [(q[0] - t0, 1000 * q[2]) for q in obs.queries if q[1] == rpc and q[3]]
        if pts:
            ax.plot(*zip(*pts), ".", ms=2, label=rpc)
    for t, _ in versions[1:]:
        ax.axvline(t - t0, color="grey", alpha=0.4, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("seconds (grey: hot swaps)")
    ax.set_ylabel("latency, ms")
    ax.set_title("query latency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "query_latency.png", dpi=100)
    plt.close(fig)
    out.append(str(run_dir / "query_latency.png"))
    return out


# ----------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole loop on this machine: broker, server, trainer, replay, queries, live view",
        description=__doc__.split("\n\n")[1],
    )
    for name, f in DemoConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if f.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.description)
        else:
            p.add_argument(flag, default=None, help=f"{f.description} (default: {f.default})")
    p.set_defaults(func=_run)


def _run(args) -> int:
    values = {k: getattr(args, k) for k in DemoConfig.model_fields if getattr(args, k, None) is not None}
    return run_demo(DemoConfig(**values))


def run_demo(cfg: DemoConfig) -> int:
    """Run the demo; 0 when it ran and stopped cleanly."""
    demo = Demo(cfg)

    def on_signal(signum, _frame):
        demo.stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    logging.getLogger("kafka").setLevel(logging.WARNING)
    logging.getLogger("tgnstream").setLevel(logging.WARNING)  # the view is the output
    try:
        summary = demo.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    q = summary["queries"]
    latency = _latency({f"{rpc}_{p}": q[rpc][f"{p}_ms"] for rpc in ("score", "topk") for p in ("p50", "p99")})
    lines = [
        "",
        f"summary: {summary['events_applied']:.0f} events applied in {summary['duration_s']:.0f} s",
        f"  online AP {_fmt(summary['online_ap'])}, MRR {_fmt(summary['online_mrr'])}",
        f"  versions served: {' -> '.join(summary['versions_served'])}",
        f"  gate decisions: {summary['gate_decisions']}",
        f"  {latency}; failed queries {summary['failed_queries']}",
        f"  {demo.run_dir / 'summary.json'}",
        *[f"  {p}" for p in summary["plots"]],
    ]
    print("\n".join(lines), flush=True)
    return 0
