"""Modules whose buffers change size at run time (growable capacity, variable-length tables)."""

from __future__ import annotations

from torch import nn

__all__ = ["ResizableBufferModule"]


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
