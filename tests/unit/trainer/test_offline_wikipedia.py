"""Short real-data training runs: the model must learn, and the CLI must produce its outputs."""

from __future__ import annotations

import json

import torch
from tgnstream.trainer.offline import train_epoch

from tgnstream.cli import main
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.loaders import load_dataset
from tgnstream.core.negatives import NegativeSampler
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream, summarise


def test_one_short_epoch_beats_chance_clearly(wikipedia_csv):
    torch.manual_seed(0)
    data = load_dataset(wikipedia_csv, limit=20_000)
    val_start, _ = data.chronological_split(0.15, 0.15)
    engine = MemoryEngine(ModelConfig(), capacity=data.num_nodes)
    opt = torch.optim.Adam(engine.model.parameters(), lr=1e-3)  # a short epoch: few steps, so a livelier lr
    loss = train_epoch(engine, data, val_start, opt, NegativeSampler(data.dst_nodes, seed=0), 100)
    assert loss < 1.2  # 2 * ln 2 = 1.386 is chance level
    scores = evaluate_stream(engine, data, val_start, len(data), EvalSettings(rank=False))
    ap = summarise(scores)["ap"]
    assert ap >= 0.75, f"AP {ap:.3f} after one short epoch"


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
