"""Where the server's ingest time goes, per event, without Kafka: the wikipedia stream as the
JSON records the replay tool writes, fed in micro-batches straight to ``IngestLoop`` (decode,
id registration, prequential quality, prepare, commit). This is the server-side half of the
ingest path; ``serve.py`` measures the whole path on the embedded broker.

Writes ``benchmarks/results/ingest_cost.json`` and prints a table.

    python benchmarks/ingest_cost.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _harness import RESULTS, dataset_path, write_results

from tgnstream.apps.replay import iter_records
from tgnstream.apps.serve import initial_engine
from tgnstream.apps.serve_config import ServeConfig
from tgnstream.apps.testing import StubFetcher
from tgnstream.core.loaders import load_dataset
from tgnstream.ingest.loop import IngestLoop
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.metrics import ServerMetrics
from tgnstream.stream.prefetch import FetchedBatch
from tgnstream.stream.records import RecordDecoder

_NESTED: list[float] = []  # time spent in timed calls nested inside the running one


def _timed(stages: dict, name: str, fn):
    """Wrap ``fn`` so ``stages[name]`` accumulates its own time, without that of timed calls
    nested inside it (the assembler registers ids and scores quality from within its feed)."""

    def wrapper(*args, **kwargs):
        _NESTED.append(0.0)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            took = time.perf_counter() - t0
            inner = _NESTED.pop()
            stages[name] += took - inner
            if _NESTED:
                _NESTED[-1] += took

    return wrapper


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=dataset_path, default="wikipedia", help="dataset name or path")
    p.add_argument("--events", type=int, default=0, help="first N events (0 = all)")
    p.add_argument("--out", type=Path, default=RESULTS / "ingest_cost.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = ServeConfig()  # the server's defaults: model, batch size, quality throttle
    data = load_dataset(args.data, limit=args.events or None)
    values = [v for _, v in iter_records(data)]
    engine, version = initial_engine(cfg.model, "cpu")
    engine.eval()
    live = LiveEngine(engine, version, {})
    decoder = RecordDecoder(edge_dim=engine.config.edge_dim, encoding="json")
    loop = IngestLoop(
        cfg.ingest, live, StubFetcher(len(values)), decoder, None, None, cfg.snapshots, ServerMetrics()
    )
    stages = dict.fromkeys(["decode", "assemble: screen, register ids", "quality", "prepare", "commit"], 0.0)
    assembler = loop.assembler
    assembler.decoder.decode = _timed(stages, "decode", assembler.decoder.decode)
    assembler.feed = _timed(stages, "assemble: screen, register ids", assembler.feed)
    loop.quality.observe = _timed(stages, "quality", loop.quality.observe)
    engine.prepare_events = _timed(stages, "prepare", engine.prepare_events)
    engine.commit_events = _timed(stages, "commit", engine.commit_events)

    b, n = cfg.ingest.batch_max_events, len(values)
    t0 = time.perf_counter()
    for s in range(0, n, b):
        chunk = values[s : s + b]
        k = len(chunk)
        batch = FetchedBatch(
            chunk, [None] * k, np.zeros(k, np.int32), np.arange(s, s + k), np.zeros(k, np.int64),
            {0: s + k}, {0: n},
        )  # fmt: skip
        loop._handle(batch)
        loop._update_lag(batch)
    total = time.perf_counter() - t0
    per_event = {name: sec / n * 1e6 for name, sec in stages.items()}
    per_event["other (locks, metrics, lag)"] = (total - sum(stages.values())) / n * 1e6
    result = {
        "benchmark": "ingest_cost",
        "events": n,
        "batch_max_events": b,
        "events_per_s": n / total,
        "microseconds_per_event": per_event,
        "model": engine.config.label,
    }
    print(f"{n:,} events, batches of {b}: {n / total:,.0f} events/s of server-side ingest work")
    for name, us in per_event.items():
        print(f"  {name:<28}{us:>7.2f} µs/event")
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
