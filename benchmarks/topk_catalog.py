"""TopK over large catalogs: exact ranking of every candidate against the two-stage path (an ANN
shortlist from ``model_server/catalog.py``, then the exact ranking of the shortlist).

1. Synthetic catalogs (``--sizes``, candidates): a bipartite user-item stream
   (``generate_stream``, flat popularity so that most items get events) replayed through the
   step, the candidate cache built with ``last_change`` times; then engine-level TopK (k=10,
   ``queries.top_k``, one query at a time) for ``--queries`` recent sources: p50/p99 latency of
   each path, recall@10 of the two-stage answers against the exact ones (skipped above
   ``--exact-max`` candidates: the exact path is what does not scale), the index build time and
   the time to bring it to the next state after a ``--batch``-event batch.
2. Wikipedia (``--data``; 1,000 pages): over the test span, each batch's sources ask TopK over
   every page (k = ``--wiki-k``) at the state before their batch, exact and two-stage forced on
   with an ANN shortlist of ``--wiki-shortlist`` of the 1,000 pages (plus the source's partners and
   the ``--wiki-extras`` newest pages); MRR of the true destination (beyond rank k: 0).

Weights: ``--checkpoint`` (a model trained on wikipedia, featureless, so it also runs on the
synthetic streams), else untrained weights of the recommended model (recall then means little).

    python benchmarks/topk_catalog.py --checkpoint runs/wikipedia/checkpoint.pt

Prints a table and writes ``benchmarks/results/topk_catalog.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _harness import RESULTS, ROOT, dataset_path, write_results

from tgnstream.core.checkpoint import load_checkpoint
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.loaders import load_dataset
from tgnstream.core.step import TemporalStep
from tgnstream.core.synthetic import generate_stream
from tgnstream.model_server import queries
from tgnstream.model_server.catalog import CatalogSettings
from tgnstream.model_server.convert import TopKQuery
from tgnstream.runtime.live import LiveEngine
from tgnstream.trainer.config import OfflineTrainConfig


def _engine(checkpoint: Path | None) -> MemoryEngine:
    if checkpoint is not None and checkpoint.exists():
        engine, _ = load_checkpoint(checkpoint)
        engine.reset_state()
    else:
        torch.manual_seed(0)
        engine = MemoryEngine(ModelConfig.preset("recommended"), capacity=1024)
    return engine.eval()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _ask(live, cache, name: str, k: int):
    t0 = time.perf_counter()
    reply = queries.top_k(live, TopKQuery(name, k, None, False, None, False), cache)
    return reply, (time.perf_counter() - t0) * 1e3


def synthetic(size: int, args) -> dict:
    engine = _engine(args.checkpoint)
    num_src = size // 2
    events = args.events_per_candidate * size
    stream = generate_stream(
        events + args.batch, num_src=num_src, num_dst=size, activity_exponent=0.6, seed=1
    ).events
    engine.ids.lookup([str(i) for i in range(num_src + size)], create=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, events, 5000):
            TemporalStep(engine).apply(stream.slice(i, min(i + 5000, events)))
    engine.fold_pending()
    replay_s = time.perf_counter() - t0
    live = LiveEngine(engine, "bench", {0: events})
    settings = CatalogSettings(threshold=1, shortlist=args.shortlist, nprobe=args.nprobe)
    exact = queries.CandidateCache(candidate_time="last_change", catalog=CatalogSettings(threshold=1 << 62))
    two = queries.CandidateCache(candidate_time="last_change", catalog=settings)
    t0 = time.perf_counter()
    with live.read():
        entry = two.get(live, engine)
    embed_s = time.perf_counter() - t0
    exact._entry = entry  # the same entry: only the ranking differs
    sources = [str(i) for i in torch.unique(stream.src[events - 5000 : events])[: args.queries].tolist()]
    t0 = time.perf_counter()
    _ask(live, two, sources[0], 10)  # builds the index
    build_s = time.perf_counter() - t0
    lat_two, lat_exact, recall = [], [], []
    do_exact = size <= args.exact_max
    for name in sources:
        b, ms = _ask(live, two, name, 10)
        lat_two.append(ms)
        if do_exact:
            a, ms = _ask(live, exact, name, 10)
            lat_exact.append(ms)
            recall.append(len(set(a.ids) & set(b.ids)) / max(len(a.ids), 1))
    # One more batch: the cache recomputes what it reached, the index re-adds those rows.
    with live.write() as e:
        TemporalStep(e).apply(stream.slice(events, events + args.batch))
        e.fold_pending()
    added = two.catalog.rows_added
    t0 = time.perf_counter()
    with live.read():
        entry2 = two.get(live, engine)
    refresh_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    two.catalog.sync(entry2, engine.model.decoder)
    update_s = time.perf_counter() - t0
    row = {
        "candidates": int(entry.nodes.numel()),
        "events": events,
        "replay_s": replay_s,
        "candidate_embeddings_s": embed_s,
        "index_build_s": build_s,
        "nlist": two.catalog.nlist,
        "batch_events": args.batch,
        "cache_refresh_s": refresh_s,
        "index_update_s": update_s,
        "rows_readded": two.catalog.rows_added - added,
        "rows_near_two_centroids": two.catalog.rows_near_two,
        "two_stage_ms_p50": statistics.median(lat_two),
        "two_stage_ms_p99": _pct(lat_two, 0.99),
        "queries": len(sources),
    }
    if do_exact:
        row.update(
            exact_ms_p50=statistics.median(lat_exact),
            exact_ms_p99=_pct(lat_exact, 0.99),
            recall_at_10=statistics.fmean(recall),
        )
    return row


def wikipedia(args) -> dict:
    data = load_dataset(args.data)
    engine = _engine(args.checkpoint)
    defaults = OfflineTrainConfig.model_fields
    _, test0 = data.chronological_split(defaults["val_frac"].default, defaults["test_frac"].default)
    engine.ids.lookup([str(i) for i in range(data.num_nodes)], create=True)  # dense id i is "i"
    with torch.no_grad():
        for i in range(0, test0, 200):
            TemporalStep(engine).apply(data.events.slice(i, min(i + 200, test0)))
    engine.fold_pending()
    live = LiveEngine(engine, "bench", {0: test0})
    exact = queries.CandidateCache()
    settings = CatalogSettings(
        threshold=1, shortlist=args.wiki_shortlist, nprobe=args.nprobe, recent=args.wiki_extras, popular=0
    )
    two = queries.CandidateCache(catalog=settings)
    rr = {"exact": [], "two_stage": []}
    stop = min(len(data), test0 + args.wiki_events)
    for i in range(test0, stop, 200):
        batch = data.events.slice(i, min(i + 200, stop))
        for s, d in zip(batch.src.tolist(), batch.dst.tolist()):
            name, want = str(s), str(d)
            for key, cache in (("exact", exact), ("two_stage", two)):
                reply = queries.top_k(live, TopKQuery(name, args.wiki_k, None, False, None, False), cache)
                rank = reply.ids.index(want) + 1 if want in reply.ids else None
                rr[key].append(0.0 if rank is None else 1.0 / rank)
        with live.write() as e:
            TemporalStep(e).apply(batch)
            e.fold_pending()
    return {
        "test_events_asked": len(rr["exact"]),
        "pages": int(engine.destinations().numel()),
        "shortlist_setting": args.wiki_shortlist,
        "k": args.wiki_k,
        "mrr_exact": statistics.fmean(rr["exact"]),
        "mrr_two_stage": statistics.fmean(rr["two_stage"]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "wikipedia" / "checkpoint.pt")
    p.add_argument("--sizes", default="10000,100000,1000000", help="catalog sizes (candidates)")
    p.add_argument("--events-per-candidate", type=int, default=4)
    p.add_argument("--queries", type=int, default=100, help="TopK queries per catalog")
    p.add_argument("--exact-max", type=int, default=200_000, help="largest catalog ranked exactly too")
    p.add_argument("--batch", type=int, default=1000, help="events of the batch applied for the update")
    p.add_argument("--shortlist", type=int, default=500)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--data", type=dataset_path, default="wikipedia", help="dataset name or path")
    p.add_argument("--wiki-shortlist", type=int, default=100, help="ANN shortlist on wikipedia (of 1,000)")
    p.add_argument("--wiki-k", type=int, default=50, help="k on wikipedia: MRR counts ranks up to it")
    p.add_argument("--wiki-extras", type=int, default=50, help="newest candidates added on wikipedia")
    p.add_argument("--wiki-events", type=int, default=2000, help="test events asked on wikipedia (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "topk_catalog.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    rows = [synthetic(int(s), args) for s in args.sizes.split(",") if s]
    print(
        f"{'candidates':>10} {'exact p50/p99 ms':>17} {'2-stage p50/p99 ms':>19} {'recall@10':>9} "
        f"{'build s':>8} {'update ms':>9}"
    )
    for r in rows:
        ex = f"{r['exact_ms_p50']:.1f}/{r['exact_ms_p99']:.1f}" if "exact_ms_p50" in r else "-"
        rc = f"{r['recall_at_10']:.4f}" if "recall_at_10" in r else "-"
        print(
            f"{r['candidates']:>10} {ex:>17} {r['two_stage_ms_p50']:.1f}/{r['two_stage_ms_p99']:.1f}".ljust(
                48
            )
            + f" {rc:>9} {r['index_build_s']:>8.2f} {1e3 * r['index_update_s']:>9.1f}"
        )
    wiki = wikipedia(args) if args.wiki_events > 0 else None
    if wiki:
        print(
            f"wikipedia: MRR exact {wiki['mrr_exact']:.4f}, two-stage {wiki['mrr_two_stage']:.4f} "
            f"(ANN {args.wiki_shortlist} of {wiki['pages']}, MRR@{args.wiki_k})"
        )
    result = {
        "benchmark": "topk_catalog",
        "checkpoint": str(args.checkpoint) if args.checkpoint.exists() else None,
        "synthetic": rows,
        "wikipedia": wiki,
    }
    write_results(args.out, result, device="cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
