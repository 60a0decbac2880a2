"""What TopK's candidate times cost and save: ``query`` (every candidate embedded at the state's
watermark, recomputed for every applied batch) against ``last_change`` (each candidate as of the
last change in its neighbourhood; a new state recomputes only the candidates its batch reached).

Two measurements on a trained checkpoint and wikipedia:

1. quality: test MRR and hits@10 ranking against every page, through the project's streaming
   evaluation with each setting (``EvalSettings.candidate_time``);
2. cost: the test span applied in batches of ``--batch-size`` (the serving default), with the
   server's candidate cache refreshed after each batch in each mode: milliseconds per refresh
   and the share of candidates recomputed.

    python benchmarks/topk_refresh.py --checkpoint runs/wikipedia/checkpoint.pt

Prints a table and writes ``benchmarks/results/topk_refresh.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from _harness import RESULTS, ROOT, dataset_path, write_results
from tqdm.auto import tqdm

from tgnstream.core.checkpoint import load_checkpoint
from tgnstream.core.loaders import load_dataset
from tgnstream.core.step import TemporalStep
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream, summarise
from tgnstream.model_server.queries import CandidateCache
from tgnstream.runtime.live import LiveEngine
from tgnstream.trainer.config import OfflineTrainConfig

MODES = ("query", "last_change")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "wikipedia" / "checkpoint.pt")
    p.add_argument("--data", type=dataset_path, default="wikipedia", help="dataset name or path")
    p.add_argument("--batch-size", type=int, default=1000, help="serving batch (ingest.batch_max_events)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "topk_refresh.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    engine, _ = load_checkpoint(args.checkpoint)
    engine.reset_state()
    engine.eval()
    defaults = OfflineTrainConfig.model_fields
    _, test0 = data.chronological_split(defaults["val_frac"].default, defaults["test_frac"].default)
    stop = len(data)
    with torch.no_grad():
        for i in tqdm(range(0, test0, 200), desc="history", leave=False):
            TemporalStep(engine).apply(data.events.slice(i, min(i + 200, test0)))
    start_state = copy.deepcopy(engine.state_dict())

    quality = {}
    for mode in MODES:
        engine.load_state_dict(start_state)
        settings = EvalSettings(candidate_time=mode, progress=True)
        quality[mode] = summarise(evaluate_stream(engine, data, test0, stop, settings))

    cost = {}
    for mode in MODES:
        engine.load_state_dict(start_state)
        engine.fold_pending()
        live = LiveEngine(engine, "bench", {0: test0})
        cache = CandidateCache(candidate_time=mode)
        cache.get(live, engine)
        ms, shares = [], []
        for i in tqdm(range(test0, stop, args.batch_size), desc=f"refresh ({mode})", leave=False):
            with live.write() as e:
                TemporalStep(e).apply(data.events.slice(i, min(i + args.batch_size, stop)))
                e.fold_pending()  # as the server does after each batch
            before = cache.computed
            t0 = time.perf_counter()
            entry = cache.get(live, engine)
            ms.append((time.perf_counter() - t0) * 1e3)
            shares.append((cache.computed - before) / max(entry.nodes.numel(), 1))
        cost[mode] = {
            "refreshes": len(ms),
            "ms_per_refresh_mean": statistics.fmean(ms),
            "ms_per_refresh_p50": statistics.median(ms),
            "recomputed_share_mean": statistics.fmean(shares),
        }

    print(f"{'candidate time':<14} {'test MRR':>9} {'hits@10':>8} {'ms/refresh':>11} {'recomputed':>11}")
    for mode in MODES:
        q, c = quality[mode], cost[mode]
        print(
            f"{mode:<14} {q['mrr']:>9.4f} {q['hits@10']:>8.4f} {c['ms_per_refresh_mean']:>11.2f} "
            f"{c['recomputed_share_mean']:>10.1%}"
        )
    result = {
        "benchmark": "topk_refresh",
        "checkpoint": str(args.checkpoint),
        "batch_size": args.batch_size,
        "test_events": stop - test0,
        "quality": quality,
        "cost": cost,
    }
    write_results(args.out, result, device="cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
