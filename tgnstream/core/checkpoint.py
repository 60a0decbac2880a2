"""One-file checkpoints: model config, weights and the full node state (plus caller metadata)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1

# Fields added to ModelConfig after format 1 shipped, with the behaviour older checkpoints were
# trained with (their defaults today differ): absent from a saved config means "as before".
_BEFORE_FIELD_EXISTED = {"time_encoding": "learned", "fold_once": False}


def save_checkpoint(path: str | Path, engine: MemoryEngine, meta: dict[str, Any] | None = None) -> Path:
    """Write atomically (temp file, fsync, rename): a reader never sees a partial checkpoint.

    ``meta`` is free-form JSON-like data stored alongside (e.g. Kafka offsets, metrics).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": engine.config.model_dump(),
        "capacity": engine.capacity,
        "engine": {k: v.detach().cpu() for k, v in engine.state_dict().items()},
        "meta": meta or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[MemoryEngine, dict]:
    """Rebuild the engine exactly as saved; returns ``(engine, meta)``."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {payload.get('format')!r}")
    config = ModelConfig(**{**_BEFORE_FIELD_EXISTED, **payload["model_config"]})
    engine = MemoryEngine(config, payload["capacity"], device)
    engine.load_state_dict(payload["engine"])
    engine.to(device)
    return engine, payload["meta"]
