"""Offline training and evaluation on a recorded stream (docs/architecture.md §6 offline, §8 protocol)."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tgnstream.core.checkpoint import save_checkpoint
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import TemporalDataset
from tgnstream.core.negatives import NegativeSampler
from tgnstream.core.step import GatheredBatch, ScoredBatch, TemporalStep
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream, inductive_mask, summarise
from tgnstream.runtime.sysinfo import hardware_info
from tgnstream.trainer.config import OfflineTrainConfig
from tgnstream.trainer.pipeline import EpochBatches, PipelinedBatches, SequentialBatches, StalenessStats

__all__ = [
    "train_epoch",
    "run_epoch",
    "make_batches",
    "train_offline",
    "make_optimizer",
    "register_dataset_ids",
    "OfflineResult",
]

log = logging.getLogger(__name__)


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """Adam, fused when this torch build supports it for the device (one kernel per step)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def make_batches(
    step: TemporalStep,
    data: TemporalDataset,
    stop: int,
    batch_size: int,
    sampler: NegativeSampler,
    historical_ratio: float = 0.0,
    pipeline_depth: int | None = None,
    mitigation: float | None = 0.9,
    eager_fetch: bool = False,
    negatives: int = 1,
) -> SequentialBatches | PipelinedBatches:
    """An epoch's batches over events ``[0, stop)``: inline (``pipeline_depth=None``) or from a
    producer thread whose memory reads miss at most ``pipeline_depth`` write-backs; ``negatives``
    destinations sampled per event."""
    if pipeline_depth is None:
        return SequentialBatches(step, data, stop, batch_size, sampler, historical_ratio, negatives)
    return PipelinedBatches(
        step,
        data,
        stop,
        batch_size,
        sampler,
        historical_ratio,
        pipeline_depth,
        mitigation,
        eager_fetch,
        negatives=negatives,
    )


def run_epoch(
    step: TemporalStep,
    batches: EpochBatches,
    optimizer: torch.optim.Optimizer,
    progress: bool = False,
    desc: str = "train",
    reset: bool = True,
    forward: Callable[[GatheredBatch], tuple[ScoredBatch, torch.Tensor]] | None = None,
) -> float:
    """Train on every batch of ``batches`` from an empty state (``reset``; else from the
    engine's state as it is); returns the mean loss (over the events this process scored).
    The one epoch loop: single-process (sequential or pipelined batches) and data-parallel
    training (``trainer.distributed``: sharded batches, ``forward`` through DDP) run it.

    Per batch, the shared step (``tgnstream.core.step``): score -> loss -> apply -> backward +
    optimizer step. Applying before ``backward`` is safe: the persisted state is detached and
    the graph holds its own copies of what it read; it also lets a pipeline fetch the next
    batch's memory, already written back, while this one runs backward. ``forward``: gathered
    batch -> (scored, loss); default the step's ``score`` then ``loss``.
    """
    engine = step.engine
    if reset:
        engine.reset_state()
    engine.train()
    total, n = 0.0, 0
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch")
    for k, gathered in enumerate(bar):
        if forward is None:
            scored = step.score(gathered)
            loss = step.loss(scored)
        else:
            scored, loss = forward(gathered)
        batches.apply(scored)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(scored.pos)
        n += len(scored.pos)
        if progress and k % 50 == 0:
            bar.set_postfix(loss=f"{total / n:.4f}")
    return total / max(n, 1)


def train_epoch(
    engine: MemoryEngine,
    data: TemporalDataset,
    stop: int,
    optimizer: torch.optim.Optimizer,
    sampler: NegativeSampler,
    batch_size: int,
    historical_ratio: float = 0.0,
    progress: bool = False,
    desc: str = "train",
    coherence_weight: float = 0.1,
    pipeline_depth: int | None = None,
) -> float:
    """One pass over events ``[0, stop)`` from an empty state; returns the mean loss (see
    ``run_epoch``; ``pipeline_depth`` as in ``make_batches``)."""
    step = TemporalStep(engine, coherence_weight)
    batches = make_batches(step, data, stop, batch_size, sampler, historical_ratio, pipeline_depth)
    return run_epoch(step, batches, optimizer, progress, desc)


@dataclass
class OfflineResult:
    """What a run produced: ``results`` (results.json), the engine with the best epoch's weights
    and the state after the whole stream, per-epoch ``history`` and the optimizer state of the
    best epoch (with ``results["optimizer_steps"]``, what continuing to train needs)."""

    results: dict
    engine: MemoryEngine
    history: list[dict] = field(default_factory=list)
    optimizer_state: dict | None = None


def register_dataset_ids(engine: MemoryEngine, data: TemporalDataset) -> None:
    """Give the engine's id map the dataset's external ids, dense id ``i`` -> ``raw_ids[i]``, so
    a server that keeps the trained state resolves names to the nodes they were trained as
    (ingest registers the same names in the same order: first appearance, src before dst)."""
    names = data.raw_ids if data.raw_ids is not None else [str(i) for i in range(data.num_nodes)]
    if len(engine.ids):
        known, _ = engine.ids.lookup(names, create=False)
        if not torch.equal(known, torch.arange(len(names))):
            raise ValueError("the engine's id map disagrees with the dataset's ids")
        return
    dense, _ = engine.ids.lookup(names, create=True)
    engine.ids.flush()
    if not torch.equal(dense, torch.arange(len(names))):
        raise ValueError("dataset ids are not distinct")


