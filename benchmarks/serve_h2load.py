"""Serving latency under a live feed, measured with clients that do not eat the server's cores:
h2load (C, Debian's nghttp2-client) sends gRPC requests at a fixed rate, and a confluent-kafka
producer process (librdkafka, C) feeds wikipedia at ``--ingest-rate`` events/s.

The server (``tgnstream serve``, its own process) first applies ``--warm`` events; then the feed
starts and, for each RPC and rate, h2load runs ``--duration`` seconds at that rate (uniform
arrivals: ``--clients`` connections at rate/clients each, up to 64 streams in flight per
connection, so a slow reply never delays the next send). Latency is from h2load's per-request
log (send to end of reply). h2load sees every gRPC reply as HTTP 200, so the status codes (OK,
RESOURCE_EXHAUSTED = shed, others = errors) come from the server's own
``grpc_server_handled_total``. "ingest kept" is events applied during the run / events fed.

    python benchmarks/serve_h2load.py                     # installs nghttp2-client if missing (root)

Prints the table and writes ``benchmarks/results/serve_h2load.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _harness import RESULTS, dataset_path, write_results

from tgnstream.apps.broker import EmbeddedBroker
from tgnstream.core.loaders import load_dataset
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.stream.kafka_admin import create_topic

SERVICE = "tgnstream.rpc.v1.LinkPrediction"


def ensure_h2load() -> str:
    """Path of h2load, installing Debian's nghttp2-client when missing (needs root)."""
    path = shutil.which("h2load")
    if path:
        return path
    if os.geteuid() != 0:
        sys.exit("h2load not found: sudo apt-get install nghttp2-client")
    subprocess.run(["apt-get", "install", "-y", "-q", "nghttp2-client"], check=False, capture_output=True)
    if not shutil.which("h2load"):
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "nghttp2-client"], check=True, capture_output=True)
    return shutil.which("h2load")


def grpc_frame(message) -> bytes:
    """A unary gRPC request body: uncompressed flag, 4-byte big-endian length, the message."""
    data = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


# ------------------------------------------------------------------------------------ feed
def _feed(bootstrap: str, topic: str, data_path: str, start: int, rate: float, stop, fed) -> None:
    """Producer process (librdkafka): wikipedia from ``start`` at ``rate`` ev/s in 10 ms ticks,
    cycled with times shifted past the previous cycle so event time keeps increasing."""
    from confluent_kafka import Producer

    data = load_dataset(data_path)
    names, ev = data.raw_ids, data.events
    src, dst, ts = ev.src.tolist(), ev.dst.tolist(), ev.t.tolist()
    span = ts[-1] + 1.0
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    i, cycle, sent = start, 0, 0
    t0 = time.perf_counter()
    while not stop.is_set():
        due = int((time.perf_counter() - t0) * rate)
        while sent < due:
            if i == len(src):
                i, cycle = 0, cycle + 1
            value = json.dumps({"src": names[src[i]], "dst": names[dst[i]], "ts": ts[i] + cycle * span})
            producer.produce(topic, value=value.encode(), key=names[src[i]].encode())
            i, sent = i + 1, sent + 1
        producer.poll(0)
        fed.value = sent
        time.sleep(0.01)
    producer.flush(10)


