"""How the server's costs grow with the graph: seeded synthetic streams at 10^4 .. 10^7 nodes
(``core.synthetic.generate_stream``: power-law activity, repeats, drift; a user-item graph by
default, ``--graph general`` for one node set), about ``--events-per-node`` events per node.

For each size, the writer's real ingest path without the broker (the JSON records a producer
writes, fed in the server's batches to ``IngestLoop``: decode, id registration, screening,
prepare, commit into a ``LiveEngine`` whose state is shared with reader processes through a
``StateBoard``; Kafka's own per-record cost does not depend on the graph and is measured by
``serve.py``), then, on the resulting state:

* bytes per node by buffer (and per pair for the pair history, per id for the id map), RSS;
* ingest events/s over the whole stream and over its last tenth, the latency of applying one
  batch (p50, p99, max: a stall shows here), and how often the shared layout moved;
* Score engine time (1 and 100 pairs, p50/p99), TopK (exact, over every destination) time;
* snapshot write time and bytes, restore time.

Each cost is fitted against the number of nodes on a log-log scale (the exponent: 0 is
independent of size, 1 linear). Prints a table, writes ``benchmarks/results/scale.json`` and a
plot ``benchmarks/results/scale.png``. Sizes that do not fit the machine's memory or time are
left out with the reason and extrapolated from the fit (``--nodes`` lists the sizes run).

    python benchmarks/scale.py --nodes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _harness import RESULTS, write_results

from tgnstream.apps.replay import encode_event
from tgnstream.apps.serve import initial_engine
from tgnstream.apps.serve_config import ServeConfig
from tgnstream.apps.testing import StubFetcher
from tgnstream.core.synthetic import generate_stream
from tgnstream.ingest.loop import IngestLoop
from tgnstream.model_server.convert import ScoreQuery, TopKQuery
from tgnstream.model_server.queries import CandidateCache, score, top_k
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.metrics import ServerMetrics
from tgnstream.runtime.shared_state import StateBoard
from tgnstream.runtime.snapshots import SnapshotStore
from tgnstream.stream.prefetch import FetchedBatch
from tgnstream.stream.records import RecordDecoder


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _bytes_by_buffer(engine, nodes: int) -> dict[str, float]:
    """Bytes per node of every per-node buffer at its allocated capacity (what the process holds)."""
    out = {}
    for name, t in engine.state_dict(keep_vars=True).items():
        if torch.is_tensor(t) and t.dim() >= 1 and t.shape[0] == engine.capacity:
            out[name] = t.numel() * t.element_size() / nodes
    return out


def _stream(n_nodes: int, per_node: float, graph: str, seed: int):
    events = int(n_nodes * per_node)
    if graph == "user-item":
        users = max(1, int(n_nodes * 0.8))
        return generate_stream(
            events, num_src=users, num_dst=max(1, n_nodes - users), bipartite=True,
            activity_exponent=1.0, repeat_prob=0.5, drift=0.2, seed=seed,
        )  # fmt: skip
    return generate_stream(
        events, num_src=n_nodes, bipartite=False, activity_exponent=1.0, repeat_prob=0.5, drift=0.2, seed=seed
    )


def run_size(n_nodes: int, args) -> dict:
    torch.manual_seed(0)
    data = _stream(n_nodes, args.events_per_node, args.graph, args.seed)
    ev = data.events
    n = len(ev)
    cfg = ServeConfig()
    engine, version = initial_engine(cfg.model, "cpu")
    engine.eval()
    live = LiveEngine(engine, version, {})
    ctx = torch.multiprocessing.get_context("spawn")
    with live.write():  # reader processes would map this shared state (the server's default)
        live.board = StateBoard(engine, version, cfg.ingest.batch_max_events, ctx)
    decoder = RecordDecoder(edge_dim=engine.config.edge_dim, encoding="json")
    loop = IngestLoop(cfg.ingest, live, StubFetcher(n), decoder, None, None, cfg.snapshots, ServerMetrics())
    b = cfg.ingest.batch_max_events
    src, dst, ts = ev.src.numpy(), ev.dst.numpy(), ev.t.numpy()
    batch_s: list[float] = []
    chunk = 100_000
    t_all = time.perf_counter()
    encode_s = 0.0
    last_tenth_start = None
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        e0 = time.perf_counter()
        values = [encode_event(f"n{s}", f"n{d}", t) for s, d, t in zip(src[c0:c1], dst[c0:c1], ts[c0:c1])]
        encode_s += time.perf_counter() - e0
        for s in range(0, len(values), b):
            part = values[s : s + b]
            k = len(part)
            off = c0 + s
            if last_tenth_start is None and (off >= n * 0.9 or off + k >= n):
                last_tenth_start = (time.perf_counter(), off, encode_s)
            batch = FetchedBatch(
                part, [None] * k, np.zeros(k, np.int32), np.arange(off, off + k), np.zeros(k, np.int64),
                {0: off + k}, {0: n},
            )  # fmt: skip
            t0 = time.perf_counter()
            loop._handle(batch)
            batch_s.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_all - encode_s
    t_tenth, off_tenth, encoded_before = last_tenth_start
    tenth_s = time.perf_counter() - t_tenth - (encode_s - encoded_before)  # without record encoding
    tenth_rate = (n - off_tenth) / max(1e-9, tenth_s)
    nodes = len(engine.ids)
    result: dict = {
        "nodes": nodes,
        "events": n,
        "pairs": len(engine.history),
        "batch_max_events": b,
        "ingest_events_per_s": n / wall,
        "ingest_events_per_s_last_tenth": tenth_rate,
        "apply_batch_ms": {
            "p50": 1e3 * _pct(batch_s, 50),
            "p99": 1e3 * _pct(batch_s, 99),
            "max": 1e3 * max(batch_s),
        },
        "layout_changes": live.board.layout_changes,
        "capacity": engine.capacity,
    }
    # -------------------------------------------------------------------------- bytes
    per_buffer = _bytes_by_buffer(engine, nodes)
    hist = engine.history
    pair_bytes = sum(t.element_size() * t.numel() for t in (hist.keys, hist.counts, hist.last_t))
    ids = engine.ids
    id_bytes = ids._blob_store.numel() + ids._offsets_store.numel() * ids._offsets_store.element_size()
    index = ids._index
    dict_bytes = sys.getsizeof(index) + sum(sys.getsizeof(k) + 28 for k in index)  # key str + int object
    result["bytes_per_node"] = {
        **per_buffer,
        "history (pairs, per node)": pair_bytes / nodes,
        "ids (tensors)": id_bytes / nodes,
        "ids (python index)": dict_bytes / nodes,
    }
    result["bytes_per_node_total"] = sum(result["bytes_per_node"].values())
    result["bytes_per_pair"] = pair_bytes / max(1, len(hist))
    result["rss_mb"] = _rss_mb()
    # ------------------------------------------------------------------------- queries
    rng = np.random.default_rng(1)
    picks = rng.integers(0, n, size=400)
    pairs = [(f"n{src[i]}", f"n{dst[i]}") for i in picks]
    times = {}
    for width in (1, 100):
        lat = []
        for r in range(args.query_reps):
            chosen = pairs[(r * width) % 300 : (r * width) % 300 + width]
            q = ScoreQuery([a for a, _ in chosen], [b for _, b in chosen], None)
            t0 = time.perf_counter()
            score(live, q)
            lat.append(time.perf_counter() - t0)
        times[f"score_{width}_ms"] = {"p50": 1e3 * _pct(lat, 50), "p99": 1e3 * _pct(lat, 99)}
    cache = CandidateCache()
    t0 = time.perf_counter()
    top_k(live, TopKQuery(pairs[0][0], 10, None, False, None, False), cache)
    times["topk_exact_first_ms"] = 1e3 * (time.perf_counter() - t0)
    lat = []
    for r in range(min(20, args.query_reps)):
        t0 = time.perf_counter()
        top_k(live, TopKQuery(pairs[r][0], 10, None, False, None, False), cache)
        lat.append(time.perf_counter() - t0)
    times["topk_exact_cached_ms"] = {"p50": 1e3 * _pct(lat, 50), "p99": 1e3 * _pct(lat, 99)}
    result["queries"] = times
    result["destinations"] = int(engine.destinations().numel())
    # ------------------------------------------------------------------------ snapshots
    work = Path(tempfile.mkdtemp(prefix="tgnstream-scale-"))
    try:
        store = SnapshotStore(work, keep=1)
        t0 = time.perf_counter()
        snap = store.write(engine, version, dict(live.next_offsets), "events", None)
        write_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in snap.path.iterdir())
        gc.collect()
        t0 = time.perf_counter()
        SnapshotStore(work, keep=1).restore_latest("cpu", topic="events")
        restore_s = time.perf_counter() - t0
        result["snapshot"] = {"write_s": write_s, "bytes": size, "restore_s": restore_s}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Exponent and prefactor of ``y = a * x**k`` (least squares in log-log); None if < 2 points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return None
    lx, ly = np.array(pts).T
    k, log_a = np.polyfit(lx, ly, 1)
    return float(k), float(math.exp(log_a))


COSTS = {
    "ingest µs/event": lambda r: 1e6 / r["ingest_events_per_s"],
    "ingest µs/event, last tenth": lambda r: 1e6 / r["ingest_events_per_s_last_tenth"],
    "apply batch p99 ms": lambda r: r["apply_batch_ms"]["p99"],
    "apply batch max ms": lambda r: r["apply_batch_ms"]["max"],
    "Score 1 pair p50 ms": lambda r: r["queries"]["score_1_ms"]["p50"],
    "Score 100 pairs p50 ms": lambda r: r["queries"]["score_100_ms"]["p50"],
    "TopK exact (cached) p50 ms": lambda r: r["queries"]["topk_exact_cached_ms"]["p50"],
    "bytes per node": lambda r: r["bytes_per_node_total"],
    "snapshot write s": lambda r: r["snapshot"]["write_s"],
    "snapshot bytes": lambda r: r["snapshot"]["bytes"],
    "restore s": lambda r: r["snapshot"]["restore_s"],
    "peak RSS MB": lambda r: r["peak_rss_mb"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="graph sizes")
    p.add_argument("--events-per-node", type=float, default=10.0, help="stream length per node")
    p.add_argument("--graph", choices=["user-item", "general"], default="user-item")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query-reps", type=int, default=200, help="Score calls timed per size")
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    p.add_argument("--plot", type=Path, default=None, help="plot file (default: next to --out, .png)")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in args.nodes:
        print(f"size {n:,} nodes, ~{int(n * args.events_per_node):,} events ...", flush=True)
        r = run_size(n, args)
        rows.append(r)
        print(
            f"  {r['nodes']:,} nodes, {r['pairs']:,} pairs: ingest {r['ingest_events_per_s']:,.0f} ev/s "
            f"(last tenth {r['ingest_events_per_s_last_tenth']:,.0f}), batch p99 "
            f"{r['apply_batch_ms']['p99']:.1f} ms max {r['apply_batch_ms']['max']:.0f} ms, "
            f"{r['bytes_per_node_total']:.0f} B/node, RSS {r['rss_mb']:.0f} MB",
            flush=True,
        )
        gc.collect()
    fits = {}
    xs = [r["nodes"] for r in rows]
    print(f"\n{'cost':<30}" + "".join(f"{x:>14,}" for x in xs) + f"{'exponent':>10}")
    for name, get in COSTS.items():
        ys = [get(r) for r in rows]
        f = fit(xs, ys)
        fits[name] = None if f is None else {"exponent": f[0], "prefactor": f[1]}
        expo = "-" if f is None else f"{f[0]:+.2f}"
        print(f"{name:<30}" + "".join(f"{y:>14,.3g}" for y in ys) + f"{expo:>10}")
    for name, row in rows[-1]["bytes_per_node"].items():
        print(f"  bytes/node {name:<40}{row:>10.1f}")
    write_results(args.out, {"benchmark": "scale", "graph": args.graph, "sizes": rows, "fits": fits})
    _plot(rows, fits, args.plot or args.out.with_suffix(".png"))
    return 0


def _plot(rows, fits, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'tgnstream[demo]'): no plot")
        return
    xs = [r["nodes"] for r in rows]
    fig, axes = plt.subplots(3, 4, figsize=(16, 10))
    for ax, (name, get) in zip(axes.flat, COSTS.items()):
        ys = [get(r) for r in rows]
        ax.loglog(xs, ys, "o-")
        f = fits.get(name)
        title = name if f is None else f"{name}  (∝ N^{f['exponent']:.2f})"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("nodes")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
