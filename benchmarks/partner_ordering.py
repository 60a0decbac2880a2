"""How much any ordering of a source's past partners could add to test MRR (the repeat events).

On a test event whose pair met before, the memorization heuristic ``recency>global_recency``
ranks the source's past partners by their last interaction with it. This script measures what
other pair-level orderings would get on the same events (exact per-event history, unordered
pairs as in the pair history, ties counting half): interaction count, exponentially decayed
counts (a Hawkes-style intensity) at several time scales, and "latest partner first, then" each
of them. It also prints the ceiling of every scorer that ranks the source's latest partner first
(every older partner then ranks 2nd at best), and, per time since the source's last event, how
often the destination is that latest partner. Candidates that never met the source rank below
every past partner here, so the MRR on repeat events is the ranking among past partners only.

    python benchmarks/partner_ordering.py [--datasets wikipedia,bitcoinotc]

Writes ``benchmarks/results/partner_ordering.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

from _harness import RESULTS, dataset_path, write_results

from tgnstream.core.loaders import load_dataset

#: Time scales of the decayed counts (seconds): an hour, six hours, a day, a week.
SCALES = {"1h": 3600.0, "6h": 6 * 3600.0, "1d": 86400.0, "1w": 7 * 86400.0}
#: Bins of the time since the source's last event (seconds).
GAP_BINS = [0, 60, 600, 3600, 6 * 3600, 86400, 7 * 86400, math.inf]


class _Pair:
    __slots__ = ("first", "last", "count", "decayed")

    def __init__(self) -> None:
        self.first = self.last = -math.inf
        self.count, self.decayed = 0, {s: 0.0 for s in SCALES}

    def add(self, t: float) -> None:
        for s, tau in SCALES.items():
            self.decayed[s] = self.decayed[s] * self._decay(t, tau) + 1.0
        if self.count == 0:
            self.first = t
        self.last, self.count = t, self.count + 1

    def _decay(self, t: float, tau: float) -> float:
        return 0.0 if self.last == -math.inf else math.exp(-(t - self.last) / tau)

    def keys(self, t: float, latest: bool) -> dict[str, tuple]:
        """Every ordering's sort key of this partner at query time ``t`` (larger ranks first)."""
        out = {"recency": (self.last,), "count": (self.count,)}
        for s, tau in SCALES.items():
            out[f"decayed {s}"] = (self.decayed[s] * self._decay(t, tau),)
        # Visits per unit of time since the last one (a power-law decay of the count).
        out["count / age"] = (math.log(self.count) - math.log1p(t - self.last),)
        # A periodic revisit: how close the time since the last visit is to the pair's mean gap.
        if self.count > 1:
            mean_gap = (self.last - self.first) / (self.count - 1)
            out["periodic revisit"] = (1, -abs(math.log1p(t - self.last) - math.log1p(mean_gap)))
        else:
            out["periodic revisit"] = (0, 0.0)
        for name in [k for k in out if k != "recency"]:
            out[f"latest first, then {name}"] = (latest, *out[name])
        return out


def _reciprocal_rank(keys: list[tuple], target: int) -> float:
    above = sum(1 for i, k in enumerate(keys) if i != target and k > keys[target])
    ties = sum(1 for i, k in enumerate(keys) if i != target and k == keys[target])
    return 1.0 / (1.0 + above + ties / 2.0)


