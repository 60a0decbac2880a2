"""Offline training benchmark: tgnstream vs PyTorch Geometric's TGN on the same data, same run.

Prints a table (train events/s, test AP, AUC, MRR, hits@10 for each system and the ratios) and
writes ``benchmarks/results/train_offline[_<tag>].json``. Featureless JODIE Wikipedia by default.

    python benchmarks/train_offline.py --epochs 12 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from _harness import RESULTS, ROOT, dataset_path, write_results

from tgnstream.core.config import ModelConfig
from tgnstream.core.loaders import load_dataset
from tgnstream.runtime.sysinfo import hardware_info, resolve_device
from tgnstream.trainer.config import OfflineTrainConfig
from tgnstream.trainer.offline import train_offline


def run_ours(data, args, device, pair_features: bool, tmp: Path, fold_once: bool = True) -> dict:
    cfg = OfflineTrainConfig(
        data=args.data,
        out=tmp,
        epochs=args.epochs,
        patience=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        device=str(device),
        progress=not args.no_progress,
        pair_features=pair_features,
        sampling_correction=False,  # the measured rows; the recommended recipe turns it on
        lr=args.lr,
    )
    model_cfg = ModelConfig.preset(
        "tgn", pair_features=pair_features, edge_dim=data.edge_dim, fold_once=fold_once
    )
    r = train_offline(data, cfg, model_cfg, device).results
    return {
        "system": "tgnstream" + (" +pair" if pair_features else "") + ("" if fold_once else " refold"),
        "train_events_per_s": r["train_events_per_s"],
        "seconds_per_epoch": r["seconds_per_epoch"],
        "best_epoch": r["best_epoch"],
        "test": r["test"]["transductive"],
        "test_inductive": r["test"]["inductive"],
        "val_history": r["history"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=dataset_path, default="wikipedia", help="dataset name or path")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--limit", type=int, default=None, help="first N events only (smoke runs)")
    p.add_argument("--skip-pyg", action="store_true", help="only run tgnstream")
    p.add_argument("--skip-pair", action="store_true", help="skip the pair-features run")
    p.add_argument(
        "--with-refold",
        action="store_true",
        help="also train TGN with fold_once=False (neighbour folds redone with gradient every batch)",
    )
    p.add_argument("--tag", default="", help="suffix of the results file, e.g. gpu")
    p.add_argument(
        "--out", type=Path, default=None, help="results file (default: results/train_offline[_TAG].json)"
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_dataset(args.data, limit=args.limit)
    tmp = ROOT / "runs" / "bench_train_offline"

    rows = []
    started = time.time()
    rows.append(run_ours(data, args, device, False, tmp))
    if args.with_refold:
        rows.append(run_ours(data, args, device, False, tmp, fold_once=False))
    if not args.skip_pair:
        rows.append(run_ours(data, args, device, True, tmp))
    if not args.skip_pyg:
        from pyg_baseline import run_pyg_tgn

        pyg = run_pyg_tgn(
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            device=str(device),
            lr=args.lr,
            progress=not args.no_progress,
        )
        pyg["system"] = "pyg-tgn"
        rows.append(pyg)

    base = next((r for r in rows if r["system"] == "pyg-tgn"), None)
    cols = ["train ev/s", "s/epoch", "test AP", "AUC", "MRR", "hits@10", "ind. AP"]
    widths = [12, 9, 9, 8, 8, 9, 9]
    header = f"{'system':<20}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths))
    lines = [header, "-" * len(header)]
    for r in rows:
        t, ti = r["test"], r.get("test_inductive", {})
        lines.append(
            f"{r['system']:<20}{r['train_events_per_s']:>12,.0f}{r['seconds_per_epoch']:>9.1f}{t['ap']:>9.4f}"
            f"{t['auc']:>8.4f}{t['mrr']:>8.4f}{t['hits@10']:>9.4f}{ti.get('ap', float('nan')):>9.4f}"
        )
    ratios = {}
    if base:
        for r in rows:
            if r is base:
                continue
            ratios[r["system"]] = {
                "throughput_x": r["train_events_per_s"] / base["train_events_per_s"],
                "ap_diff": r["test"]["ap"] - base["test"]["ap"],
                "mrr_diff": r["test"]["mrr"] - base["test"]["mrr"],
            }
            lines.append(
                f"{r['system']} vs pyg-tgn: throughput {ratios[r['system']]['throughput_x']:.2f}x, "
                f"test AP {ratios[r['system']]['ap_diff']:+.4f}, MRR {ratios[r['system']]['mrr_diff']:+.4f}"
            )
    hw = hardware_info(device)
    lines.append(
        f"data {data.name} ({len(data):,} events, featureless={data.edge_dim == 0}), epochs {args.epochs}, "
        f"batch {args.batch_size}, seed {args.seed}; {hw['cpu']} x{hw['cpu_cores']}, "
        f"{hw['torch_threads']} torch threads, device {hw['device']}{' ' + hw['gpu'] if 'gpu' in hw else ''}"
    )
    table = "\n".join(lines)
    print(table)
    out = args.out or RESULTS / f"train_offline{'_' + args.tag if args.tag else ''}.json"
    result = {
        "benchmark": "train_offline",
        "dataset": data.name,
        "num_events": len(data),
        "featureless": data.edge_dim == 0,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "rows": rows,
        "ratios": ratios,
        "table": table,
        "wall_seconds": time.time() - started,
    }
    write_results(out, result, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
