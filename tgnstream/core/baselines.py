"""Heuristic baselines over a dataset's chronological split, on the models' evaluation protocol:
the rows a model must beat (``tgnstream baseline``)."""

from __future__ import annotations

import logging
import time

import torch

from tgnstream.core.events import TemporalDataset
from tgnstream.core.heuristics import DEFAULT_BASELINES, HeuristicScorer
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream, inductive_mask, summarise

__all__ = ["evaluate_baselines"]

log = logging.getLogger(__name__)


def evaluate_baselines(
    data: TemporalDataset,
    settings: EvalSettings,
    specs: tuple[str, ...] = DEFAULT_BASELINES,
    histories: tuple[str, ...] = ("event", "batch"),
    val_frac: float = 0.15,
    test_frac: float = 0.15,
) -> dict:
    """Every heuristic of ``specs`` with every history granularity of ``histories``, evaluated on
    the validation span and then the test span (its history runs on through validation, as a
    model's memory does). The row keys read ``"<spec> [<history>]"``; ``best_by_val_mrr`` names
    the row with the best validation MRR (ties: the earlier row), and ``test`` repeats that
    row's test results, so the file reads like ``tgnstream train``'s ``results.json``.

    ``edgebank_tw``'s window is the test span's duration (EdgeBank's time-window setting).
    """
    val_start, test_start = data.chronological_split(val_frac, test_frac)
    n = len(data)
    t = data.events.t
    window = float(t[n - 1] - t[test_start])
    inductive = inductive_mask(data, val_start, test_start, n)
    rows = {}
    for history in histories:
        for spec in specs:
            t0 = time.perf_counter()
            scorer = HeuristicScorer(spec, data.num_nodes, window=window, history=history)
            scorer.observe_all(data.events.slice(0, val_start))
            val = summarise(evaluate_stream(scorer, data, val_start, test_start, settings))
            scores = evaluate_stream(scorer, data, test_start, n, settings)
            test = {"transductive": summarise(scores), "inductive": summarise(scores, inductive)}
            name = f"{spec} [{history}]"
            rows[name] = {"val": val, "test": test, "seconds": time.perf_counter() - t0}
            log.info(
                "%-40s val mrr %.4f | test ap %.4f mrr %.4f",
                name,
                val.get("mrr", float("nan")),
                test["transductive"]["ap"],
                test["transductive"].get("mrr", float("nan")),
            )
    best = max(rows, key=lambda k: rows[k]["val"].get("mrr", rows[k]["val"]["ap"]))
    return {
        "dataset": data.name,
        "featureless": data.edge_dim == 0,
        "num_events": n,
        "num_nodes": data.num_nodes,
        "split": {"train": val_start, "val": test_start - val_start, "test": n - test_start},
        "model": "heuristic baselines",
        "protocol": settings.describe(data),
        "edgebank_tw_window_s": window,
        "best_by_val_mrr": best,
        "best_val": rows[best]["val"],
        "test": rows[best]["test"],
        "baselines": rows,
        "device": str(torch.device("cpu")),
    }
