"""What a delta snapshot costs against a full one, and what restoring a chain costs.

For each size (``--nodes``), a served model's state (``ServeConfig``'s default model, as
``initial_engine`` builds it) holding that many registered nodes is built quickly: a seeded
synthetic stream (``core.synthetic.generate_stream``, user-item, about ``--events-per-node``
events per node) applied with ``TemporalStep.apply`` on dense ids. Then, as the server does:

* a full snapshot (the base): write time and bytes;
* ``--deltas`` times: ``--delta-events`` more events through the serving apply (prepare +
  commit, which folds), the touched nodes and pairs accumulated as the ingest loop does
  (``Changes``), then a delta snapshot: write time, bytes, nodes and pairs it holds;
* restore time of the base alone and of the whole chain (base + every delta; alternated, the
  best of ``--restore-reps``), and that the chain restores the state bit for bit (against the
  live engine's ``state_dict``).

Prints a table and writes ``benchmarks/results/snapshot_delta.json``.

    python benchmarks/snapshot_delta.py --nodes 100000 1000000
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _harness import RESULTS, write_results

from tgnstream.apps.serve import initial_engine
from tgnstream.apps.serve_config import ServeConfig
from tgnstream.core.step import TemporalStep
from tgnstream.core.synthetic import generate_stream
from tgnstream.runtime.snapshots import Changes, SnapshotStore


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if list(a) != list(b):
        return False
    return all(
        x.dtype == y.dtype
        and x.shape == y.shape
        and x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8))
        for x, y in zip(a.values(), b.values())
    )


def run_size(n_nodes: int, args) -> dict:
    torch.manual_seed(0)
    extra = args.deltas * args.delta_events
    base_events = int(n_nodes * args.events_per_node)
    users = int(n_nodes * 0.8)
    data = generate_stream(
        base_events + extra, num_src=users, num_dst=n_nodes - users, bipartite=True,
        activity_exponent=1.0, repeat_prob=0.5, drift=0.2, seed=args.seed,
    )  # fmt: skip
    ev = data.events
    engine, version = initial_engine(ServeConfig().model, "cpu")
    engine.eval()
    t0 = time.perf_counter()
    engine.ids.lookup([f"n{i}" for i in range(n_nodes)])  # ids registered, as the server does
    engine.ids.flush()
    engine.ensure_capacity(n_nodes + 1)
    step = TemporalStep(engine)
    for s in range(0, base_events, args.build_batch):
        step.apply(ev.slice(s, min(base_events, s + args.build_batch)))
    engine.fold_pending()  # as the server holds it: no pending message
    build_s = time.perf_counter() - t0
    print(f"  built {n_nodes:,} nodes, {base_events:,} events in {build_s:.1f} s", flush=True)

    work = Path(tempfile.mkdtemp(prefix="tgnstream-delta-", dir=args.workdir))
    out: dict = {"nodes": n_nodes, "base_events": base_events, "build_s": build_s}
    try:
        store = SnapshotStore(work, keep=1, full_every=args.deltas)
        gc.collect()
        t0 = time.perf_counter()
        base = store.write(engine, version, {0: base_events}, "events")
        out["full"] = {"write_s": time.perf_counter() - t0, "bytes": _dir_bytes(base.path)}
        print(f"  full: {out['full']['write_s']:.2f} s, {out['full']['bytes'] / 1e6:,.1f} MB", flush=True)
        deltas = []
        at = base_events
        for _ in range(args.deltas):
            changes = Changes()
            for s in range(at, at + args.delta_events, args.serve_batch):
                batch = ev.slice(s, min(at + args.delta_events, s + args.serve_batch))
                changes.add(batch.src, batch.dst)
                step.commit_live(step.prepare_live(batch))
            at += args.delta_events
            t0 = time.perf_counter()
            snap = store.write(engine, version, {0: at}, "events", changes=changes)
            write_s = time.perf_counter() - t0
            assert snap.kind == "delta", snap
            deltas.append(
                {
                    "write_s": write_s,
                    "bytes": _dir_bytes(snap.path),
                    "nodes": int(changes.nodes().numel()),
                    "pairs": int(changes.pairs().numel()),
                }
            )
            print(
                f"  delta after {args.delta_events:,} events: {write_s:.3f} s, "
                f"{deltas[-1]['bytes'] / 1e6:,.2f} MB, {deltas[-1]['nodes']:,} nodes",
                flush=True,
            )
        out["deltas"] = deltas
        live_state = {k: v.clone() for k, v in engine.state_dict().items()}
        del engine, step
        # Alternated, best of --restore-reps: the first large load of a process also pays for
        # fresh pages, which would count against whichever ran first.
        base_s, chain_s = [], []
        for _ in range(args.restore_reps):
            gc.collect()
            t0 = time.perf_counter()
            base.load()
            base_s.append(time.perf_counter() - t0)
            gc.collect()
            t0 = time.perf_counter()
            snap, restored = SnapshotStore(work).restore_latest(topic="events")
            chain_s.append(time.perf_counter() - t0)
            if len(chain_s) < args.restore_reps:
                del restored
        out["restore_base_s"], out["restore_chain_s"] = min(base_s), min(chain_s)
        out["restore_base_all_s"], out["restore_chain_all_s"] = base_s, chain_s
        out["chain_length"] = 1 + len(snap.chain)
        out["identical"] = _identical(restored.state_dict(), live_state)
        print(
            f"  restore: base {out['restore_base_s']:.2f} s, base + {args.deltas} deltas "
            f"{out['restore_chain_s']:.2f} s, identical {out['identical']}",
            flush=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[100_000, 1_000_000], help="graph sizes")
    p.add_argument("--events-per-node", type=float, default=2.0, help="events applied before the base")
    p.add_argument("--delta-events", type=int, default=10_000, help="events between two snapshots")
    p.add_argument("--deltas", type=int, default=4, help="deltas written on the base")
    p.add_argument("--build-batch", type=int, default=20_000, help="batch size building the state")
    p.add_argument("--serve-batch", type=int, default=1_000, help="batch size of the serving apply")
    p.add_argument("--restore-reps", type=int, default=2, help="restores timed (alternated, best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="where snapshots are written (default: tmp)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", type=Path, default=RESULTS / "snapshot_delta.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.nodes:
        print(f"size {n:,} nodes ...", flush=True)
        rows.append(run_size(n, args))
        gc.collect()
    print(
        f"\n{'nodes':>10} {'full MB':>9} {'full s':>7} {'delta MB':>9} {'delta s':>8} {'delta nodes':>12} "
        f"{'bytes ratio':>12} {'restore base s':>15} {'restore chain s':>16} {'identical':>10}"
    )
    for r in rows:
        d = r["deltas"]
        mb = sum(x["bytes"] for x in d) / len(d) / 1e6
        ws = sum(x["write_s"] for x in d) / len(d)
        nodes = sum(x["nodes"] for x in d) / len(d)
        print(
            f"{r['nodes']:>10,} {r['full']['bytes'] / 1e6:>9,.1f} {r['full']['write_s']:>7.2f} {mb:>9.2f} "
            f"{ws:>8.3f} {nodes:>12,.0f} {r['full']['bytes'] / 1e6 / mb:>11.0f}x "
            f"{r['restore_base_s']:>15.2f} {r['restore_chain_s']:>16.2f} {str(r['identical']):>10}"
        )
    write_results(
        args.out,
        {
            "benchmark": "snapshot_delta",
            "delta_events": args.delta_events,
            "deltas": args.deltas,
            "events_per_node": args.events_per_node,
            "sizes": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
