"""Record decoding benchmark: µs per record of ``RecordDecoder.decode`` on micro-batches.

Cases (each on batches of ``--batch`` wikipedia-like events, as ``tgnstream replay`` encodes them):

* ``json``            all records valid (the serving fast path);
* ``json_1pct_bad``   1% malformed records of many kinds mixed in (re-decoded one by one);
* ``json_int_ids``    ids sent as JSON integers (stringified);
* ``protobuf``        the binary ``tgnstream.rpc.v1.Event`` encoding;
* ``json_per_record`` the per-record reference path alone, for scale (what a plain loop costs).

Prints a table and writes ``benchmarks/results/decode.json``.

    python benchmarks/decode.py                   # featureless wikipedia.csv (else synthetic),
                                                  # then 172 random features (synthetic)
    python benchmarks/decode.py --feature-dim 0   # featureless only
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np
from _harness import RESULTS, dataset_path, write_results

from tgnstream.apps.replay import encode_event
from tgnstream.stream.records import RecordDecoder

# Malformed values mixed into the "1% bad" case: one of each kind, cycled.
BAD_VALUES: list[bytes | None] = [
    None,
    b'{"src":"1","dst":"2","ts":1.0',
    b'{"src":"1","dst":"2","ts":NaN}',
    b'{"src":"1","dst":"2"}',
    b'{"src":true,"dst":"2","ts":1}',
    b'{"src":"","dst":"2","ts":1}',
    b'{"src":"7","dst":"7","ts":1}',
    b"[1,2,3]",
    b'{"src":"1","dst":"2","ts":"yesterday"}',
    b'{"src":"1","dst":"2","ts":1,"label":1.5}',
    b"\xff\xfe",
]


def events(data: Path, n: int, d: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``n`` wikipedia-like events: the dataset's first events (featureless), or a synthetic
    bipartite stream with ``d`` random features."""
    rng = np.random.default_rng(0)
    if data.is_file() and d == 0:
        from tgnstream.core.loaders import load_dataset

        ds = load_dataset(data, limit=n)
        raw = ds.raw_ids
        src = [raw[i] for i in ds.events.src.tolist()]
        dst = [raw[i] for i in ds.events.dst.tolist()]
        return src, dst, ds.events.t.numpy(), ds.labels.numpy(), np.zeros((len(src), 0), np.float32)
    src = [str(x) for x in rng.integers(0, 8000, n)]
    dst = [str(x) for x in rng.integers(8000, 9000, n)]
    ts = np.cumsum(rng.exponential(16.0, n))
    labels = (rng.random(n) < 0.001).astype(np.int64)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    return src, dst, ts, labels, feats


def encode_all(cols, encoding: str) -> list[bytes]:
    """Every event as ``tgnstream replay`` would send it."""
    src, dst, ts, labels, feats = cols
    d = feats.shape[1]
    return [
        encode_event(s, t_dst, float(t), int(lab), feats[i] if d else None, encoding=encoding)
        for i, (s, t_dst, t, lab) in enumerate(zip(src, dst, ts.tolist(), labels.tolist()))
    ]


def time_case(decoder: RecordDecoder, batches: list[list], repeat: int, per_record: bool = False) -> dict:
    n = sum(len(b) for b in batches)
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        if per_record:
            for b in batches:
                for v in b:
                    decoder.decode_one(v)
        else:
            for b in batches:
                decoder.decode(b)
        runs.append((time.perf_counter() - started) / n * 1e6)
    best, median = min(runs), statistics.median(runs)
    return {
        "us_per_record_best": round(best, 3),
        "us_per_record_median": round(median, 3),
        "records_per_s_best": round(1e6 / best),
        "records": n,
        "repeats": repeat,
    }