def train_offline(
    data: TemporalDataset, cfg: OfflineTrainConfig, model_cfg: ModelConfig, device: torch.device
) -> OfflineResult:
    """Chronological split, epochs with early stopping on validation, test of the best model.

    Memory runs on from training into validation and from validation into test. The best
    epoch's weights *and* its post-validation state are kept, so the test pass continues
    exactly where that epoch's validation ended.
    """
    torch.manual_seed(cfg.seed)
    val_start, test_start = data.chronological_split(cfg.val_frac, cfg.test_frac)
    engine = MemoryEngine(model_cfg, capacity=data.num_nodes, device=device)
    optimizer = make_optimizer(engine.model.parameters(), cfg.lr)
    pool = data.dst_nodes if data.bipartite else torch.arange(data.num_nodes)
    sampler = NegativeSampler(
        pool,
        seed=cfg.seed,
        device=device,
        recent_ratio=cfg.neg_recent_ratio,
        sampling_correction=cfg.sampling_correction,
    )
    metric = cfg.selection_metric
    val_settings = EvalSettings(batch_size=cfg.eval_batch_size, rank=(metric == "mrr"), progress=cfg.progress)
    if cfg.val_candidates is not None:
        val_settings = replace(val_settings, rank_all_max=0, sampled_negatives=cfg.val_candidates)

    step = TemporalStep(engine, cfg.pres_beta, cfg.ranking_weight)
    staleness = StalenessStats()
    optimizer_steps = 0

    best_score, best_epoch, best_snapshot, since_best = float("-inf"), -1, None, 0
    best_optimizer, best_steps = None, 0
    history, train_seconds, started = [], 0.0, time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        batches = make_batches(
            step,
            data,
            val_start,
            cfg.batch_size,
            sampler,
            cfg.historical_ratio,
            cfg.pipeline_depth,
            cfg.pipeline_mitigation,
            cfg.pipeline_eager_fetch,
            cfg.negatives,
        )
        loss = run_epoch(step, batches, optimizer, cfg.progress, desc=f"epoch {epoch}")
        secs = time.perf_counter() - t0
        optimizer_steps += len(batches)
        staleness.merge(batches.staleness)
        train_seconds += secs
        val = summarise(evaluate_stream(engine, data, val_start, test_start, val_settings))
        score = val[metric]
        improved = score > best_score
        row = {
            "epoch": epoch,
            "loss": loss,
            "train_seconds": secs,
            "train_events_per_s": val_start / secs,
            "wall_seconds": time.perf_counter() - started,
            **{f"val_{k}": v for k, v in val.items() if k != "n_events"},
        }
        history.append(row)
        log.info(
            "epoch %d | loss %.4f | %.1fs (%.0f ev/s) | val %s%s",
            epoch,
            loss,
            secs,
            val_start / secs,
            " ".join(f"{k} {v:.4f}" for k, v in val.items() if k != "n_events"),
            " *" if improved else "",
        )
        if improved:
            best_score, best_epoch, since_best = score, epoch, 0
            best_snapshot = {k: v.clone() for k, v in engine.state_dict().items()}
            best_optimizer = copy.deepcopy(optimizer.state_dict())
            best_steps = optimizer_steps
        else:
            since_best += 1
            if since_best >= cfg.patience:
                log.info("early stop: no val %s improvement for %d epochs", metric, cfg.patience)
                break

    engine.load_state_dict(best_snapshot)  # best weights + state after its validation pass
    optimizer.load_state_dict(best_optimizer)
    test_settings = EvalSettings(batch_size=cfg.eval_batch_size, rank=True, progress=cfg.progress)
    scores = evaluate_stream(engine, data, test_start, len(data), test_settings)
    register_dataset_ids(engine, data)
    inductive = inductive_mask(data, val_start, test_start, len(data))
    epochs_run = len(history)
    results = {
        "dataset": data.name,
        "featureless": data.edge_dim == 0,
        "num_events": len(data),
        "num_nodes": data.num_nodes,
        "split": {"train": val_start, "val": test_start - val_start, "test": len(data) - test_start},
        "model": model_cfg.model_dump(),
        "train_config": json.loads(cfg.model_dump_json()),
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "selection_metric": metric,
        "train_events_per_s": val_start * epochs_run / train_seconds,
        "seconds_per_epoch": train_seconds / epochs_run,
        "best_val": {k[4:]: v for k, v in history[best_epoch - 1].items() if k.startswith("val_")},
        "wall_seconds_to_best_val": history[best_epoch - 1]["wall_seconds"],
        "optimizer_steps": best_steps,
        "staleness": staleness.as_dict(),
        "protocol": test_settings.describe(data),
        "validation_protocol": val_settings.describe(data),
        "test": {"transductive": summarise(scores), "inductive": summarise(scores, inductive)},
        "hardware": hardware_info(device),
        "history": history,
    }
    return OfflineResult(results, engine, history, optimizer.state_dict())


def write_outputs(result: OfflineResult, out: Path) -> None:
    """``out/checkpoint.pt`` (best weights + state after the whole stream) and ``out/results.json``."""
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        out / "checkpoint.pt",
        result.engine,
        meta={"results": result.results, "optimizer_steps": result.results["optimizer_steps"]},
        optimizer_state=result.optimizer_state,
        preset=result.results["train_config"].get("preset"),
    )
    (out / "results.json").write_text(json.dumps(result.results, indent=2))
