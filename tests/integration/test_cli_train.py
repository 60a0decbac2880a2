"""The `tgnstream train` command end to end on real data: outputs, metrics, error handling."""

from __future__ import annotations

import json

from tgnstream.apps.cli import main


def test_cli_train_writes_checkpoint_and_results(wikipedia_csv, tmp_path, capsys):
    rc = main(
        [
            "train",
            "--data",
            str(wikipedia_csv),
            "--out",
            str(tmp_path),
            "--limit",
            "3000",
            "--epochs",
            "2",
            "--batch-size",
            "200",
            "--pair-features",
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for split in ("transductive", "inductive"):
        for key in ("ap", "auc", "mrr", "hits@10"):
            assert 0.0 <= results["test"][split][key] <= 1.0
    assert results["train_events_per_s"] > 0 and results["seconds_per_epoch"] > 0
    assert results["featureless"] is True
    assert (tmp_path / "checkpoint.pt").stat().st_size > 0


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("u,i,ts,label\n1,2,0,0\n1,x,1,0\n")
    rc = main(["train", "--data", str(bad), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