def measure(path: Path) -> dict:
    data = load_dataset(path)
    _, test_start = data.chronological_split(0.15, 0.15)
    src, dst, ts = data.events.src.tolist(), data.events.dst.tolist(), data.events.t.tolist()
    pairs: dict[tuple[int, int], _Pair] = defaultdict(_Pair)
    partners: dict[int, set[int]] = defaultdict(set)
    last_event: dict[int, float] = {}
    rr: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"latest": [], "older": []})
    kinds = {"latest": 0, "older": 0, "first-time": 0}
    gaps = [[0, 0] for _ in GAP_BINS[:-1]]  # per bin: repeat events, of which the latest partner
    for i, (u, v, t) in enumerate(zip(src, dst, ts)):
        if i >= test_start:
            past = sorted(partners[u])
            if v in partners[u] and u != v:
                stats = [pairs[(min(u, p), max(u, p))] for p in past]
                newest = max(s.last for s in stats)
                target = past.index(v)
                kind = "latest" if stats[target].last == newest else "older"
                per_partner = [s.keys(t, s.last == newest) for s in stats]
                for name in per_partner[0]:
                    rr[name][kind].append(_reciprocal_rank([k[name] for k in per_partner], target))
                gap = t - last_event[u]
                b = next(j for j in range(len(GAP_BINS) - 1) if gap < GAP_BINS[j + 1])
                gaps[b][0] += 1
                gaps[b][1] += kind == "latest"
            else:
                kind = "first-time"
            kinds[kind] += 1
        pairs[(min(u, v), max(u, v))].add(t)
        partners[u].add(v)
        partners[v].add(u)
        last_event[u] = last_event[v] = t
    n_test = len(src) - test_start
    share = {k: c / n_test for k, c in kinds.items()}
    base = rr["recency"]
    base_older = sum(base["older"]) / max(1, len(base["older"]))
    orderings = {}
    for name, by_kind in rr.items():
        lat, old = by_kind["latest"], by_kind["older"]
        mrr_lat = sum(lat) / max(1, len(lat))
        mrr_old = sum(old) / max(1, len(old))
        gain = share["latest"] * (mrr_lat - 1.0) + share["older"] * (mrr_old - base_older)
        orderings[name] = {"latest_mrr": mrr_lat, "older_mrr": mrr_old, "test_mrr_change_vs_recency": gain}
    return {
        "test_events": n_test,
        "share": share,
        "orderings": orderings,
        # Perfect ordering of the older partners behind the latest one: each ranks 2nd.
        "latest_first_ceiling_gain_vs_recency": share["older"] * (0.5 - base_older),
        "latest_share_by_gap": [
            {
                "gap_s": [GAP_BINS[j], None if math.isinf(GAP_BINS[j + 1]) else GAP_BINS[j + 1]],
                "repeat_events": n,
                "latest_share": m / max(1, n),
            }
            for j, (n, m) in enumerate(gaps)
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="wikipedia,bitcoinotc", help="comma list of dataset names or paths")
    p.add_argument("--out", type=Path, default=RESULTS / "partner_ordering.json")
    args = p.parse_args()
    results = {}
    for name in args.datasets.split(","):
        r = results[name] = measure(dataset_path(name))
        s = r["share"]
        print(
            f"\n{name}: test events {r['test_events']}; latest partner {s['latest']:.3f}, "
            f"older partner {s['older']:.3f}, first-time pair {s['first-time']:.3f}"
        )
        print("| ordering of past partners | MRR, latest partner | MRR, older partner | test MRR change |")
        print("|---|---|---|---|")
        for o, m in r["orderings"].items():
            change = m["test_mrr_change_vs_recency"]
            print(f"| {o} | {m['latest_mrr']:.4f} | {m['older_mrr']:.4f} | {change:+.4f} |")
        print(
            "ceiling of any latest-first scorer on the older partners: test MRR "
            f"{r['latest_first_ceiling_gain_vs_recency']:+.4f}"
        )
        print("| time since the source's last event | repeat events | destination = latest partner |")
        print("|---|---|---|")
        for g in r["latest_share_by_gap"]:
            lo, hi = g["gap_s"]
            upper = "∞" if hi is None else f"{hi:g} s"
            print(f"| [{lo:g} s, {upper}) | {g['repeat_events']} | {g['latest_share']:.3f} |")
    write_results(args.out, {"benchmark": "partner_ordering", "datasets": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