def run_config(args, d: int, n: int) -> dict:
    """Time every case for one feature width; returns the result block (and prints a table)."""
    cols = events(args.data, n, d)
    json_values = encode_all(cols, "json")
    proto_values = encode_all(cols, "protobuf")
    feats = cols[4]
    int_values = [  # the same events with the (numeric) ids sent as JSON integers
        encode_event(int(s), int(t_dst), float(t), int(lab), feats[i] if d else None)
        for i, (s, t_dst, t, lab) in enumerate(zip(cols[0], cols[1], cols[2].tolist(), cols[3].tolist()))
    ]
    rnd = random.Random(0)
    bad_values = list(json_values)
    n_bad = int(round(len(bad_values) * args.bad_fraction))
    for k, i in enumerate(sorted(rnd.sample(range(len(bad_values)), n_bad))):
        bad_values[i] = BAD_VALUES[k % len(BAD_VALUES)]

    def batched(values: list) -> list[list]:
        return [values[i : i + args.batch] for i in range(0, len(values), args.batch)]

    json_dec = RecordDecoder(edge_dim=d)
    proto_dec = RecordDecoder(edge_dim=d, encoding="protobuf")
    # Sanity: every case decodes to what was encoded (a benchmark of a wrong decoder is useless).
    for dec, vals in ((json_dec, json_values), (proto_dec, proto_values), (json_dec, int_values)):
        out = dec.decode(vals[: args.batch])
        assert not out.rejected and out.src == cols[0][: args.batch], "decoder disagrees with the input"
        assert np.array_equal(out.features, feats[: args.batch]), "features differ from the input"
    out = json_dec.decode(bad_values)
    assert len(out.rejected) == n_bad, f"expected {n_bad} rejections, got {len(out.rejected)}"

    bad_name = f"json_{args.bad_fraction:.0%}_bad".replace("%", "pct")
    cases = {
        "json": time_case(json_dec, batched(json_values), args.repeat),
        bad_name: time_case(json_dec, batched(bad_values), args.repeat),
        "json_int_ids": time_case(json_dec, batched(int_values), args.repeat),
        "protobuf": time_case(proto_dec, batched(proto_values), args.repeat),
        "json_per_record": time_case(
            json_dec, batched(json_values[: n // 5]), max(1, args.repeat // 2), True
        ),
    }
    json_bytes = sum(map(len, json_values)) / len(json_values)
    proto_bytes = sum(map(len, proto_values)) / len(proto_values)
    source = "synthetic" if d or not args.data.is_file() else args.data.name
    print(
        f"\nedge_dim {d} ({source}): {n:,} records, batch {args.batch}, "
        f"mean value {json_bytes:.0f} B JSON / {proto_bytes:.0f} B protobuf"
    )
    print(f"{'case':<18} {'µs/record best':>15} {'median':>8} {'records/s':>12}")
    for name, r in cases.items():
        print(
            f"{name:<18} {r['us_per_record_best']:>15.3f} {r['us_per_record_median']:>8.3f} "
            f"{r['records_per_s_best']:>12,}"
        )
    return {
        "edge_dim": d,
        "data": source,
        "records": n,
        "mean_json_bytes": round(json_bytes, 1),
        "mean_protobuf_bytes": round(proto_bytes, 1),
        "cases": cases,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        type=dataset_path,
        default="wikipedia",
        help="JODIE csv for the featureless run (a name or a path)",
    )
    p.add_argument("--events", type=int, default=50_000, help="records per featureless case (default 50,000)")
    p.add_argument("--batch", type=int, default=1000, help="records per decode() call (default 1000)")
    p.add_argument(
        "--feature-dim",
        type=int,
        default=172,
        help="also run with this many random features, as JODIE wikipedia with features (0: skip)",
    )
    p.add_argument("--feature-events", type=int, default=10_000, help="records per featured case")
    p.add_argument("--bad-fraction", type=float, default=0.01, help="share of bad records (default 0.01)")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions; best and median reported")
    p.add_argument("--out", type=Path, default=RESULTS / "decode.json")
    args = p.parse_args()

    runs = [run_config(args, 0, args.events)]
    if args.feature_dim > 0:
        runs.append(run_config(args, args.feature_dim, args.feature_events))
    result = {"benchmark": "decode", "batch": args.batch, "bad_fraction": args.bad_fraction, "runs": runs}
    print()
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
