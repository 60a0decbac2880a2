"""What the benchmarks that re-evaluate a trained checkpoint under another state setting share
(``state_precision``, ``retention``): their ``--run DATASET=CHECKPOINT`` command line, and the
replay of a dataset up to its test span followed by the training protocol's evaluation."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import TemporalDataset
from tgnstream.core.step import TemporalStep
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream, summarise
from tgnstream.trainer.config import OfflineTrainConfig

__all__ = ["checkpoint_runs_parser", "replay_then_evaluate", "test_start"]


def checkpoint_runs_parser(description: str, out: Path) -> argparse.ArgumentParser:
    """``--run DATASET=CHECKPOINT`` (repeatable), ``--batch-size``, ``--threads``, ``--out``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="DATASET=CHECKPOINT",
        help="dataset and its checkpoint",
    )
    p.add_argument("--batch-size", type=int, default=200, help="evaluation batch (the training protocol's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=out)
    return p


def test_start(data: TemporalDataset) -> int:
    """Index of the first test event under the training defaults' chronological split."""
    defaults = OfflineTrainConfig.model_fields
    return data.chronological_split(defaults["val_frac"].default, defaults["test_frac"].default)[1]


def replay_then_evaluate(
    engine: MemoryEngine, data: TemporalDataset, batch: int, desc: str, at_test_start=None
) -> tuple[dict[str, float], float]:
    """Apply ``data`` up to its test span to ``engine`` in batches of ``batch``, then evaluate the
    test span (``evaluate_stream``: AP against one uniform negative, MRR against every
    destination or the sampled candidates); the metrics and the seconds the replay took.
    ``at_test_start()``, if given, is called between the two (to look at the replayed state)."""
    test0 = test_start(data)
    started = time.perf_counter()
    with torch.no_grad():
        for i in tqdm(range(0, test0, batch), desc=f"{desc} history", leave=False):
            TemporalStep(engine).apply(data.events.slice(i, min(i + batch, test0)))
    replay_s = time.perf_counter() - started
    if at_test_start is not None:
        at_test_start()
    metrics = summarise(evaluate_stream(engine, data, test0, len(data), EvalSettings(batch_size=batch)))
    return {k: float(v) for k, v in metrics.items()}, replay_s
