"""gRPC serving latency: Score (1 and 100 pairs), TopK k=10 over every page, over real gRPC on
loopback. The server runs in its own process (as in production; a client in the same
interpreter would share its GIL), holding a state built from the wikipedia stream.

* closed loop: one client, one request at a time -> p50 / p99 / mean;
* open loop: Poisson arrivals at a target rate (latency measured from the scheduled send time,
  so a slow server cannot hide queueing: no coordinated omission) -> p50 / p99, and the
  highest rate in ``--rates`` that is sustained (no errors, >= 99% answered in time, the client
  kept the rate, p99 <= ``--slo-ms``).

Writes ``benchmarks/results/grpc_latency.json`` and prints a table.

    python benchmarks/grpc_latency.py --threads 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc
import torch
from _harness import RESULTS, dataset_path, write_results

from tgnstream.core.step import TemporalStep
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc
from tgnstream.runtime.sysinfo import hardware_info


# ------------------------------------------------------------------------------------ server
def _build_live(args):
    from tgnstream.core.checkpoint import load_checkpoint
    from tgnstream.core.config import ModelConfig
    from tgnstream.core.engine import MemoryEngine
    from tgnstream.core.events import EventBatch
    from tgnstream.core.loaders import load_dataset
    from tgnstream.runtime.live import LiveEngine

    data = load_dataset(args.data, limit=args.events or None)
    if args.checkpoint:
        engine, _ = load_checkpoint(args.checkpoint)
        engine.reset_state()
    else:
        torch.manual_seed(0)
        cfg = ModelConfig.preset("tgn", edge_dim=data.edge_dim, pair_features=args.pair_features)
        engine = MemoryEngine(cfg, capacity=data.num_nodes + 1)
    engine.eval()
    # The dataset's dense ids -> the engine's (identical for a fresh engine; a checkpoint's id
    # map may already hold the names in another order).
    idx, _ = engine.ids.lookup(data.raw_ids, create=True)
    ev = data.events
    events = EventBatch(idx[ev.src], idx[ev.dst], ev.t, ev.feats)
    for i in range(0, len(events), args.batch_size):
        TemporalStep(engine).apply(events.slice(i, i + args.batch_size))
    engine.fold_pending()  # as the serving ingest loop does after every batch
    return LiveEngine(engine, "bench"), data


def _server_main(args, conn) -> None:
    from tgnstream.model_server.config import GrpcConfig
    from tgnstream.model_server.grpc_server import build_server, stop_server
    from tgnstream.model_server.queries import CandidateCache
    from tgnstream.model_server.servicer import LinkPredictionServicer
    from tgnstream.runtime.metrics import ServerMetrics

    torch.set_num_threads(args.threads)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    live, data = _build_live(args)
    engine = live.engine
    # Cost of one candidate-cache build (what the first TopK after each applied batch pays).
    builds = []
    for _ in range(5):
        c = CandidateCache()
        t0 = time.perf_counter()
        c.warm(live)
        builds.append(time.perf_counter() - t0)
    default = GrpcConfig()
    inflight = args.max_inflight or default.max_inflight
    workers = max(default.max_workers, inflight + default.max_queued + 4)
    config = GrpcConfig(
        port=0,
        max_inflight=inflight,
        max_workers=workers,
        hard_limit_rpcs=max(default.hard_limit_rpcs, 2 * workers),
        coalesce=not args.no_coalesce,
    )
    servicer = LinkPredictionServicer(live, config)
    servicer.cache.warm(live)
    metrics = ServerMetrics()
    server, health, port = build_server(live, config, metrics, servicer)
    server.start()
    src = data.events.src.unique().tolist()
    names = engine.ids.names(engine.destinations())  # before serving: names() flushes the map
    conn.send(
        {
            "port": port,
            "events": int(engine.events_applied),
            "nodes": len(engine.ids),
            "destinations": int(engine.destinations().numel()),
            "sources": [data.raw_ids[i] for i in src],
            "pages": names,
            "cache_build_ms": statistics.median(builds) * 1e3,
            "hardware": hardware_info(),
        }
    )
    conn.recv()  # stop
    stop_server(server, health, 1.0)
    side = _server_side(metrics)
    for name, c in (("Score", servicer.score_batches), ("TopK", servicer.topk_batches)):
        if c is not None and name in side:
            side[name]["coalesced_batches"], side[name]["coalesced_requests"] = c.batches, c.items
    conn.send(side)


def _server_side(metrics) -> dict:
    """Per method: calls by status code and mean server-side handling time (handler start to
    reply; excludes transport and the client)."""
    out: dict = {}
    for family in metrics.registry.collect():
        for smp in family.samples:
            method = smp.labels.get("grpc_method")
            if not method or smp.labels.get("grpc_service") != "tgnstream.rpc.v1.LinkPrediction":
                continue
            row = out.setdefault(method, {"codes": {}, "seconds_sum": 0.0, "count": 0})
            if smp.name == "grpc_server_handled_total":
                row["codes"][smp.labels["grpc_code"]] = int(smp.value)
            elif smp.name == "grpc_server_handling_seconds_sum":
                row["seconds_sum"] = smp.value
            elif smp.name == "grpc_server_handling_seconds_count":
                row["count"] = int(smp.value)
    for row in out.values():
        row["mean_ms"] = 1e3 * row.pop("seconds_sum") / max(row["count"], 1)
    return out


# ------------------------------------------------------------------------------------ client
def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _requests(kind: str, info: dict, n: int, rng: random.Random) -> list:
    src, pages = info["sources"], info["pages"]
    if kind == "score1":
        return [
            pb.ScoreRequest(pairs=[pb.Pair(src=rng.choice(src), dst=rng.choice(pages))]) for _ in range(n)
        ]
    if kind == "score100":
        return [
            pb.ScoreRequest(pairs=[pb.Pair(src=rng.choice(src), dst=rng.choice(pages)) for _ in range(100)])
            for _ in range(n)
        ]
    if kind == "topk10":
        return [pb.TopKRequest(src=rng.choice(src), k=10) for _ in range(n)]
    if kind == "info":
        return [pb.GetModelInfoRequest() for _ in range(n)]
    raise ValueError(kind)


def _method(stub, kind: str):
    return {"score1": stub.Score, "score100": stub.Score, "topk10": stub.TopK, "info": stub.GetModelInfo}[
        kind
    ]


def closed_loop(stub, kind: str, info: dict, iters: int, warmup: int, rng: random.Random) -> dict:
    call = _method(stub, kind)
    reqs = _requests(kind, info, iters + warmup, rng)
    for r in reqs[:warmup]:
        call(r, timeout=10)
    lat = []
    t_start = time.perf_counter()
    for r in reqs[warmup:]:
        t0 = time.perf_counter()
        call(r, timeout=10)
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_start
    return {
        "rpc": kind,
        "n": iters,
        "p50_ms": _pct(lat, 0.5) * 1e3,
        "p99_ms": _pct(lat, 0.99) * 1e3,
        "mean_ms": statistics.fmean(lat) * 1e3,
        "throughput_rps": iters / wall,
    }


def open_loop(stub, kind: str, info: dict, rate: float, duration: float, slo_ms: float, rng) -> dict:
    call = _method(stub, kind)
    n = max(1, int(rate * duration))
    reqs = _requests(kind, info, n, rng)
    gaps = [rng.expovariate(rate) for _ in range(n)]
    lat: list[float] = []
    errors: dict[str, int] = {}
    done = threading.Semaphore(0)

    def finished(fut, t_sched):
        try:
            fut.result()
            lat.append(time.perf_counter() - t_sched)
        except grpc.RpcError as exc:
            errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
        done.release()

    start = time.perf_counter() + 0.01
    t_sched = start
    for r, gap in zip(reqs, gaps):
        t_sched += gap
        delay = t_sched - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        fut = call.future(r, timeout=max(1.0, 4 * slo_ms / 1e3))
        fut.add_done_callback(lambda f, ts=t_sched: finished(f, ts))
    send_wall = time.perf_counter() - start
    for _ in range(n):
        done.acquire(timeout=10)
    answered = len(lat)
    in_slo = sum(x * 1e3 <= slo_ms for x in lat)
    row = {
        "rpc": kind,
        "target_rps": rate,
        "sent_rps": n / send_wall,
        "sent": n,
        "answered": answered,
        "errors": errors,
        "p50_ms": _pct(lat, 0.5) * 1e3,
        "p99_ms": _pct(lat, 0.99) * 1e3,
    }
    row["sustained"] = bool(
        not errors and in_slo >= 0.99 * n and row["sent_rps"] >= 0.95 * rate and row["p99_ms"] <= slo_ms
    )
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=dataset_path, default="wikipedia", help="dataset name or path")
    p.add_argument("--events", type=int, default=0, help="first N events to apply (0 = all)")
    p.add_argument("--batch-size", type=int, default=200, help="ingest batch size used to build the state")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="serve these weights (state rebuilt from --data)"
    )
    p.add_argument("--pair-features", action="store_true", help="random-weight model with pair features")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server process")
    p.add_argument(
        "--max-inflight", type=int, default=None, help="GrpcConfig.max_inflight (default: its default)"
    )
    p.add_argument(
        "--switch-interval",
        type=float,
        default=0.0,
        help="server sys.setswitchinterval (s); 0 = Python's 5 ms",
    )
    p.add_argument(
        "--no-coalesce", action="store_true", help="GrpcConfig.coalesce=False (one call per request)"
    )
    p.add_argument("--iters", type=int, default=2000, help="closed-loop requests per RPC")
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop target rate (req/s) to report")
    p.add_argument(
        "--rates", default="250,500,1000,1500,2000,3000", help="rates tried for the sustainable max"
    )
    p.add_argument("--duration", type=float, default=4.0, help="seconds per open-loop rate")
    p.add_argument("--slo-ms", type=float, default=25.0, help="p99 bound for 'sustained'")
    p.add_argument("--open-rpcs", default="score1,topk10", help="RPCs run open-loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "grpc_latency.json")
    args = p.parse_args()

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_server_main, args=(args, child), daemon=True)
    proc.start()
    info = parent.recv()
    rng = random.Random(args.seed)
    channel = grpc.insecure_channel(f"127.0.0.1:{info['port']}")
    stub = pb_grpc.LinkPredictionStub(channel)
    try:
        closed = [
            closed_loop(stub, kind, info, args.iters, 200, rng)
            for kind in ("info", "score1", "score100", "topk10")
        ]
        opened, sustainable = [], {}
        rates = sorted({float(r) for r in args.rates.split(",")} | {args.rate})
        for kind in [k for k in args.open_rpcs.split(",") if k]:
            best = 0.0
            for rate in rates:
                row = open_loop(stub, kind, info, rate, args.duration, args.slo_ms, rng)
                opened.append(row)
                if row["sustained"]:
                    best = rate
                elif rate > args.rate:
                    break  # higher rates will not do better
            sustainable[kind] = best
    finally:
        channel.close()
        parent.send("stop")
        server_side = parent.recv() if parent.poll(15) else {}
        proc.join(10)

    print(
        f"\nstate: {info['events']:,} events, {info['nodes']:,} nodes, {info['destinations']} destinations; "
        f"server torch threads {args.threads}; {info['hardware']['cpu']} x{info['hardware']['cpu_cores']}"
    )
    print(f"candidate-cache build (first TopK after a batch): {info['cache_build_ms']:.1f} ms\n")
    print(f"{'closed loop':<14}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'req/s':>9}")
    for r in closed:
        print(
            f"{r['rpc']:<14}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['mean_ms']:>9.3f}{r['throughput_rps']:>9.0f}"
        )
    print(f"\n{'open loop':<10}{'target':>8}{'sent/s':>8}{'p50 ms':>9}{'p99 ms':>9}  sustained  errors")
    for r in opened:
        print(
            f"{r['rpc']:<10}{r['target_rps']:>8.0f}{r['sent_rps']:>8.0f}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}"
            f"  {str(r['sustained']):<9}  {r['errors'] or ''}"
        )
    print(
        "\nserver side (all phases): "
        + "; ".join(f"{m} mean {r['mean_ms']:.3f} ms {r['codes']}" for m, r in server_side.items())
    )
    for kind, best in sustainable.items():
        print(f"highest sustained rate {kind}: {best:.0f} req/s (p99 <= {args.slo_ms} ms, of {args.rates})")

    result = {
        "benchmark": "grpc_latency",
        "server_hardware": info["hardware"],
        "server_torch_threads": args.threads,
        "data": str(args.data),
        "events_applied": info["events"],
        "nodes": info["nodes"],
        "destinations": info["destinations"],
        "model": "checkpoint"
        if args.checkpoint
        else "tgn preset, random weights" + (" + pair features" if args.pair_features else ""),
        "candidate_cache_build_ms": info["cache_build_ms"],
        "closed_loop": closed,
        "open_loop": opened,
        "highest_sustained_rps": sustainable,
        "server_side": server_side,
        "slo_p99_ms": args.slo_ms,
    }
    print()
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
