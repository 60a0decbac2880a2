"""Could knowing *when a source switches* beat recency over the whole candidate pool?

``recency>global_recency`` always ranks the source's latest partner first. Every gain over it must
come from the test events that go elsewhere (an older partner or a first-time pair), and a
scorer can win those only by ranking something above the latest partner, which costs half of
each event that does go to it. This script measures, on the evaluation's protocol (per-event
history, unordered pairs, the full candidate pool of ``stream_eval.candidate_pool``, ties
counting half), three rankers that score a candidate as ``P(kind | source) * P(candidate | kind)``
with the kinds "latest partner", "older partner" and "never met":

- ``recency>global_recency``: the heuristic itself (a check against ``benchmarks/quality.py``);
- ``switch-aware``: ``P(kind | source)`` from the source's own history of kinds, smoothed towards
  the stream-wide rates for the time since the source's last event (gap buckets);
  ``P(older partner | older)`` from the stream-wide distribution of its recency rank;
  ``P(candidate | never met)`` from each candidate's popularity decayed over one hour. Every
  rate is counted online from earlier events only (no split is fitted);
- ``switch-aware, learned``: the same, with ``P(kind | source)`` from a multinomial logistic
  regression fitted on the events before the test split (training and validation), on what the
  source's last ``RECENT`` events say: time since the last one, how many of them in a row went to
  the latest partner, how many distinct partners and switches they hold, how many partners the
  source has in all. It predicts a switch well (see the printed AUC); the question is whether
  that helps the ranking;
- ``kind oracle``: the same, with the event's true kind given: what a perfect switch predictor
  would add with these within-kind orderings (a ceiling, not a scorer).

    python benchmarks/switch_ranking.py [--datasets wikipedia,bitcoinotc]

Writes ``benchmarks/results/switch_ranking.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import torch
from _harness import RESULTS, dataset_path, write_results

from tgnstream.core.evaluation import reciprocal_ranks, roc_auc
from tgnstream.core.loaders import load_dataset
from tgnstream.core.stream_eval import candidate_pool

KINDS = ("latest", "older", "first-time")
#: Upper edges of the bins of the time since the source's last event (seconds); one more bin
#: holds sources never active before.
GAP_BINS = np.array([60, 600, 3600, 6 * 3600, 86400, 7 * 86400, math.inf])
#: Weight (in events) of the stream-wide prior against a source's own history of kinds.
PRIOR_WEIGHT = 5.0
#: Time scale of the decayed popularity that ranks never-met candidates (seconds).
POPULARITY_SCALE = 3600.0
#: A source's last events that the learned switch predictor reads (the neighbour table's K).
RECENT = 10


def _reciprocal_rank(score: np.ndarray, target: int) -> float:
    """Rank of candidate ``target`` among the pool by ``score`` (``[J]``, or ``[J, K]`` keys compared
    lexicographically), through the evaluation's own ``reciprocal_ranks`` (ties count half)."""
    s = torch.from_numpy(score)
    others = torch.ones(1, s.shape[0], dtype=torch.bool)
    others[0, target] = False
    return float(reciprocal_ranks(s[target : target + 1], s.unsqueeze(0), others)[0])


class _Stream:
    """Causal per-event state: pair recency, every node's partners, candidates' activity."""

    def __init__(self, pool: np.ndarray, num_nodes: int) -> None:
        self.pos = np.full(num_nodes, -1)
        self.pos[pool] = np.arange(pool.size)
        self.partners: dict[int, dict[int, float]] = defaultdict(dict)  # node -> partner -> last t
        self.last_event: dict[int, float] = {}
        self.global_last = np.full(pool.size, -np.inf)
        self.popularity = np.zeros(pool.size)
        self.popularity_t = np.zeros(pool.size)
        self.recent: dict[int, deque[int]] = defaultdict(lambda: deque(maxlen=RECENT))

    def switch_features(self, u: int, t: float) -> list[float]:
        """What the source's last ``RECENT`` events say about a switch (``u`` active before)."""
        recent = list(self.recent[u])[::-1]  # newest first
        streak = next((k for k, p in enumerate(recent) if p != recent[0]), len(recent))
        switches = sum(a != b for a, b in zip(recent, recent[1:]))
        return [
            math.log1p(t - self.last_event[u]),
            streak,
            len(set(recent)),
            switches / max(1, len(recent) - 1),
            len(recent),
            math.log1p(len(self.partners[u])),
        ]

    def popularity_at(self, t: float) -> np.ndarray:
        return self.popularity * np.exp(-(t - self.popularity_t) / POPULARITY_SCALE)

    def add(self, u: int, v: int, t: float) -> None:
        self.partners[u][v] = t
        self.partners[v][u] = t
        self.last_event[u] = self.last_event[v] = t
        self.recent[u].append(v)
        self.recent[v].append(u)
        for node in {u, v}:
            p = self.pos[node]
            if p >= 0:
                self.global_last[p] = t
                decay = math.exp(-(t - self.popularity_t[p]) / POPULARITY_SCALE)
                self.popularity[p] = self.popularity[p] * decay + 1.0
                self.popularity_t[p] = t


