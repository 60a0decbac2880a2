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
        ``[n]`` bool mask of ids that were not known before this call.

        Not thread-safe with ``create=True``: the single writer calls it under its lock.
        """
        index = self._index
        found = [index.get(key, -1) for key in ids]
        new = [j < 0 for j in found]
        if create and any(new):
            pending = self._pending
            for i, key in enumerate(ids):
                if found[i] < 0:
                    j = index.get(key)
                    if j is None:
                        j = len(index)
                        index[key] = j
                        pending.append(key.encode("utf-8"))
                    found[i] = j
        return torch.tensor(found, dtype=torch.long), torch.tensor(new, dtype=torch.bool)

    def names(self, indices: torch.Tensor | list[int]) -> list[str]:
        """External ids of dense ``indices``. Never mutates the map, so readers may call it while
        the single writer registers ids: the pending list is read before the buffers, and a
        concurrent flush only ever makes the buffers cover more of it."""
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        pending = self._pending
        offs = self.offsets.numpy()
        raw = self.blob.numpy()
        flushed = offs.shape[0] - 1
        out = []
        for i in indices:
            if i < flushed:
                out.append(raw[offs[i] : offs[i + 1]].tobytes().decode("utf-8"))
            else:
                out.append(pending[i - flushed].decode("utf-8"))
        return out

    def reset(self) -> None:
        """Forget every id."""
        self.blob = torch.zeros(0, dtype=torch.uint8)
        self.offsets = torch.zeros(1, dtype=torch.long)
        self._index = {}
        self._pending = []

    def flush(self) -> None:
        """Move ids added since the last flush into the tensor buffers (the writer calls this
        under its lock, so concurrent readers never mutate the map)."""
        self._flush()

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
