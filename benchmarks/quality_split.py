"""Where a model and the best memorization heuristic differ: test MRR split by the kind of event.

A checkpoint (from ``tgnstream train``) is replayed over the stream up to the test split with its
state reset (the weights as trained; the state rebuilt by the same step, AP-only scoring), then
ranks every test event against the full candidate pool, as ``recency>global_recency`` with
per-event history does. Rows: every event; events whose (unordered) pair met before, split into
"the destination is the source's most recent partner" and "an older partner"; first-time pairs.

    python benchmarks/quality_split.py --data bitcoinotc \
        --checkpoint runs/bitcoinotc/checkpoint.pt --out benchmarks/results/quality_split_bitcoinotc.json

Prints a table (share of test events, model MRR, heuristic MRR) and writes the JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _harness import dataset_path, write_results

from tgnstream.core.checkpoint import load_checkpoint
from tgnstream.core.heuristics import HeuristicScorer
from tgnstream.core.loaders import load_dataset
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream


def event_kinds(src: list[int], dst: list[int], start: int) -> dict[str, torch.Tensor]:
    """Masks over events ``[start, n)``: pair met before (unordered), destination = the
    source's most recent partner (either direction counts, as in the pair history)."""
    seen: set[tuple[int, int]] = set()
    last_partner: dict[int, int] = {}
    repeat, latest = [], []
    for i, (u, v) in enumerate(zip(src, dst)):
        key = (min(u, v), max(u, v))
        if i >= start:
            repeat.append(key in seen)
            latest.append(last_partner.get(u) == v)
        seen.add(key)
        last_partner[u], last_partner[v] = v, u
    rep, lat = torch.tensor(repeat, dtype=torch.bool), torch.tensor(latest, dtype=torch.bool)
    return {
        "all": torch.ones_like(rep),
        "repeat pair": rep,
        "repeat, destination = source's latest partner": rep & lat,
        "repeat, older partner": rep & ~lat,
        "first-time pair": ~rep,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=dataset_path, required=True, help="dataset name or path")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--heuristic", default="recency>global_recency")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    _, test_start = data.chronological_split(0.15, 0.15)
    n = len(data)
    engine, _ = load_checkpoint(args.checkpoint)
    engine.reset_state()
    evaluate_stream(engine, data, 0, test_start, EvalSettings(rank=False))
    model_rr = evaluate_stream(engine, data, test_start, n, EvalSettings(rank=True))["rr"]
    heuristic = HeuristicScorer(args.heuristic, data.num_nodes, history="event")
    heuristic.observe_all(data.events.slice(0, test_start))
    heur_rr = evaluate_stream(heuristic, data, test_start, n, EvalSettings(rank=True))["rr"]
    rows = {}
    print(
        f"\n| {data.name} test events | share | model MRR | {args.heuristic} [event] MRR |\n|---|---|---|---|"
    )
    for name, mask in event_kinds(data.events.src.tolist(), data.events.dst.tolist(), test_start).items():
        rows[name] = {
            "share": float(mask.double().mean()),
            "model_mrr": float(model_rr[mask].mean()) if mask.any() else None,
            "heuristic_mrr": float(heur_rr[mask].mean()) if mask.any() else None,
        }
        r = rows[name]
        print(f"| {name} | {r['share']:.3f} | {r['model_mrr']:.4f} | {r['heuristic_mrr']:.4f} |")
    out = {
        "benchmark": "quality_split",
        "data": str(args.data),
        "checkpoint": str(args.checkpoint),
        "heuristic": f"{args.heuristic} [event]",
        "rows": rows,
    }
    write_results(args.out, out, device="cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