class _KindRegression:
    """Multinomial logistic regression ``features [F] -> P(kind) [3]`` (standardised features and
    their squares), fitted by full-batch gradient descent."""

    def __init__(self, x: np.ndarray, kinds: np.ndarray, steps: int = 2000, lr: float = 0.5) -> None:
        self.mean, self.std = x.mean(0), x.std(0) + 1e-9
        z = self._expand(x)
        self.w, self.b = np.zeros((z.shape[1], 3)), np.zeros(3)
        onehot = np.eye(3)[kinds]
        for _ in range(steps):
            grad = self._softmax(z @ self.w + self.b) - onehot
            self.w -= lr * z.T @ grad / len(kinds)
            self.b -= lr * grad.mean(0)

    def _expand(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.std
        return np.concatenate([z, z**2], -1)

    @staticmethod
    def _softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._softmax(self._expand(x) @ self.w + self.b)


class _KindRates:
    """Online counts of kinds: per source, per gap bucket, and of older partners' recency ranks."""

    def __init__(self) -> None:
        self.per_source: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(3))
        self.per_gap = np.ones((GAP_BINS.size + 1, 3))
        self.older_rank = np.ones(16)  # rank 1 = the newest older partner; grows as needed

    def probabilities(self, u: int, gap_bin: int) -> np.ndarray:
        prior = self.per_gap[gap_bin] / self.per_gap[gap_bin].sum()
        own = self.per_source[u]
        return (own + PRIOR_WEIGHT * prior) / (own.sum() + PRIOR_WEIGHT)

    def _cover(self, n: int) -> None:
        if n > self.older_rank.size:
            self.older_rank = np.concatenate([self.older_rank, np.ones(n - self.older_rank.size)])

    def older_rank_probabilities(self, n: int) -> np.ndarray:
        self._cover(n)
        h = self.older_rank[:n]
        return h / h.sum()

    def add(self, u: int, gap_bin: int, kind: int, older_rank: int | None) -> None:
        self.per_source[u][kind] += 1
        self.per_gap[gap_bin, kind] += 1
        if older_rank is not None:
            self._cover(older_rank)
            self.older_rank[older_rank - 1] += 1


