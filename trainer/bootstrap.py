"""A first published version from a recorded prefix of the stream: weights trained offline on
the prefix (the ``make train`` recipe), state = the prefix replayed exactly as a server applies
it, offsets = the prefix's end. Servers then start from it and the continual trainer continues
it: the demo and ``benchmarks/continual.py`` begin this way."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from tgnstream.core.checkpoint import load_checkpoint
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch, TemporalDataset
from tgnstream.core.step import TemporalStep
from tgnstream.runtime.models import ModelStore, PublishedModel
from tgnstream.trainer.config import OfflineTrainConfig
from tgnstream.trainer.offline import train_offline
from tgnstream.trainer.service import with_pres

__all__ = ["START_LR", "featureless", "publish_start_model", "replay_as_served", "train_on_prefix"]

log = logging.getLogger(__name__)


def featureless(data: TemporalDataset) -> TemporalDataset:
    """The stream as ``tgnstream replay`` sends it (no edge features). Dense ids are the order of
    first appearance (src before dst), which is how ingest and the trainer register names, so
    every engine on the live path uses the dataset's ids."""
    ev = data.events
    return replace(data, events=EventBatch(ev.src, ev.dst, ev.t, ev.feats[:, :0]))


#: Learning rate of the start model: the recommended recipe's (``OfflineTrainConfig``'s default).
START_LR = OfflineTrainConfig.model_fields["lr"].default


def train_on_prefix(
    data: TemporalDataset,
    stop: int,
    epochs: int,
    lr: float = START_LR,
    seed: int = 0,
    pres_gamma: float = 0.0,
) -> MemoryEngine:
    """Weights trained on events ``[0, stop)`` only (the ``recommended`` preset with the
    recommended recipe: ``OfflineTrainConfig``'s defaults, as ``make train``), PRES on (what the
    continual trainer fine-tunes)."""
    head = replace(data, events=data.events.slice(0, stop), labels=data.labels[:stop])
    cfg = OfflineTrainConfig(
        data=Path(data.name),
        out=Path("/nonexistent"),  # nothing is written
        epochs=epochs,
        lr=lr,
        seed=seed,
        progress=False,
        preset="recommended",
    )
    model_cfg = cfg.model_spec(edge_dim=data.edge_dim)
    return with_pres(train_offline(head, cfg, model_cfg, torch.device("cpu")).engine, True, pres_gamma)


def replay_as_served(
    engine: MemoryEngine, data: TemporalDataset, start: int, stop: int, batch: int
) -> MemoryEngine:
    """``engine`` with events ``[start, stop)`` applied as a server applies them (names
    registered in log order; batches of ``batch`` counted from ``start``; apply + fold)."""
    names, ev = data.raw_ids, data.events
    for i in range(start, stop, batch):
        j = min(i + batch, stop)
        keys = [names[x] for pair in zip(ev.src[i:j].tolist(), ev.dst[i:j].tolist()) for x in pair]
        dense, _ = engine.ids.lookup(keys, create=True)
        engine.ids.flush()
        b = EventBatch(dense[0::2].contiguous(), dense[1::2].contiguous(), ev.t[i:j], ev.feats[i:j])
        engine.ensure_capacity(int(dense.max()) + 1)
        step = TemporalStep(engine)
        step.commit_live(step.prepare_live(b))
    return engine


def publish_start_model(
    store: ModelStore,
    data: TemporalDataset,
    stop: int,
    batch: int,
    topic: str,
    epochs: int = 5,
    lr: float = START_LR,
    seed: int = 0,
    checkpoint: Path | None = None,
    pres_gamma: float = 0.0,
) -> PublishedModel:
    """Publish the first version: weights from ``checkpoint`` (with PRES turned on) or trained on
    ``[0, stop)``; state = that prefix replayed as served; offsets ``{0: stop}``."""
    if checkpoint is not None:
        engine, _ = load_checkpoint(checkpoint)
        engine = with_pres(engine, True, pres_gamma)
        what = f"checkpoint {checkpoint}"
    else:
        engine = train_on_prefix(data, stop, epochs, lr, seed, pres_gamma)
        what = f"{epochs} epochs on the first {stop} events"
    engine.reset_state()
    engine = replay_as_served(engine.eval(), data, 0, stop, batch)
    published = store.publish(
        engine, {0: stop}, topic, None, gate={"decision": "start model", "trained": what}
    )
    log.info("published the start model %s (%s)", published.version, what)
    return published
