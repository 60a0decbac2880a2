"""How much of TopK's candidate cache a batch invalidates: per applied batch, the share of
candidate destinations the batch touches (their memory changes) and the share touched or with a
touched node among their table neighbours (their embedding's inputs change). Sizes what an
incremental cache refresh would save over rebuilding every candidate per batch.

    python benchmarks/topk_touched.py [--warm 60000] [--batches 5] [--batch-size 1000]

Prints one line per batch and writes ``benchmarks/results/topk_touched.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.loaders import load_dataset

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "wikipedia.csv")
    p.add_argument("--warm", type=int, default=60_000, help="events applied before measuring")
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "topk_touched.json")
    args = p.parse_args()
    b = args.batch_size
    data = load_dataset(args.data, limit=args.warm + args.batches * b)
    torch.manual_seed(0)
    engine = MemoryEngine(ModelConfig.preset("tgn", width=32, pair_features=True), 10_000).eval()
    ev = data.events
    for i in range(0, args.warm, b):
        engine.apply_events(ev.slice(i, min(i + b, args.warm)))
        engine.fold_pending()
    rows = []
    for i in range(args.warm, args.warm + args.batches * b, b):
        batch = ev.slice(i, i + b)
        cand = engine.destinations()
        touched = torch.unique(torch.cat([batch.src, batch.dst]))
        hit = torch.isin(cand, touched)
        nb = engine.neighbors.ids[cand]
        near = hit | (torch.isin(nb, touched) & (nb >= 0)).any(1)
        row = {
            "first_event": i,
            "candidates": cand.numel(),
            "touched": int(hit.sum()),
            "touched_or_neighbour_touched": int(near.sum()),
        }
        rows.append(row)
        near_n, n = row["touched_or_neighbour_touched"], row["candidates"]
        print(
            f"batch at {i}: {n} candidates, touched {row['touched']} ({row['touched'] / n:.0%}), "
            f"touched or 1-hop {near_n} ({near_n / n:.0%})"
        )
        engine.apply_events(batch)
        engine.fold_pending()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "batch_size": b, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
