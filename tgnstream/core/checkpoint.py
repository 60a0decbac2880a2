"""One-file checkpoints: model spec (and the preset it was built from), weights and the full node
state (plus caller metadata)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from tgnstream.core.engine import MemoryEngine
from tgnstream.core.spec import ModelSpec, build_engine, preset_of

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_spec",
    "restore_optimizer",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = 1

# Fields added to ModelSpec (ModelConfig) after format 1 shipped, with the behaviour older checkpoints were
# trained with (their defaults today differ): absent from a saved config means "as before".
_BEFORE_FIELD_EXISTED = {"time_encoding": "learned", "fold_once": False}


def save_checkpoint(
    path: str | Path,
    engine: MemoryEngine,
    meta: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    preset: str | None = None,
) -> Path:
    """Write atomically (temp file, fsync, rename): a reader never sees a partial checkpoint.

    The engine's state dict holds weights and all node state (memory, mailbox, neighbours, pair
    history, id map, PRES statistics). ``meta`` is free-form JSON-like data stored alongside
    (e.g. Kafka offsets, metrics, the optimizer step count); ``optimizer_state`` (an
    ``optimizer.state_dict()``) lets training continue where it stopped. ``model_config`` is
    the engine's :class:`~tgnstream.core.spec.ModelSpec`; ``preset`` the name of the preset it
    was built from (overrides aside; :func:`checkpoint_spec` reads both back).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": engine.config.model_dump(),  # the ModelSpec
        "preset": preset if preset is not None else preset_of(engine.config),
        "capacity": engine.capacity,
        "engine": {k: v.detach().cpu() for k, v in engine.state_dict().items()},
        "meta": meta or {},
        "optimizer": optimizer_state,
    }
    # Serialised in memory first: a failing write (disk full, quota) then raises the OSError
    # that says so, instead of torch's opaque "unexpected pos" from inside its zip writer.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _read(path: str | Path) -> dict:
    payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {payload.get('format')!r}")
    return payload


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[MemoryEngine, dict]:
    """Rebuild the engine exactly as saved; returns ``(engine, meta)``."""
    payload = _read(path)
    engine = build_engine(_spec(payload), device, payload["capacity"])
    engine.load_state_dict(payload["engine"])
    engine.to(device)
    return engine, payload["meta"]


def _spec(payload: dict) -> ModelSpec:
    return ModelSpec(**{**_BEFORE_FIELD_EXISTED, **payload["model_config"]})


def checkpoint_spec(path: str | Path) -> tuple[ModelSpec, str | None]:
    """The model spec a checkpoint was saved with and the name of its preset: as recorded, or
    for a checkpoint written before presets were recorded, the preset its spec equals (None
    when it equals none)."""
    payload = _read(path)
    spec = _spec(payload)
    return spec, payload["preset"] if "preset" in payload else preset_of(spec)


def restore_optimizer(path: str | Path, optimizer: torch.optim.Optimizer) -> bool:
    """Load the optimizer state saved with the checkpoint into ``optimizer`` (built over the
    parameters of the engine ``load_checkpoint`` returned); False when none was saved."""
    state = _read(path).get("optimizer")
    if state is None:
        return False
    optimizer.load_state_dict(state)
    return True
