"""External node ids (strings) <-> dense indices, stored as tensors so checkpoints carry it."""

from __future__ import annotations

import torch

from tgnstream.core.buffers import ResizableBufferModule

__all__ = ["IdMap"]


class IdMap(ResizableBufferModule):
    """Append-only map from external string ids to dense indices ``0..n-1``.

    Buffers:
        blob: ``[total_bytes]`` uint8, UTF-8 ids back to back.
        offsets: ``[n + 1]`` int64, id ``i`` is ``blob[offsets[i]:offsets[i+1]]``.

    A Python dict mirrors the buffers for O(1) lookups; it is rebuilt after loading.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("blob", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("offsets", torch.zeros(1, dtype=torch.long))
        self._index: dict[str, int] = {}
        self._pending: list[bytes] = []

    def __len__(self) -> int:
        return len(self._index)

    def _apply(self, fn, recurse=True):
        # Ids are only needed on the host (request decoding); keep them off the accelerator.
        return self

    def lookup(self, ids: list[str], create: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense indices ``[n]`` int64 (``-1`` for unknown ids when ``create`` is False) and a
        ``[n]`` bool mask of ids that were not known before this call."""
        out = torch.empty(len(ids), dtype=torch.long)
        new = torch.zeros(len(ids), dtype=torch.bool)
        index = self._index
        for i, key in enumerate(ids):
            j = index.get(key)
            if j is None:
                new[i] = True
                if create:
                    j = len(index)
                    index[key] = j
                    self._pending.append(key.encode("utf-8"))
                else:
                    j = -1
            out[i] = j
        return out, new

    def name_of(self, index: int) -> str:
        self._flush()
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        return bytes(self.blob[a:b].tolist()).decode("utf-8")

    def names(self, indices: torch.Tensor) -> list[str]:
        return [self.name_of(int(i)) for i in indices.tolist()]

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        lengths = torch.tensor([len(p) for p in self._pending], dtype=torch.long)
        self.blob = torch.cat([self.blob, torch.frombuffer(bytearray(data), dtype=torch.uint8)])
        self.offsets = torch.cat([self.offsets, self.offsets[-1] + torch.cumsum(lengths, 0)])
        self._pending = []

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._flush()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pending = []
        raw = bytes(self.blob.tolist())
        offs = self.offsets.tolist()
        self._index = {raw[offs[i] : offs[i + 1]].decode("utf-8"): i for i in range(len(offs) - 1)}
