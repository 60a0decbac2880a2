"""External node ids (strings) <-> dense indices, stored as tensors so checkpoints carry it."""

from __future__ import annotations

from itertools import repeat

import numpy as np
import torch

from tgnstream.core.buffers import ResizableBufferModule

__all__ = ["IdMap", "MAX_ID_BYTES"]

#: Longest external node id, in bytes of UTF-8, that any door accepts (Kafka records and gRPC
#: requests alike): ids are stored for good, so an unbounded id is unbounded memory.
MAX_ID_BYTES = 512


class IdMap(ResizableBufferModule):
    """Append-only map from external string ids to dense indices ``0..n-1``.

    Buffers:
        blob: ``[total_bytes]`` uint8, UTF-8 ids back to back.
        offsets: ``[n + 1]`` int64, id ``i`` is ``blob[offsets[i]:offsets[i+1]]``.

    A Python dict mirrors the buffers for O(1) lookups; it is rebuilt after loading. Both
    buffers are views of storage grown by doubling, so registering ids costs amortised O(new)
    rather than a copy of every id so far (state dicts hold compact copies).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("blob", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("offsets", torch.zeros(1, dtype=torch.long))
        self._blob_store, self._offsets_store = self.blob, self.offsets
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
        found = np.fromiter(map(index.get, ids, repeat(-1)), np.int64, len(ids))
        new = found < 0
        if create and new.any():
            pending = self._pending
            for i in np.flatnonzero(new).tolist():
                key = ids[i]
                j = index.get(key)
                if j is None:
                    j = len(index)
                    index[key] = j
                    pending.append(key.encode("utf-8"))
                found[i] = j
        return torch.from_numpy(found), torch.from_numpy(new)

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
        self._blob_store, self._offsets_store = self.blob, self.offsets
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
        ends = int(self.offsets[-1]) + np.cumsum(np.fromiter(map(len, self._pending), np.int64))
        self._blob_store = _append(self._blob_store, self.blob.numel(), np.frombuffer(data, np.uint8))
        self._offsets_store = _append(self._offsets_store, self.offsets.numel(), ends)
        # Readers (names) take offsets first: they then never index past the blob they see.
        self.blob = self._blob_store[: self.blob.numel() + len(data)]
        self.offsets = self._offsets_store[: self.offsets.numel() + ends.size]
        self._pending = []

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._flush()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("blob", "offsets"):  # a view would be saved with its whole storage
            destination[prefix + name] = destination[prefix + name].clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pending = []
        self._blob_store, self._offsets_store = self.blob, self.offsets
        raw = self.blob.numpy().tobytes()
        offs = self.offsets.tolist()
        self._index = {raw[offs[i] : offs[i + 1]].decode("utf-8"): i for i in range(len(offs) - 1)}


def _append(store: torch.Tensor, used: int, values: np.ndarray) -> torch.Tensor:
    """``store`` (of which ``used`` entries are live) with ``values`` written after them; a new,
    doubled tensor when it is full. Entries already live are never written."""
    need = used + values.size
    if need > store.numel():
        grown = torch.empty(max(need, 2 * store.numel()), dtype=store.dtype)
        grown[:used] = store[:used]
        store = grown
    store.numpy()[used:need] = values
    return store
