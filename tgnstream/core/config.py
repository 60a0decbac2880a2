"""``ModelConfig``: the engine's name for :class:`tgnstream.core.spec.ModelSpec` (one class; the
spec, its presets and the engine builder live in ``tgnstream.core.spec``)."""

from __future__ import annotations

from tgnstream.core.spec import ModelSpec

__all__ = ["ModelConfig"]

#: The model spec under the name the engine, the model and older code use.
ModelConfig = ModelSpec
