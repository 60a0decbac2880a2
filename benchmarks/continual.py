"""Continual training against a frozen model and the memorization heuristic, on the live path.

Per dataset: a model is trained offline on the first ``--start-frac`` of the stream only and
published as ``v000001`` (its state: those events replayed as a server applies them). Then, on
the embedded broker, the first part is on the topic, a server (``tgnstream serve``, starting
from ``v000001``, hot swap on) and the trainer (``tgnstream trainer``) run as processes, the rest
of the stream is fed at ``--rate`` events/s by a C producer (confluent-kafka), and a light
client sends Score requests throughout. Recorded live: every swap (version, offsets, duration,
write-lock pause), the trainer's lag, the server's ingest lag, query latency and failures.

Prequential quality is then computed exactly, offline, from what the server served: for each
interval between two swaps, that version is replayed from its offsets to the swap's offsets
(as the server's catch-up did) and scores each event of the interval before applying it, on the
evaluation protocol of ``tgnstream.core.stream_eval`` (AP; MRR against every destination, ties
half). The same events are scored by (a) ``v000001`` frozen, (b) the served versions
(continual), (c) the heuristic ``recency>global_recency`` with per-event history.

    python benchmarks/continual.py [--datasets wikipedia,bitcoinotc] [--rate 2000] [--limit N]

Targets (issue 13): continual >= frozen on the last 50% of the stream and >= the heuristic; no
failed query; ingest keeps up with the feed during swaps. Writes
``benchmarks/results/continual.json`` and ``continual_<dataset>.png`` next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import torch
from _harness import RESULTS, ROOT, dataset_path, write_results

from tgnstream.apps.broker import EmbeddedBroker
from tgnstream.apps.demo import scrape_metrics
from tgnstream.apps.replay import encode_event
from tgnstream.core.heuristics import HeuristicScorer
from tgnstream.core.loaders import load_dataset
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream, summarise
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc
from tgnstream.runtime.models import ModelStore
from tgnstream.stream.kafka_admin import create_topic
from tgnstream.trainer.bootstrap import START_LR, featureless, publish_start_model, replay_as_served
from tgnstream.trainer.continual_config import FineTuneConfig

HEURISTIC = "recency>global_recency"
SWAP = re.compile(
    r"^(\S+ \S+) .*hot swap: now serving (v\d+) at offsets \{0: (\d+)\} \(write lock held ([\d.]+) ms\)"
)


class Client(threading.Thread):
    """Score requests at a fixed rate; keeps (wall time, latency s, version, ok)."""

    def __init__(self, port: int, pairs: list[tuple[str, str]], rate: float):
        super().__init__(daemon=True)
        self.port, self.pairs, self.interval = port, pairs, 1.0 / rate
        self.samples: list[tuple[float, float, str, bool]] = []
        self.done = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            stub = pb_grpc.LinkPredictionStub(ch)
            i = 0
            while not self.done.is_set():
                s, d = self.pairs[i % len(self.pairs)]
                i += 1
                t0 = time.perf_counter()
                try:
                    r = stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src=s, dst=d)]), timeout=10)
                    self.samples.append((time.time(), time.perf_counter() - t0, r.state.model_version, True))
                except grpc.RpcError:
                    self.samples.append((time.time(), time.perf_counter() - t0, "", False))
                self.done.wait(max(0.0, self.interval - (time.perf_counter() - t0)))


def _feed(bootstrap: str, topic: str, values: list[bytes], rate: float) -> float:
    """Send ``values`` at ``rate`` records/s with librdkafka; returns when all are delivered."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    started = time.perf_counter()
    for i, v in enumerate(values):
        due = started + i / rate
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        p.produce(topic, value=v, partition=0)
        if i % 1000 == 0:
            p.poll(0)
    p.flush(60)
    return time.perf_counter() - started


def _windows(rr: dict[str, torch.Tensor], pos: dict, neg: dict, k: int) -> list[dict]:
    n = len(next(iter(rr.values())))
    out = []
    for w in range(k):
        lo, hi = n * w // k, n * (w + 1) // k
        row = {"events": [lo, hi]}
        for name in rr:
            s = summarise({"pos": pos[name][lo:hi], "neg": neg[name][lo:hi], "rr": rr[name][lo:hi]})
            row[name] = {"ap": s["ap"], "mrr": s["mrr"]}
        out.append(row)
    return out