# ---------------------------------------------------------------------------------- probes
def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0] if "{" in line else ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _codes(text: str, method: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("grpc_server_handled_total{") and f'grpc_method="{method}"' in line:
            code = re.search(r'grpc_code="(\w+)"', line).group(1)
            out[code] = out.get(code, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run_h2load(
    h2load: str, port: int, method: str, body: bytes, rate: float, seconds: float, clients: int, work: Path
) -> dict:
    body_file, log_file = work / f"{method}.body", work / f"{method}.log"
    body_file.write_bytes(body)
    log_file.unlink(missing_ok=True)
    # rate 0: closed loop, one request in flight per connection (more than the server admits
    # turns the loop into a storm of fast RESOURCE_EXHAUSTED replies): throughput.
    pacing = ["-m", "1"] if rate <= 0 else ["-m", "64", "--rps", f"{max(rate / clients, 0.1):g}"]
    cmd = [
        h2load,
        f"http://127.0.0.1:{port}/{SERVICE}/{method}",
        "-d", str(body_file),
        "-H", "content-type: application/grpc",
        "-H", "te: trailers",
        "-c", str(clients), "-t", "1", *pacing,
        "-D", f"{seconds:g}",
        "--log-file", str(log_file),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    lat = []
    for line in log_file.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1] == "200":
            lat.append(int(parts[2]) / 1000.0)
    lat.sort()
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done", out.stdout)

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    return {"sent": int(done.group(2)) if done else len(lat), "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


def _run_server(args, bootstrap: str, readers: int, bodies: dict, h2load: str, work: Path) -> list[dict]:
    """One server (``readers`` reader processes; 0: answers in its own process) on a topic of its
    own: warm-up, then every (RPC, rate) under the live feed."""
    work.mkdir(parents=True)
    topic = f"live-r{readers}"
    rows = []
    # Closed-loop throughput with several readers needs enough connections to keep every reader
    # busy: SO_REUSEPORT spreads connections, not requests.
    clients = args.clients_per_reader * max(1, readers) if args.clients_per_reader else args.clients
    create_topic(bootstrap, topic, 1)
    ctx = mp.get_context("spawn")
    stop, fed = ctx.Event(), ctx.Value("q", 0)
    # The warm-up: --warm events as fast as the producer goes.
    warm = ctx.Process(target=_warm, args=(bootstrap, topic, str(args.data), args.warm))
    warm.start()
    warm.join()
    model = (
        {"checkpoint": str(args.checkpoint)} if args.checkpoint else {"preset": "tgn", "pair_features": True}
    )
    cfg = {
        "model": model,
        "ingest": {"kafka": {"bootstrap_servers": bootstrap, "topic": topic}},
        "grpc": {"port": 0, "readers": readers},
        "snapshots": {"dir": str(work / "snapshots"), "every_events": 10**9, "every_seconds": 10**6},
        "metrics_port": 0,
        "torch_threads": 1,
        "device": args.device,
        "ready_file": str(work / "ready.json"),
        "health": {"ready_max_lag_records": 10**9},
    }
    (work / "serve.json").write_text(json.dumps(cfg))
    server = subprocess.Popen(
        [sys.executable, "-m", "tgnstream", "serve", "--config", str(work / "serve.json")],
        stdout=open(work / "server.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    feeder = None
    try:
        while not (work / "ready.json").exists():
            if server.poll() is not None:
                raise RuntimeError(f"server exited; see {work / 'server.log'}")
            time.sleep(0.05)
        ports = json.loads((work / "ready.json").read_text())
        mport = ports["metrics_port"]
        while _value(_metrics(mport), "tgnstream_events_applied") < args.warm:
            time.sleep(0.1)
        feeder = ctx.Process(
            target=_feed,
            args=(bootstrap, topic, str(args.data), args.warm, args.ingest_rate, stop, fed),
            daemon=True,
        )
        feeder.start()
        time.sleep(3.0)  # the feed at its rate, the server caught up with it
        for kind in args.rpcs.split(","):  # first forward passes (lazy init in every reader): not measured
            method, body = bodies[kind]
            run_h2load(h2load, ports["grpc_port"], method, body, 50, 2, clients, work)
        for kind in args.rpcs.split(","):
            method, body = bodies[kind]
            for rate in _rates(args.rates):
                before = _metrics(mport)
                fed0, t0 = fed.value, time.perf_counter()
                r = run_h2load(h2load, ports["grpc_port"], method, body, rate, args.duration, clients, work)
                elapsed = time.perf_counter() - t0
                after = _metrics(mport)
                codes = {
                    c: _codes(after, method).get(c, 0) - _codes(before, method).get(c, 0)
                    for c in _codes(after, method)
                }
                handled = sum(codes.values())
                # Events the answers reflect (the open batch included), not only closed batches.
                applied = _value(after, "tgnstream_events_applied") - _value(
                    before, "tgnstream_events_applied"
                )
                ok, shed = codes.get("OK", 0), codes.get("RESOURCE_EXHAUSTED", 0)
                row = {
                    "readers": readers,
                    "clients": clients,
                    "rpc": kind,
                    "target_rps": rate,
                    **r,
                    "handled": handled,
                    "ok": ok,
                    "shed_share": shed / handled if handled else None,
                    "error_share": (handled - ok - shed) / handled if handled else None,
                    "ingest_kept": applied / max(1, fed.value - fed0),
                    "achieved_rps": ok / elapsed,
                    # reader processes: answers recomputed / computed under the commit lock, and
                    # TopK candidate entries computed vs copied from another reader
                    **{
                        key: _value(after, name, **labels) - _value(before, name, **labels)
                        for key, name, labels in (
                            ("reader_retries", "tgnstream_reader_retries_total", {}),
                            ("reader_fallbacks", "tgnstream_reader_fallbacks_total", {}),
                            # a restarted reader's counters begin at 0 again: the row's request
                            # counts are then not trustworthy
                            ("reader_restarts", "tgnstream_reader_restarts_total", {}),
                            (
                                "topk_entries_computed",
                                "tgnstream_topk_cache_entries_total",
                                {"source": "computed"},
                            ),
                            (
                                "topk_entries_shared",
                                "tgnstream_topk_cache_entries_total",
                                {"source": "shared"},
                            ),
                        )
                    },
                    "seconds": elapsed,
                }
                rows.append(row)
                print(
                    f"readers {readers}  {kind:9s} @ {_rate_name(rate):>4s} req/s "
                    f"({row['achieved_rps']:6.0f} ok/s): p50 {_ms(row['p50_ms'])} ms  "
                    f"p99 {_ms(row['p99_ms'])} ms  shed {100 * (row['shed_share'] or 0):5.1f}%  "
                    f"errors {100 * (row['error_share'] or 0):4.1f}%  "
                    f"ingest kept {row['ingest_kept']:.3f}  retries {row['reader_retries']:.0f} "
                    f"fallbacks {row['reader_fallbacks']:.0f} restarts {row['reader_restarts']:.0f} "
                    "topk entries computed "
                    f"{row['topk_entries_computed']:.0f} shared {row['topk_entries_shared']:.0f}",
                    flush=True,
                )
    finally:
        stop.set()
        if feeder is not None:
            feeder.join(20)
        server.terminate()
        server.wait(60)
    return rows


# ---------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=dataset_path, default="wikipedia", help="dataset name or path")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="serve this checkpoint (default: fresh TGN+pair)"
    )
    p.add_argument("--warm", type=int, default=60_000, help="events applied before the feed starts")
    p.add_argument("--ingest-rate", type=float, default=10_000, help="live feed, events/s")
    p.add_argument(
        "--rates", default="50,200,500", help="request rates (req/s); 'max': closed loop, reports throughput"
    )
    p.add_argument("--rpcs", default="info,score1,score100,topk10")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per (RPC, rate)")
    p.add_argument("--clients", type=int, default=4, help="h2load connections")
    p.add_argument("--logs", type=Path, default=None, help="keep each server's log in this folder")
    p.add_argument(
        "--clients-per-reader",
        type=int,
        default=0,
        help="h2load connections per reader process (overrides --clients; for a readers-scaling run)",
    )
    p.add_argument(
        "--readers",
        default="0,2",
        help="comma list of grpc.readers values, one server each (0: answers in the serving process)",
    )
    p.add_argument("--device", default="cpu", help="the server's device (cpu, cuda)")
    p.add_argument("--out", type=Path, default=RESULTS / "serve_h2load.json")
    args = p.parse_args()
    h2load = ensure_h2load()
    data = load_dataset(args.data)
    names = data.raw_ids
    users = sorted({names[i] for i in data.events.src[: args.warm].tolist()})
    pages = sorted({names[i] for i in data.dst_nodes.tolist()})
    bodies = {
        "info": ("GetModelInfo", grpc_frame(pb.GetModelInfoRequest())),
        "score1": ("Score", grpc_frame(pb.ScoreRequest(pairs=[pb.Pair(src=users[0], dst=pages[0])]))),
        "score100": (
            "Score",
            grpc_frame(
                pb.ScoreRequest(
                    pairs=[pb.Pair(src=users[i % len(users)], dst=pages[i % len(pages)]) for i in range(100)]
                )
            ),
        ),
        "topk10": ("TopK", grpc_frame(pb.TopKRequest(src=users[0], k=10))),
    }
    work = Path(tempfile.mkdtemp(prefix="serve-h2load-"))
    rows = []
    with EmbeddedBroker() as broker:
        for readers in [int(x) for x in args.readers.split(",")]:
            rows += _run_server(args, broker.bootstrap, readers, bodies, h2load, work / f"r{readers}")
    result = {
        "benchmark": "serve_h2load",
        "ingest_rate": args.ingest_rate,
        "warm": args.warm,
        "duration_s": args.duration,
        "clients": args.clients,
        "readers": args.readers,
        "device": args.device,
        "rows": rows,
    }
    print()
    write_results(args.out, result, device=args.device)
    _table(rows, _rates(args.rates))
    scaling = _scaling(rows)
    if scaling:
        result["scaling"] = scaling
        write_results(args.out, result, device=args.device, quiet=True)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
        for log in work.glob("r*/server.log"):
            shutil.copy(log, args.logs / f"server-{log.parent.name}.log")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _rates(text: str) -> list[float]:
    """``50,200,max`` -> [50.0, 200.0, 0.0] (0: closed loop)."""
    return [0.0 if r.strip() == "max" else float(r) for r in text.split(",")]


def _rate_name(rate: float) -> str:
    return "max" if rate <= 0 else f"{rate:.0f}"


def _ms(x: float | None) -> str:
    return "    -" if x is None else f"{x:7.2f}"


def _warm(bootstrap: str, topic: str, data_path: str, n: int) -> None:
    from confluent_kafka import Producer

    data = load_dataset(data_path, limit=n)
    names, ev = data.raw_ids, data.events
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all"})
    for s, d, t in zip(ev.src.tolist(), ev.dst.tolist(), ev.t.tolist()):
        producer.produce(topic, value=json.dumps({"src": names[s], "dst": names[d], "ts": t}).encode())
        producer.poll(0)
    producer.flush(60)


def _scaling(rows: list[dict]) -> list[dict]:
    """Closed-loop throughput against readers = 1 of the same RPC, and its share of linear."""
    out = []
    for kind in dict.fromkeys(r["rpc"] for r in rows):
        loop = {r["readers"]: r for r in rows if r["rpc"] == kind and r["target_rps"] <= 0}
        if 1 not in loop or len(loop) < 2:
            continue
        base = loop[1]["achieved_rps"]
        print(f"\n{kind}, closed loop: readers | req/s | vs 1 reader | share of linear")
        for n in sorted(k for k in loop if k >= 1):
            speedup = loop[n]["achieved_rps"] / base if base else 0.0
            out.append(
                {
                    "rpc": kind,
                    "readers": n,
                    "rps": loop[n]["achieved_rps"],
                    "speedup": speedup,
                    "share_of_linear": speedup / n,
                }
            )
            print(f"  {n} | {loop[n]['achieved_rps']:.0f} | {speedup:.2f}x | {speedup / n:.2f}")
    return out


def _table(rows: list[dict], rates: list[float]) -> None:
    for readers in dict.fromkeys(r.get("readers", 0) for r in rows):
        print(f"\nreaders = {readers}" + (" (answers in the serving process)" if readers == 0 else ""))
        _table_one([r for r in rows if r.get("readers", 0) == readers], rates)


def _table_one(rows: list[dict], rates: list[float]) -> None:
    kinds = list(dict.fromkeys(r["rpc"] for r in rows))
    print("\n| RPC | " + " | ".join(f"{_rate_name(r)} req/s" for r in rates) + " |")
    print("|---|" + "---|" * len(rates))
    for kind in kinds:
        cells = []
        for rate in rates:
            r = next((x for x in rows if x["rpc"] == kind and x["target_rps"] == rate), None)
            if r is None or r["p50_ms"] is None:
                cells.append("-")
                continue
            cell = f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}"
            if r["target_rps"] <= 0:
                cell += f" ({r['achieved_rps']:.0f} req/s)"
            if r["shed_share"]:
                cell += f", {100 * r['shed_share']:.0f}% shed"
            cells.append(cell)
        print(f"| {kind} | " + " | ".join(cells) + " |")
    kept = [r["ingest_kept"] for r in rows]
    print(f"ingest kept: min {min(kept):.3f}, median {statistics.median(kept):.3f}")


if __name__ == "__main__":
    sys.exit(main())
