"""Engine cost of one ``Score`` query, broken down by stage (no gRPC, one thread).

A 1-pair query touches a handful of rows, so its cost is the number of tensor ops, not FLOPs;
this shows which stage to slim. Builds a TGN + pair-features engine (random weights) from the
first ``--events`` wikipedia events, folds pending messages (as the server does), then times
each stage over ``--reps`` calls under ``torch.inference_mode`` (as the server answers). The
last rows time the whole query with an open batch of ``--open-batch`` events as context, which
is what a server fed live pays. Writes ``benchmarks/results/score_cost.json``.

    python benchmarks/score_cost.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _harness import RESULTS, dataset_path, write_results

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.loaders import load_dataset
from tgnstream.core.modules import encode_pair_features
from tgnstream.core.pair_stats import pairwise_stats
from tgnstream.core.step import TemporalStep


def _time_us(fn, reps: int) -> float:
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


@torch.inference_mode()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=dataset_path, default="wikipedia", help="dataset name or path")
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--reps", type=int, default=1000)
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--open-batch", type=int, default=500, help="events of the open batch (context row)")
    p.add_argument("--out", type=Path, default=RESULTS / "score_cost.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_dataset(args.data, limit=args.events + args.open_batch)
    open_batch = data.events.slice(args.events, args.events + args.open_batch)
    engine = MemoryEngine(ModelConfig.preset("tgn", pair_features=True), capacity=data.num_nodes).eval()
    for i in range(0, args.events, 1000):
        TemporalStep(engine).apply(data.events.slice(i, min(i + 1000, args.events)))
    engine.fold_pending()
    g = torch.Generator().manual_seed(1)
    src = data.events.src[torch.randint(args.events, (args.pairs,), generator=g)]
    dst = data.events.dst[torch.randint(args.events, (args.pairs,), generator=g)]
    t = torch.full((args.pairs,), float(engine.watermark), dtype=torch.float64)
    nodes, times = torch.cat([src, dst]), torch.cat([t, t])
    z, _ = engine.embed_with(nodes, times)
    stats = pairwise_stats(engine.history, engine.neighbors, src, dst)
    pair = encode_pair_features(stats, t)
    b = args.pairs
    stages = {
        "score (total)": lambda: engine.score(src, dst, t),
        "embeddings (temporal attention)": lambda: engine.embed_with(nodes, times),
        "pair statistics": lambda: pairwise_stats(engine.history, engine.neighbors, src, dst),
        "pair feature encoding": lambda: encode_pair_features(stats, t),
        "decoder": lambda: engine.model.decoder(z[:b], z[b:], pair),
        f"score with an open batch of {args.open_batch} (total)": lambda: engine.score(
            src, dst, t, open_batch
        ),
    }
    rows = {name: _time_us(fn, args.reps) for name, fn in stages.items()}
    width = max(map(len, rows))
    print(f"{'stage':<{width}}  µs/call  ({args.pairs} pair(s), {args.events:,} events applied)")
    for name, us in rows.items():
        print(f"{name:<{width}}  {us:8.1f}")
    result = {
        "benchmark": "score_cost",
        "pairs": args.pairs,
        "events_applied": args.events,
        "open_batch": args.open_batch,
        "microseconds_per_call": rows,
    }
    write_results(args.out, result, device="cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
