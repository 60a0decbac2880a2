"""What a hot-swap candidate's pre-flight costs (``tgnstream.runtime.preflight``) on a state of
wikipedia's size: the finite-weights check of every tensor, the probe set and the serving
model's answers (taken under the live engine's read lock, so ingest waits that long), and the
candidate's answers (on its private copy, no lock). The default model with fresh weights (the
cost does not depend on the weights), the whole stream applied first.

    python benchmarks/canary_cost.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from _harness import RESULTS, dataset_path, write_results

from tgnstream.core.loaders import load_dataset
from tgnstream.core.spec import build_engine, resolve_spec
from tgnstream.core.step import TemporalStep
from tgnstream.runtime.preflight import CanaryConfig, answers, check_weights, judge, probe_set


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=dataset_path, default="wikipedia", help="dataset name or path")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--state-dtype", default=None, help="storage of memories (default: the preset's)")
    p.add_argument("--out", type=Path, default=RESULTS / "canary_cost.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_dataset(args.data)
    ev = data.events
    engine = build_engine(resolve_spec(edge_dim=ev.feats.shape[1], state_dtype=args.state_dtype)).eval()
    n_nodes = int(max(ev.src.max(), ev.dst.max())) + 1
    engine.ids.lookup([str(i) for i in range(n_nodes)])
    engine.ids.flush()
    with torch.no_grad():
        for i in range(0, len(ev), 1000):
            batch = ev.slice(i, min(len(ev), i + 1000))
            engine.ensure_capacity(n_nodes)
            TemporalStep(engine).apply(batch)
        engine.fold_pending()
    candidate = copy.deepcopy(engine)
    cfg = CanaryConfig()
    times: dict[str, list[float]] = {
        "check_weights": [],
        "probe_and_serving_answers": [],
        "candidate_answers": [],
    }
    for r in range(args.reps + 1):  # the first round warms up
        t0 = time.perf_counter()
        check_weights(candidate)
        t1 = time.perf_counter()
        probe = probe_set(engine, cfg)
        theirs = answers(engine, probe, cfg.k)
        t2 = time.perf_counter()
        report = judge(answers(candidate, probe, cfg.k), theirs, cfg)
        t3 = time.perf_counter()
        if r:
            for name, took in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[name].append(took * 1e3)
    result = {
        "benchmark": "canary_cost",
        "nodes": n_nodes,
        "events": len(ev),
        "probe_pairs": report.pairs,
        "milliseconds_median": {k: statistics.median(v) for k, v in times.items()},
        "milliseconds_max": {k: max(v) for k, v in times.items()},
        "report": report.describe(),
    }
    print(f"{args.data.name}: {n_nodes:,} nodes, {len(ev):,} events; {report.describe()}")
    for name, v in times.items():
        print(f"  {name:<28} median {statistics.median(v):7.1f} ms   max {max(v):7.1f} ms")
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
