"""Serving benchmark on the embedded broker: ingest throughput next to the raw Kafka consume
rate (same records, same run), and gRPC latency while the server ingests a live stream.

1. **Ingest**: all of wikipedia (157,474 events) on a topic; each round runs a raw
   kafka-python consume of the topic (the consumer settings the server uses; the issue's
   baseline), a raw confluent-kafka consume (the server's default client), the server's fetch
   process alone (shipping to a consumer that does nothing else), and a full ``tgnstream
   serve`` ingest of it (decode, ids, prequential quality, apply, fold); medians reported with
   their ratios. ``--client`` picks the server's consumer library.
2. **Under load**: a ``tgnstream serve`` process holding the first ``--warm`` events, fed
   ``--ingest-rate`` events/s by a producer process (wikipedia cycled, times shifted so they
   keep increasing); open-loop Poisson requests at ``--rate`` req/s for Score (1 pair),
   Score (100 pairs) and TopK (k=10 over all 1,000 pages), p50/p99 measured from each
   request's scheduled send time; then increasing rates of each to find the highest
   sustainable one (no errors, >= 99% within the SLO, rate kept, p99 <= ``--slo-ms``).
3. **Floor**: the same client at ``--rate`` against ``noop_server.py``, a LinkPrediction server
   that computes nothing, while the feed and the real server keep running: the latency of
   Python gRPC itself on this machine under the same background load.

Prints a table and writes ``benchmarks/results/serve.json``.

    python benchmarks/serve.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from _harness import RESULTS, dataset_path, write_results
from confluent_kafka import Consumer as ConfluentConsumer
from confluent_kafka import TopicPartition as ConfluentPartition
from grpc_latency import closed_loop, open_loop  # the sibling script
from kafka import KafkaConsumer, TopicPartition

from tgnstream.apps.broker import EmbeddedBroker
from tgnstream.apps.replay import make_producer, replay_events
from tgnstream.apps.serve import ServingProcess
from tgnstream.apps.serve_config import ServeConfig
from tgnstream.core.events import EventBatch
from tgnstream.core.loaders import load_dataset
from tgnstream.ingest.config import IngestConfig
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc
from tgnstream.runtime.sysinfo import hardware_info
from tgnstream.stream.kafka_admin import create_topic
from tgnstream.stream.prefetch import Prefetcher


def _config(bootstrap: str, topic: str, snapshots: Path, client: str = "auto", **ingest) -> dict:
    return {
        "ingest": {"kafka": {"bootstrap_servers": bootstrap, "topic": topic, "client": client}, **ingest},
        "grpc": {"port": 0},
        "snapshots": {"dir": str(snapshots), "every_events": 10**9, "every_seconds": 10**6},
        "metrics_port": 0,
        "torch_threads": 1,
    }


# ------------------------------------------------------------------------------ ingest part
def raw_consume(bootstrap: str, topic: str, n: int) -> float:
    """Events/s of a bare kafka-python consumer with the server's settings (assign + poll)."""
    cfg = IngestConfig()
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_poll_records=cfg.poll_records,
        fetch_max_bytes=cfg.kafka.fetch_max_bytes,
        max_partition_fetch_bytes=cfg.kafka.max_partition_fetch_bytes,
    )
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    got = 0
    t0 = time.perf_counter()
    while got < n:
        for records in consumer.poll(timeout_ms=200).values():
            got += len(records)
    rate = n / (time.perf_counter() - t0)
    consumer.close()
    return rate


def raw_consume_confluent(bootstrap: str, topic: str, n: int) -> float:
    """Events/s of a bare confluent-kafka consumer (assign + consume) reading every record's
    value, key, offset and timestamp, with the server's fetch sizes."""
    cfg = IngestConfig()
    consumer = ConfluentConsumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "raw-bench",
            "enable.auto.commit": False,
            "fetch.max.bytes": cfg.kafka.fetch_max_bytes,
            "max.partition.fetch.bytes": cfg.kafka.max_partition_fetch_bytes,
        }
    )
    consumer.assign([ConfluentPartition(topic, 0, 0)])
    got = 0
    t0 = time.perf_counter()
    while got < n:
        for m in consumer.consume(cfg.poll_records, 0.2):
            if m.error() is None:
                m.value(), m.key(), m.offset(), m.timestamp()
                got += 1
    rate = n / (time.perf_counter() - t0)
    consumer.close()
    return rate