def measure(path: Path) -> dict:
    data = load_dataset(path)
    _, test_start = data.chronological_split(0.15, 0.15)
    pool = candidate_pool(data).numpy()
    src, dst, ts = data.events.src.tolist(), data.events.dst.tolist(), data.events.t.tolist()
    stream, rates = _Stream(pool, data.num_nodes), _KindRates()
    rankers = ("recency>global_recency", "switch-aware", "switch-aware, learned", "kind oracle")
    rr: dict[str, dict[str, list[float]]] = {r: {k: [] for k in KINDS} for r in rankers}
    fit_x: list[list[float]] = []
    fit_kind: list[int] = []
    regression: _KindRegression | None = None
    test_switch: list[tuple[float, bool]] = []  # (predicted P(switch), switched)
    for i, (u, v, t) in enumerate(zip(src, dst, ts)):
        past = stream.partners[u]
        newest = max(past.values(), default=-math.inf)
        older = sorted((p for p in past if past[p] < newest), key=past.get, reverse=True)
        if v in past and u != v:
            kind = 0 if past[v] == newest else 1
        else:
            kind = 2
        if u in stream.last_event:
            gap_bin = int(np.searchsorted(GAP_BINS, t - stream.last_event[u], side="right"))
        else:
            gap_bin = GAP_BINS.size
        target = stream.pos[v]
        if past and i < test_start:
            fit_x.append(stream.switch_features(u, t))
            fit_kind.append(kind)
        if i == test_start:
            regression = _KindRegression(np.array(fit_x), np.array(fit_kind))
        if i >= test_start and target >= 0:
            partner_pos = np.array([stream.pos[p] for p in past], dtype=np.int64)
            partner_t = np.array([past[p] for p in past])
            ok = partner_pos >= 0
            pair_last = np.full(pool.size, -np.inf)
            pair_last[partner_pos[ok]] = partner_t[ok]
            name = KINDS[kind]
            rr["recency>global_recency"][name].append(
                _reciprocal_rank(np.stack([pair_last, stream.global_last], -1), target)
            )
            # P(candidate | kind) for every kind, then mixed by P(kind | source).
            within = np.zeros((3, pool.size))
            met = np.isfinite(pair_last)
            latest = met & (pair_last == newest)
            within[0, latest] = 1.0 / max(1, int(latest.sum()))
            older_pos = [stream.pos[p] for p in older if stream.pos[p] >= 0]
            if older_pos:
                within[1, older_pos] = rates.older_rank_probabilities(len(older_pos))
            pop = stream.popularity_at(t) + 1e-3
            pop[met] = 0.0
            within[2] = pop / pop.sum()
            p_kind = rates.probabilities(u, gap_bin) if past else np.array([0.0, 0.0, 1.0])
            rr["switch-aware"][name].append(_reciprocal_rank(p_kind @ within, target))
            if past:
                p_kind = regression(np.array(stream.switch_features(u, t)))
                test_switch.append((1.0 - p_kind[0], kind != 0))
            rr["switch-aware, learned"][name].append(_reciprocal_rank(p_kind @ within, target))
            oracle = np.eye(3)[kind]
            rr["kind oracle"][name].append(_reciprocal_rank(oracle @ within, target))
        if past:
            rank = older.index(v) + 1 if kind == 1 else None
            rates.add(u, gap_bin, kind, rank)
        stream.add(u, v, t)
    n_test = sum(len(x) for x in rr["recency>global_recency"].values())
    share = {k: len(rr["recency>global_recency"][k]) / n_test for k in KINDS}
    switch = np.array(test_switch)
    out = {}
    for r, by_kind in rr.items():
        out[r] = {
            "test_mrr": sum(sum(x) for x in by_kind.values()) / n_test,
            **{f"{k}_mrr": (sum(x) / len(x) if x else None) for k, x in by_kind.items()},
        }
    return {
        "test_events": n_test,
        "candidates": int(pool.size),
        "share": share,
        "rankers": out,
        "learned_switch_auc": roc_auc(torch.from_numpy(switch[:, 0]), torch.from_numpy(switch[:, 1] > 0)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="wikipedia,bitcoinotc", help="comma list of dataset names or paths")
    p.add_argument("--out", type=Path, default=RESULTS / "switch_ranking.json")
    args = p.parse_args()
    results = {}
    for name in args.datasets.split(","):
        r = results[name] = measure(dataset_path(name))
        s = r["share"]
        print(
            f"\n{name}: {r['test_events']} test events against {r['candidates']} candidates; "
            f"latest partner {s['latest']:.3f}, older partner {s['older']:.3f}, "
            f"first-time pair {s['first-time']:.3f}"
        )
        print("| ranker | test MRR | latest partner | older partner | first-time pair |")
        print("|---|---|---|---|---|")
        for ranker, m in r["rankers"].items():
            cells = " | ".join(f"{m[f'{k}_mrr']:.4f}" for k in KINDS)
            print(f"| {ranker} | {m['test_mrr']:.4f} | {cells} |")
        auc = r["learned_switch_auc"]
        print(f"learned switch predictor: test AUC {auc:.3f} (switch = not the latest partner)")
    out = {
        "benchmark": "switch_ranking",
        "prior_weight": PRIOR_WEIGHT,
        "popularity_scale_s": POPULARITY_SCALE,
        "recent_events": RECENT,
        "datasets": results,
    }
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
