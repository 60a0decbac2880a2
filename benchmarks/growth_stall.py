"""How long queries wait while the state grows: a node-buffer doubling and a pair-table
reallocation at a given size, made the way the writer made them before (inside the write
section) and the way it makes them now (``LiveEngine.make_room``: the copies outside the lock,
only the pair table's adoption inside). A query thread reads node rows and pair counts under
the read lock back to back and records its longest wait; the writer's own time is reported
too (ingest pauses for the copy either way).

    python benchmarks/growth_stall.py --nodes 1000000 --pairs 4000000
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch
from _harness import RESULTS, write_results

from tgnstream.core.spec import ModelSpec, build_engine
from tgnstream.runtime.live import LiveEngine


def _state(nodes: int, pairs: int) -> LiveEngine:
    """A live engine whose node buffers and pair table are full up to the point of growing."""
    spec = ModelSpec.preset("recommended")
    engine = build_engine(spec, capacity=nodes + 1).eval()
    engine.ids.lookup([f"n{i}" for i in range(nodes)], create=True)
    engine.ids.flush()
    g = torch.Generator().manual_seed(0)
    h = engine.history
    for start in range(0, pairs, 500_000):  # distinct pairs, in chunks (the table grows as it fills)
        b = min(500_000, pairs - start)
        u = torch.randint(nodes, (b,), generator=g)
        v = torch.randint(nodes, (b,), generator=g)
        h.insert(u, v, torch.full((b,), float(start), dtype=torch.float64))
    return LiveEngine(engine, "v", {})


class Queries(threading.Thread):
    """Reads a few node rows and pair counts under the read lock, back to back."""

    def __init__(self, live: LiveEngine, nodes: int):
        super().__init__(daemon=True)
        self.live, self.nodes = live, nodes
        self.stop, self.waits = threading.Event(), []

    def run(self) -> None:
        g = torch.Generator().manual_seed(1)
        while not self.stop.is_set():
            idx = torch.randint(self.nodes, (16,), generator=g)
            t0 = time.perf_counter()
            with self.live.read() as engine:
                engine.memory.memory[idx].float().sum()
                engine.history.lookup(idx, idx.flip(0))
            self.waits.append(time.perf_counter() - t0)
            time.sleep(0.001)


def measure(nodes: int, pairs: int, way: str) -> dict:
    live = _state(nodes, pairs)
    engine = live.engine
    q = Queries(live, nodes)
    q.start()
    time.sleep(0.5)
    before = len(q.waits)
    new_ids = engine.capacity  # enough ids to double the node buffers
    new_pairs = engine.history.capacity - len(engine.history) + 1  # one past the table's room
    t0 = time.perf_counter()
    if way == "under the lock (before)":
        with live.write():
            engine.ensure_capacity(len(engine.ids) + new_ids + 1)
            engine.history.reserve(len(engine.history) + new_pairs)
    else:
        live.make_room(new_ids=new_ids, new_pairs=new_pairs)
    writer_s = time.perf_counter() - t0
    time.sleep(0.5)
    q.stop.set()
    q.join()
    during = q.waits[before:]
    return {
        "nodes": nodes,
        "pairs": pairs,
        "way": way,
        "writer_s": writer_s,
        "query_max_wait_ms": max(during) * 1e3,
        "queries": len(during),
        "capacity_after": engine.capacity,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1_000_000)
    p.add_argument("--pairs", type=int, default=4_000_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the writer's copy)")
    p.add_argument("--out", type=Path, default=RESULTS / "growth_stall.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(args.nodes, args.pairs, way) for way in ("under the lock (before)", "make_room (now)")]
    print(f"\n{args.nodes:,} nodes, {args.pairs:,} pairs: node buffers doubled, pair table reallocated")
    print(f"{'growth':<26}{'writer s':>10}{'longest query wait ms':>24}{'queries':>9}")
    for r in rows:
        print(f"{r['way']:<26}{r['writer_s']:>10.2f}{r['query_max_wait_ms']:>24.1f}{r['queries']:>9}")
    write_results(args.out, {"benchmark": "growth_stall", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