def fetch_only(bootstrap: str, topic: str, n: int, client: str = "auto") -> float:
    """Events/s the server's fetch process delivers to a consumer that does nothing else: the
    cost of fetching in a child process and shipping raw values, without the server's work."""
    cfg = IngestConfig(kafka={"bootstrap_servers": bootstrap, "topic": topic, "client": client})
    fetcher = Prefetcher(cfg, {0: 0})
    fetcher.start()
    got = 0
    t0 = time.perf_counter()
    while got < n:
        batch = fetcher.get(timeout=1.0)
        if batch is not None:
            got += batch.num_records
    rate = n / (time.perf_counter() - t0)
    fetcher.stop()
    return rate


def serve_ingest(
    bootstrap: str, topic: str, n: int, work: Path, quality_interval_ms: float | None, client: str = "auto"
) -> dict:
    """Events/s of the server ingesting the whole topic, from process start-up done to the last
    event applied (the fetch process's start is excluded; it is a one-off)."""
    shutil.rmtree(work, ignore_errors=True)
    quality = {} if quality_interval_ms is None else {"quality": {"min_interval_ms": quality_interval_ms}}
    proc = ServingProcess(ServeConfig(**_config(bootstrap, topic, work / "snapshots", client, **quality)))
    proc.start()
    # The fetch process starts in the ingest thread (supervised); its start is not ingest work.
    while proc.loop.fetcher is None or "ingest_down" in proc.readiness.reasons():
        time.sleep(0.002)
    t0, a0 = time.perf_counter(), proc.live.stamp().events_applied
    # Events reflected in answers (the last, partial batch stays open: it is query context).
    while proc.live.stamp().events_applied < n:
        time.sleep(0.002)
    seconds = time.perf_counter() - t0
    batches = proc.loop.batches
    proc.stop()
    return {"events_per_s": (n - a0) / seconds, "seconds": seconds, "batches": batches}


# ------------------------------------------------------------------------------- live feed
def _feed(bootstrap: str, topic: str, data_path: str, start: int, rate: float, stop, fed) -> None:
    """Producer process: wikipedia from ``start`` at ``rate`` ev/s, cycled with times shifted
    past the previous cycle so event time keeps increasing."""
    data = load_dataset(data_path)
    span = float(data.events.t[-1]) + 1.0
    producer = make_producer(bootstrap)
    cycle = 0
    while not stop.is_set():
        ev = data.events
        shifted = dataclasses.replace(data, events=EventBatch(ev.src, ev.dst, ev.t + cycle * span, ev.feats))
        first = start if cycle == 0 else 0
        chunk = 1_000
        for s in range(first, len(data), chunk):
            if stop.is_set():
                break
            fed.value += replay_events(
                producer, topic, shifted, start=s, limit=chunk, rate=rate, progress=False
            )
        cycle += 1
    producer.close()


def _applied(stub) -> int:
    return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).events_applied


def noop_floor(args, work: Path, info: dict, rng: random.Random) -> list[dict]:
    """The same open-loop client at ``--rate`` against ``noop_server.py`` (no work at all), run
    while the live feed and the real server keep ingesting: what Python gRPC alone costs here."""
    port_file = work / "noop-port"
    port_file.unlink(missing_ok=True)
    noop = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("noop_server.py")), "--port-file", str(port_file)]
    )
    try:
        while not port_file.exists() or not port_file.read_text():
            if noop.poll() is not None:
                raise RuntimeError("noop_server.py exited")
            time.sleep(0.05)
        channel = grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}")
        stub = pb_grpc.LinkPredictionStub(channel)
        rows = []
        for kind in args.rpcs.split(","):
            closed_loop(stub, kind, info, 200, 0, rng)  # connect and warm up
            row = open_loop(stub, kind, info, args.rate, args.duration, args.slo_ms, rng)
            rows.append(row)
            print(
                f"  no-op floor {kind} @ {args.rate:.0f} req/s: "
                f"p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms"
            )
        channel.close()
        return rows
    finally:
        noop.terminate()
        noop.wait(30)


