"""A short real-data training run must clearly learn."""

from __future__ import annotations

import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.loaders import load_dataset
from tgnstream.core.negatives import NegativeSampler
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream, summarise
from tgnstream.trainer.offline import train_epoch


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


def test_validation_can_rank_sampled_candidates_while_the_test_ranks_the_full_pool(wikipedia_csv, tmp_path):
    from tgnstream.trainer.config import OfflineTrainConfig
    from tgnstream.trainer.offline import train_offline

    data = load_dataset(wikipedia_csv, limit=3000)
    cfg = OfflineTrainConfig(
        data=wikipedia_csv,
        out=tmp_path,
        limit=3000,
        epochs=1,
        progress=False,
        pair_features=True,
        val_candidates=20,
    )
    model_cfg = ModelConfig.preset("tgn", width=16, pair_features=True)
    results = train_offline(data, cfg, model_cfg, torch.device("cpu")).results
    assert results["selection_metric"] == "mrr"
    assert results["validation_protocol"]["candidates"].startswith("20 sampled per positive")
    assert results["protocol"]["candidates"] == f"all {data.dst_nodes.numel()} destinations"
    # 20 candidates instead of every page: a positive's reciprocal rank is at least 1/21.
    assert results["best_val"]["mrr"] >= 1 / 21
