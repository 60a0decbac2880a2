"""The `tgnstream baseline` command end to end on real data: the train-shaped results.json, the
protocol it records, rows identical to scoring through the library, and clear errors."""

from __future__ import annotations

import json

import pytest

from tgnstream.apps.cli import main
from tgnstream.core.heuristics import HeuristicScorer
from tgnstream.core.loaders import load_dataset
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream, summarise


def test_cli_baseline_writes_train_shaped_results(wikipedia_csv, tmp_path, capsys):
    rc = main(
        [
            "baseline",
            "--data",
            str(wikipedia_csv),
            "--out",
            str(tmp_path),
            "--limit",
            "4000",
            "--heuristics",
            "recency,recency>global_recency",
            "--no-progress",
        ]
    )
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["baselines"]) == {
        "recency [event]",
        "recency>global_recency [event]",
        "recency [batch]",
        "recency>global_recency [batch]",
    }
    for split in ("transductive", "inductive"):
        for key in ("ap", "auc", "mrr", "hits@10"):
            assert 0.0 <= results["test"][split][key] <= 1.0
    assert results["protocol"]["candidates"].startswith("all ")
    assert results["best_by_val_mrr"] in results["baselines"]
    assert "best by validation MRR" in capsys.readouterr().out

    # A row is what scoring the same heuristic through the library gives.
    data = load_dataset(wikipedia_csv, limit=4000)
    val_start, test_start = data.chronological_split(0.15, 0.15)
    scorer = HeuristicScorer("recency", data.num_nodes, history="event")
    scorer.observe_all(data.events.slice(0, val_start))
    evaluate_stream(scorer, data, val_start, test_start, EvalSettings())
    test = summarise(evaluate_stream(scorer, data, test_start, len(data), EvalSettings()))
    assert results["baselines"]["recency [event]"]["test"]["transductive"] == pytest.approx(test)


def test_cli_baseline_rejects_an_unknown_heuristic(wikipedia_csv, tmp_path, caplog):
    rc = main(
        ["baseline", "--data", str(wikipedia_csv), "--out", str(tmp_path), "--heuristics", "recency>luck"]
    )
    assert rc == 2
    assert "unknown heuristic" in caplog.text
    assert not (tmp_path / "results.json").exists()