def under_load(args, bootstrap: str, data, work: Path) -> dict:
    topic = "live"
    create_topic(bootstrap, topic, 1)
    replay_events(bootstrap, topic, data, limit=args.warm, progress=False)
    cfg = _config(
        bootstrap, topic, work / "live-snapshots", args.client, batch_max_wait_ms=args.batch_wait_ms
    )
    cfg["grpc"]["topk_cache_max_age_ms"] = args.topk_cache_max_age_ms
    cfg["ready_file"] = str(work / "ready.json")
    (work / "serve.json").write_text(json.dumps(cfg))
    log = open(work / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "tgnstream", "serve", "--config", str(work / "serve.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    feeder = None
    try:
        while not (work / "ready.json").exists():
            if server.poll() is not None:
                raise RuntimeError(f"server exited; see {work / 'server.log'}")
            time.sleep(0.05)
        port = json.loads((work / "ready.json").read_text())["grpc_port"]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.LinkPredictionStub(channel)
        while _applied(stub) < args.warm:
            time.sleep(0.05)
        names = data.raw_ids
        info = {
            "sources": sorted({names[i] for i in data.events.src.tolist()}),
            "pages": sorted({names[i] for i in data.dst_nodes.tolist()}),
        }
        fed = ctx.Value("q", 0)
        feeder = ctx.Process(
            target=_feed,
            args=(bootstrap, topic, str(args.data), args.warm, args.ingest_rate, stop, fed),
            daemon=True,
        )
        feeder.start()
        rng = random.Random(args.seed)

        def catch_up(timeout: float = 30.0) -> bool:
            """Wait until the server has applied (nearly) everything fed so far."""
            deadline = time.monotonic() + timeout
            while _applied(stub) < args.warm + fed.value - 2 * args.ingest_rate * 0.05 - 1000:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
            return True

        time.sleep(2.0)  # let the feed reach its rate
        steps, sustainable = [], {}
        for kind in args.rpcs.split(","):
            best = 0.0
            for rate in args.rates:
                caught_up = catch_up()
                a0, t0 = _applied(stub), time.perf_counter()
                row = open_loop(stub, kind, info, rate, args.duration, args.slo_ms, rng)
                row["ingest_events_per_s"] = (_applied(stub) - a0) / (time.perf_counter() - t0)
                row["caught_up_before"] = caught_up
                row["sustained"] = row["sustained"] and row["ingest_events_per_s"] >= 0.9 * args.ingest_rate
                steps.append(row)
                print(
                    f"  {kind} @ {rate:.0f} req/s: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
                    f"errors {row['errors'] or 0}, ingest {row['ingest_events_per_s']:,.0f} ev/s",
                    flush=True,
                )
                if row["sustained"]:
                    best = rate
            sustainable[kind] = best
        at_rate = [r for r in steps if r["target_rps"] == args.rate]
        floor = noop_floor(args, work, info, rng)  # the feed and the server are still running
        stop.set()
        feeder.join(30)
        time.sleep(1.0)
        idle_closed = [
            closed_loop(stub, kind, info, 500, 50, rng) for kind in ("score1", "score100", "topk10")
        ]
        channel.close()
        return {
            "at_rate": at_rate,
            "noop_floor_at_rate": floor,
            "steps": steps,
            "sustainable_rps": sustainable,
            "closed_loop_no_ingest": idle_closed,
        }
    finally:
        stop.set()
        if feeder is not None and feeder.is_alive():
            feeder.kill()
        server.terminate()
        server.wait(60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=dataset_path, default="wikipedia", help="dataset name or path")
    p.add_argument("--rounds", type=int, default=3, help="raw/ingest rounds (medians reported)")
    p.add_argument("--warm", type=int, default=60_000, help="events applied before the load phase")
    p.add_argument("--ingest-rate", type=float, default=10_000, help="live feed, events/s")
    p.add_argument("--rate", type=float, default=1_000, help="request rate for the latency table")
    p.add_argument("--rates", default="50,100,200,400,1000", help="request rates tried (ascending)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per open-loop phase")
    p.add_argument("--slo-ms", type=float, default=25.0, help="p99 bound for 'sustained'")
    p.add_argument("--batch-wait-ms", type=float, default=50.0, help="ingest batch_max_wait_ms under load")
    p.add_argument("--skip-load", action="store_true", help="ingest part only")
    p.add_argument(
        "--topk-cache-max-age-ms", type=float, default=0.0, help="grpc.topk_cache_max_age_ms of the server"
    )
    p.add_argument(
        "--quality-interval-ms",
        type=float,
        default=None,
        help="ingest.quality.min_interval_ms of the ingest rounds (default: the config's; 0: every batch)",
    )
    p.add_argument(
        "--client",
        default="auto",
        choices=["auto", "confluent-kafka", "kafka-python"],
        help="ingest.kafka.client of the server (auto: confluent-kafka when installed)",
    )
    p.add_argument("--rpcs", default="score1,score100,topk10", help="RPCs of the load phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = p.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]

    data = load_dataset(args.data)
    n = len(data)
    work = Path(tempfile.mkdtemp(prefix="tgnstream-serve-bench-"))
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap
        create_topic(bootstrap, "ingest", 1)
        replay_events(bootstrap, "ingest", data, progress=False)
        raw, raw_ck, fetched, ingest = [], [], [], []
        for r in range(args.rounds):  # --rounds 0: load part only
            raw.append(raw_consume(bootstrap, "ingest", n))
            raw_ck.append(raw_consume_confluent(bootstrap, "ingest", n))
            fetched.append(fetch_only(bootstrap, "ingest", n, args.client))
            ingest.append(
                serve_ingest(
                    bootstrap, "ingest", n, work / f"ingest-{r}", args.quality_interval_ms, args.client
                )
            )
            print(
                f"round {r}: raw kafka-python {raw[-1]:,.0f} ev/s, raw confluent-kafka {raw_ck[-1]:,.0f} "
                f"ev/s, fetch only {fetched[-1]:,.0f} ev/s, ingest {ingest[-1]['events_per_s']:,.0f} ev/s",
                flush=True,
            )
        fetch_med = statistics.median(fetched) if fetched else float("nan")
        raw_med = statistics.median(raw) if raw else float("nan")
        raw_ck_med = statistics.median(raw_ck) if raw_ck else float("nan")
        ing_med = statistics.median(x["events_per_s"] for x in ingest) if ingest else float("nan")
        load = None if args.skip_load else under_load(args, bootstrap, data, work)

    hw = hardware_info()
    result = {
        "benchmark": "serve",
        "dataset": {"name": data.name, "events": n, "nodes": data.num_nodes},
        "model": "tgn (random weights, memory 100), torch threads 1",
        "ingest": {
            "client": args.client,
            "raw_consume_events_per_s": raw,
            "raw_confluent_consume_events_per_s": raw_ck,
            "raw_confluent_median": raw_ck_med,
            "fetch_only_events_per_s": fetched,
            "fetch_only_median": fetch_med,
            "ingest_events_per_s": [x["events_per_s"] for x in ingest],
            "raw_median": raw_med,
            "ingest_median": ing_med,
            "ratio": ing_med / raw_med,
            # Adjacent raw/ingest pairs see the same machine speed: robust to drift between rounds.
            "ratio_median_of_rounds": statistics.median(x["events_per_s"] / r for x, r in zip(ingest, raw))
            if raw
            else float("nan"),
            "batch_max_events": IngestConfig().batch_max_events,
            "quality_min_interval_ms": (
                IngestConfig().quality.min_interval_ms
                if args.quality_interval_ms is None
                else args.quality_interval_ms
            ),
        },
        "under_load": load,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    write_results(args.out, result, quiet=True)

    print(f"\n{hw.get('cpu')} x{hw.get('cpu_cores')}, {data.name} {n:,} events")
    print(f"{'ingest':<34}{'events/s':>12}")
    print(f"{'raw kafka-python consume (median)':<34}{raw_med:>12,.0f}")
    print(
        f"{'raw confluent-kafka consume (med.)':<34}{raw_ck_med:>12,.0f}   ratio {raw_ck_med / raw_med:.2f}x"
    )
    print(f"{'fetch process only (median)':<34}{fetch_med:>12,.0f}   ratio {fetch_med / raw_med:.2f}x")
    per_round = statistics.median(x["events_per_s"] / r for x, r in zip(ingest, raw)) if raw else float("nan")
    print(f"{'tgnstream serve ingest (median)':<34}{ing_med:>12,.0f}   ratio {ing_med / raw_med:.2f}x")
    print(f"{'median of per-round ratios':<34}{'':>12}   {per_round:.2f}x")
    if load:
        print(f"\nunder load: {args.ingest_rate:,.0f} ev/s fed; open loop (Poisson) per RPC and rate")
        print(f"{'rpc':<10}{'req/s':>7}{'p50 ms':>9}{'p99 ms':>9}{'ingest ev/s':>13}  sustained  errors")
        for r in load["steps"]:
            print(
                f"{r['rpc']:<10}{r['target_rps']:>7.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                f"{r['ingest_events_per_s']:>13,.0f}  {str(r['sustained']):<9}  {r['errors'] or ''}"
            )
        print(f"highest sustainable rate (p99 <= {args.slo_ms} ms): {load['sustainable_rps']}")
        print(
            f"\nat {args.rate:.0f} req/s: tgnstream vs a no-op gRPC server (same client, same feed running)"
        )
        print(f"{'rpc':<10}{'p50 ms':>9}{'p99 ms':>9}{'no-op p50':>11}{'no-op p99':>11}")
        for r, f in zip(load["at_rate"], load["noop_floor_at_rate"]):
            print(
                f"{r['rpc']:<10}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{f['p50_ms']:>11.2f}{f['p99_ms']:>11.2f}"
            )
        print(f"{'no ingest, closed loop':<22}{'p50 ms':>9}{'p99 ms':>9}")
        for r in load["closed_loop_no_ingest"]:
            print(f"{r['rpc']:<22}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}")
    print(f"\nwrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