def run(name: str, args, work: Path) -> dict:
    data = featureless(load_dataset(dataset_path(name), limit=args.limit))
    names = data.raw_ids
    n = len(data)
    batch = args.batch
    n0 = int(n * args.start_frac) // batch * batch
    print(f"\n== {name}: {n} events, start model trained on the first {n0}", flush=True)
    t0 = time.perf_counter()
    models = work / "models"
    publish_start_model(
        ModelStore(models), data, n0, batch, name, args.epochs, args.lr, args.seed, pres_gamma=args.pres_gamma
    )
    print(f"start model: {time.perf_counter() - t0:.0f} s", flush=True)

    values = [
        encode_event(names[s], names[d], t)
        for s, d, t in zip(data.events.src.tolist(), data.events.dst.tolist(), data.events.t.tolist())
    ]
    with EmbeddedBroker(log_path=work / "broker.log") as broker:
        create_topic(broker.bootstrap, name, 1)
        _feed(broker.bootstrap, name, values[:n0], 50_000)
        common_stream = {"batch_max_events": batch, "batch_max_wait_ms": 50, "max_future_s": 1e12}
        serve_cfg = {
            "model": {"preset": "tgn", "memory_dim": 100},
            "ingest": {
                **common_stream,
                "kafka": {"bootstrap_servers": broker.bootstrap, "topic": name},
                "dlq_enabled": False,
            },
            "grpc": {"port": 0, "readers": 0},
            "snapshots": {"dir": str(work / "snapshots"), "every_events": 10**9, "every_seconds": 3600},
            "models": {"dir": str(models), "watch_interval_s": 1.0},
            "metrics_port": 0,
            "torch_threads": 1,
            "ready_file": str(work / "serve.ready"),
        }
        trainer_cfg = {
            "stream": {
                **common_stream,
                "kafka": {"bootstrap_servers": broker.bootstrap, "topic": name, "group_id": None},
            },
            "training": {
                "window_events": args.window,
                "every_events": args.every,
                "holdout_events": args.holdout,
                "min_new_events": args.every // 2,
                "batch_size": args.train_batch,
                "lr": args.continual_lr,
                "epochs": args.round_epochs,
            },
            "start": {"pres_gamma": args.pres_gamma},
            "publish": {"dir": str(models), "keep": 100},
            "checkpoints": {"dir": str(work / "trainer"), "every_seconds": 30},
            "metrics_port": 0,
            "torch_threads": 1,
            "progress": False,
            "ready_file": str(work / "trainer.ready"),
        }
        (work / "serve.json").write_text(json.dumps(serve_cfg))
        (work / "trainer.json").write_text(json.dumps(trainer_cfg))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        cli = [sys.executable, "-m", "tgnstream"]
        server = subprocess.Popen(
            [*cli, "serve", "--config", str(work / "serve.json")],
            stdout=open(work / "server.log", "wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        trainer = subprocess.Popen(
            [*cli, "trainer", "--config", str(work / "trainer.json")],
            stdout=open(work / "trainer.log", "wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            for ready in ("serve.ready", "trainer.ready"):
                deadline = time.monotonic() + 120
                while not (work / ready).exists():
                    if time.monotonic() > deadline or server.poll() is not None or trainer.poll() is not None:
                        raise RuntimeError(f"{ready} missing; see {work}")
                    time.sleep(0.1)
            sports = json.loads((work / "serve.ready").read_text())
            tports = json.loads((work / "trainer.ready").read_text())
            pairs = [
                (names[s], names[d])
                for s, d in zip(data.events.src[:200].tolist(), data.events.dst[:200].tolist())
            ]
            client = Client(sports["grpc_port"], pairs, args.query_rate)
            client.start()
            timeline: list[dict] = []
            stop_timeline = threading.Event()

            def watch():
                while not stop_timeline.is_set():
                    try:
                        sm, tm = (
                            scrape_metrics(sports["metrics_port"]),
                            scrape_metrics(tports["metrics_port"]),
                        )
                        timeline.append(
                            {
                                "t": time.time(),
                                "server_events": sm.get("tgnstream_events_applied", 0),
                                "server_lag": sum(
                                    v for k, v in sm.items() if k.startswith("tgnstream_ingest_lag_records")
                                ),
                                "trainer_lag": tm.get("tgnstream_trainer_lag_records", 0),
                                "trainer_rounds": sum(
                                    v for k, v in tm.items() if k.startswith("tgnstream_trainer_rounds_total")
                                ),
                            }
                        )
                    except OSError:
                        pass
                    stop_timeline.wait(1.0)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            feed_started = time.time()
            feed_s = _feed(broker.bootstrap, name, values[n0:], args.rate)
            feed_ended = time.time()
            # Let the trainer finish its last round and the server swap it in (a last partial
            # batch never closes: caught up means less than a batch behind).
            deadline = time.monotonic() + args.drain_s
            while time.monotonic() < deadline:
                tm = scrape_metrics(tports["metrics_port"])
                idle = tm.get("tgnstream_trainer_lag_records", batch) < batch
                rounds = sum(v for k, v in tm.items() if k.startswith("tgnstream_trainer_rounds_total{"))
                if (
                    idle
                    and rounds >= (n - n0) // args.every  # a round every `every` events: all of them ran
                    and len(ModelStore(models).versions())
                    and ModelStore(models).latest().version == _served_version(sports["grpc_port"])
                ):
                    break
                time.sleep(1.0)
            client.done.set()
            client.join(15)
            stop_timeline.set()
            watcher.join(5)
            final_server = scrape_metrics(sports["metrics_port"])
        finally:
            for proc in (server, trainer):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in (server, trainer):
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()

    swaps = []
    for line in (work / "server.log").read_text().splitlines():
        m = SWAP.match(line)
        if m:
            swaps.append(
                {
                    "time": m.group(1),
                    "version": m.group(2),
                    "offset": int(m.group(3)),
                    "pause_ms": float(m.group(4)),
                }
            )
    print(f"fed {n - n0} events in {feed_s:.0f} s; {len(swaps)} swaps", flush=True)

    # ---- offline, exact prequential scores of what was served, the frozen start, the heuristic
    store = ModelStore(models)
    settings = EvalSettings(batch_size=batch, rank=True, seed=args.seed)
    frozen = evaluate_stream(store.get("v000001").load(), data, n0, n, settings)
    pieces = []
    bounds = [(n0, "v000001")] + [(s["offset"], s["version"]) for s in swaps] + [(n, None)]
    for (lo, version), (hi, _) in zip(bounds, bounds[1:]):
        if hi <= lo:
            continue
        published = store.get(version)
        eng = published.load()
        eng = replay_as_served(eng, data, published.next_offsets[0], lo, batch)
        pieces.append(evaluate_stream(eng, data, lo, hi, settings))
    continual = {k: torch.cat([p[k] for p in pieces]) for k in ("pos", "neg", "rr")}
    heuristic = HeuristicScorer(HEURISTIC, data.num_nodes, history="event")
    heuristic.observe_all(data.events.slice(0, n0))
    heur = evaluate_stream(heuristic, data, n0, n, settings)
    rows = {"frozen": frozen, "continual": continual, f"{HEURISTIC} [event]": heur}
    half = (n - n0) // 2
    summary = {}
    for label, sc in rows.items():
        all_ = summarise(sc)
        last = summarise({k: v[half:] for k, v in sc.items()})
        summary[label] = {
            "ap": all_["ap"],
            "mrr": all_["mrr"],
            "last_half_ap": last["ap"],
            "last_half_mrr": last["mrr"],
        }
    windows = _windows(
        {k: v["rr"] for k, v in rows.items()},
        {k: v["pos"] for k, v in rows.items()},
        {k: v["neg"] for k, v in rows.items()},
        args.windows,
    )

    lat = [s for s in client.samples if s[3]]
    failed = sum(1 for s in client.samples if not s[3])
    lat_ms = sorted(1000 * s[1] for s in lat)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    swap_seconds = final_server.get("tgnstream_model_swap_seconds_sum", 0) / max(
        1, final_server.get("tgnstream_model_swap_seconds_count", 0)
    )
    result = {
        "events": n,
        "start_events": n0,
        "batch": batch,
        "feed_rate": args.rate,
        "feed_seconds": feed_s,
        "summary": summary,
        "windows": windows,
        "swaps": swaps,
        "mean_swap_seconds": swap_seconds,
        "queries": {
            "ok": len(lat),
            "failed": failed,
            "p50_ms": pct(lat_ms, 0.5),
            "p99_ms": pct(lat_ms, 0.99),
        },
        "timeline": timeline,
        "feed_window": [feed_started, feed_ended],
    }
    _plot(name, result, args.out.parent / f"continual_{Path(name).stem}.png")
    return result


def _served_version(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return pb_grpc.LinkPredictionStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=5).model_version


def _plot(name: str, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    wins = result["windows"]
    x = [(w["events"][0] + w["events"][1]) / 2 + result["start_events"] for w in wins]
    for label in result["summary"]:
        ax.plot(x, [w[label]["mrr"] for w in wins], marker="o", label=label)
    for s in result["swaps"]:
        ax.axvline(s["offset"], color="grey", alpha=0.25, lw=1)
    ax.set_xlabel("stream position (events); grey lines: hot swaps")
    ax.set_ylabel("prequential MRR (all destinations)")
    ax.set_title(f"{name}: continual training vs frozen start model vs memorization")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="wikipedia,bitcoinotc", help="comma list of dataset names or paths")
    p.add_argument("--limit", type=int, default=None, help="use only the first N events of each dataset")
    p.add_argument("--start-frac", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=5, help="offline epochs of the start model")
    p.add_argument("--lr", type=float, default=START_LR, help="offline learning rate of the start model")
    p.add_argument(
        "--continual-lr", type=float, default=FineTuneConfig.model_fields["lr"].default, help="trainer's lr"
    )
    p.add_argument("--round-epochs", type=int, default=1, help="trainer's passes over the window per round")
    p.add_argument("--batch", type=int, default=200, help="stream batch (server and trainer)")
    p.add_argument("--train-batch", type=int, default=1000, help="trainer's training batch (PRES)")
    p.add_argument("--window", type=int, default=30_000)
    p.add_argument("--every", type=int, default=10_000)
    p.add_argument("--holdout", type=int, default=2_000)
    p.add_argument("--rate", type=float, default=2_000, help="feed rate, events/s")
    p.add_argument("--query-rate", type=float, default=50, help="Score requests/s during the run")
    p.add_argument(
        "--drain-s", type=float, default=300, help="longest wait for the last round after the feed"
    )
    p.add_argument("--windows", type=int, default=10, help="points of the quality-over-time curve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pres-gamma", type=float, default=0.0, help="PRES fusion weight (the trainer's start.pres_gamma)"
    )
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "continual")
    p.add_argument("--out", type=Path, default=RESULTS / "continual.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    results = {}
    for name in args.datasets.split(","):
        work = args.work / name
        if work.exists():
            import shutil

            shutil.rmtree(work)
        work.mkdir(parents=True)
        results[name] = run(name, args, work)
    print("\n| dataset | model | AP | MRR | last 50% AP | last 50% MRR |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        for label, s in r["summary"].items():
            cells = f"{s['ap']:.4f} | {s['mrr']:.4f} | {s['last_half_ap']:.4f} | {s['last_half_mrr']:.4f}"
            print(f"| {name} | {label} | {cells} |")
        q = r["queries"]
        print(
            f"{name}: {len(r['swaps'])} swaps (mean {r['mean_swap_seconds']:.1f} s to serve, write lock "
            f"max {max([s['pause_ms'] for s in r['swaps']] or [0]):.0f} ms); queries ok {q['ok']}, failed "
            f"{q['failed']}, p50 {q['p50_ms']} ms, p99 {q['p99_ms']} ms"
        )
    write_results(args.out, {"benchmark": "continual", "datasets": results}, device="cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
