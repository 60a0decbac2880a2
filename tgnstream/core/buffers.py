"""Modules whose buffers change size at run time (growable capacity, variable-length tables)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ResizableBufferModule", "grown"]


def grown(current: torch.Tensor, rows: int, fill: float | int = 0) -> torch.Tensor:
    """``current`` with ``rows`` rows (at least its own): its rows first, ``fill`` after.

    A tensor in shared memory (the state reader processes map) grows into a new shared-memory
    block directly: one copy of the rows in use instead of a copy into private memory and
    another into shared memory; rows past them stay untouched zero pages (no memory is taken
    for them until they are written), so capacity ahead of need costs nothing."""
    extra = rows - current.shape[0]
    if extra <= 0:
        return current
    shape = (rows, *current.shape[1:])
    row_elements = math.prod(current.shape[1:])
    if current.device.type == "cpu" and current.is_shared() and row_elements > 0:
        nbytes = current.element_size() * row_elements * rows
        storage = torch.UntypedStorage._new_shared(nbytes)
        out = torch.empty(0, dtype=current.dtype).set_(storage, 0, shape, torch.empty(shape).stride())
        out[: current.shape[0]] = current
        if fill != 0:
            out[current.shape[0] :] = fill
        return out
    pad = torch.full((extra, *current.shape[1:]), fill, dtype=current.dtype, device=current.device)
    return torch.cat([current, pad])


class ResizableBufferModule(nn.Module):
    """An ``nn.Module`` whose ``load_state_dict`` adopts the saved buffers' shapes.

    The default loader copies into existing tensors and fails on a shape mismatch; state that
    grew after the module was built (more nodes, more pairs) must replace the buffers instead.
    """

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for name, current in list(self._buffers.items()):
            key = prefix + name
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            saved = state_dict[key]
            if current is not None and saved.dtype != current.dtype:
                error_msgs.append(f"{key}: dtype {saved.dtype} != expected {current.dtype}")
                continue
            device = current.device if current is not None else saved.device
            self._buffers[name] = saved.detach().to(device).clone()
        if strict:
            own = {prefix + n for n in self._buffers}
            for key in state_dict:
                if key.startswith(prefix) and "." not in key[len(prefix) :] and key not in own:
                    unexpected_keys.append(key)
