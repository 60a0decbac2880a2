"""The one definition of how the log becomes batches: fetched record chunks -> fixed-size,
time-ordered ``EventBatch``es plus rejections (with reasons).

Every consumer of the stream (the server's ingest loop, the trainer, a hot swap's catch-up) feeds
its fetched chunks through a ``BatchAssembler``, so the same records from the same offsets give
the same batches, the same rejections and the same dense ids. The decisions depend only on the
records, the settings (``StreamConfig``) and the state's watermark and id map:

1. decode the values (``RecordDecoder``: malformed records are rejected);
2. cut the chunk where the open batch fills (every ``batch_max_events`` records, valid or not,
   counted from where the reader's offsets started);
3. screen each piece's event times against the running watermark (``TimePolicy``);
4. with ``max_nodes``, reject (``node_limit``) each event that would add a node past the limit,
   in log order (an event between known nodes always passes);
5. register the surviving events' node ids in log order (source before destination);
6. when the open batch is full, close it: its events sorted by time (stable).

What the caller does with a closed batch (apply it to a live engine under a lock, train on it,
replay it) is the caller's business; closing happens synchronously inside ``feed``, before the
next piece's ids are registered, exactly as the ingest loop always applied them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tgnstream.stream.batcher import ClosedBatch, OpenBatchBuilder
from tgnstream.stream.config import StreamConfig
from tgnstream.stream.prefetch import FetchedBatch
from tgnstream.stream.records import RecordDecoder
from tgnstream.stream.source import SourceRecord
from tgnstream.stream.time_policy import TimePolicy

__all__ = ["BatchAssembler", "Known", "RecordRejection", "Register", "known_in"]

#: Dense ids for node names: ``names [2n]`` (src0, dst0, src1, ...) -> long tensor ``[2n]``,
#: creating ids for new names in the order given.
Register = Callable[[list[str]], torch.Tensor]
#: Which of ``names`` the state already holds (``[len(names)]`` bool) and how many ids it holds.
Known = Callable[[list[str]], tuple[np.ndarray, int]]


def known_in(ids_of: Callable[[], object]) -> Known:
    """A ``Known`` over the id map ``ids_of()`` returns now (an ``IdMap``: ``lookup(names,
    create=False)`` and ``len``); a callable, since a hot swap replaces the served engine's map."""

    def known(names: list[str]) -> tuple[np.ndarray, int]:
        ids = ids_of()
        dense, _ = ids.lookup(names, create=False)
        return (dense >= 0).numpy(), len(ids)

    return known


@dataclass(frozen=True)
class RecordRejection:
    """A record that does not become an event: ``reason`` (``records.REASONS`` or
    ``too_late`` / ``too_far_ahead`` / ``node_limit``) and a short human-readable ``detail``."""

    record: SourceRecord
    reason: str
    detail: str


class BatchAssembler:
    """Turns fetched chunks into closed batches and rejections (see the module docstring).

    Args:
        config: the stream settings (batch size, decoding limits, time bounds).
        edge_dim: edge feature width of the engine the batches are for.
        watermark: the state's watermark (its newest applied event time; -inf when empty):
            the running watermark of the time screening starts there.
        device: where closed batches' tensors go.
    """

    def __init__(
        self,
        config: StreamConfig,
        edge_dim: int,
        watermark: float,
        device: torch.device | str = "cpu",
        decoder: RecordDecoder | None = None,
    ):
        self.decoder = decoder if decoder is not None else RecordDecoder.from_config(config, edge_dim)
        self.time_policy = TimePolicy(
            config.max_lateness_s, config.max_future_s, config.max_ahead_of_record_time_s
        )
        self.open = OpenBatchBuilder(config.batch_max_events, edge_dim)
        self.device = torch.device(device)
        self.watermark = float(watermark)  # the newest time among the accepted events so far
        self.max_nodes = config.max_nodes

    def discard(self, watermark: float) -> None:
        """Forget the open batch (its records will be read again from the applied offsets) and
        restart the running watermark at the state's."""
        self.open.clear()
        self.watermark = float(watermark)

    def feed(
        self,
        fetched: FetchedBatch,
        register: Register,
        on_close: Callable[[ClosedBatch], None],
        on_reject: Callable[[RecordRejection], None],
        on_added: Callable[[int], None] | None = None,
        known: Known | None = None,
    ) -> None:
        """Assemble one fetched chunk. ``on_reject`` gets every record that does not become an
        event; ``on_added(k)`` runs after ``k > 0`` new events joined the open batch (the last
        ``k`` in log order); ``on_close`` gets each batch that fills, before any later record is
        looked at. ``known`` (needed with ``max_nodes``): which names the state holds."""
        if self.max_nodes is not None and known is None:
            raise ValueError("stream.max_nodes needs the state's id map (a 'known' lookup)")
        decoded = self.decoder.decode(fetched.values)
        for rej in decoded.rejected:
            on_reject(RecordRejection(fetched.record(rej.position), rej.reason, rej.detail))
        n, at = fetched.num_records, 0
        while at < n:
            end = at + min(self.open.room, n - at)
            lo, hi = (int(i) for i in np.searchsorted(decoded.positions, [at, end]))
            parts, offs = fetched.partitions[at:end], fetched.offsets[at:end]
            next_offsets = {int(p): int(offs[parts == p][-1]) + 1 for p in np.unique(parts)}
            positions = decoded.positions[lo:hi]
            ts = decoded.ts[lo:hi]
            keep, rejected = self.time_policy.screen(
                ts, fetched.timestamps_ms[positions] / 1000.0, self.watermark
            )
            for r in rejected:
                on_reject(RecordRejection(fetched.record(int(positions[r.index])), r.reason, r.detail))
            src = dst = torch.zeros(0, dtype=torch.long)
            if keep.size:
                rows = (keep + lo).tolist()
                names: list[str] = [""] * (2 * keep.size)
                names[0::2] = [decoded.src[i] for i in rows]
                names[1::2] = [decoded.dst[i] for i in rows]
                if self.max_nodes is not None:
                    allowed = self._within_node_limit(names, known)
                    if not allowed.all():
                        for r in np.flatnonzero(~allowed).tolist():
                            on_reject(
                                RecordRejection(
                                    fetched.record(int(positions[keep[r]])),
                                    "node_limit",
                                    f"the state holds its limit of {self.max_nodes} nodes (stream.max_nodes)",
                                )
                            )
                        keep = keep[allowed]
                        names = [n for i, n in enumerate(names) if allowed[i // 2]]
            if keep.size:
                self.watermark = max(self.watermark, float(ts[keep].max()))
                dense = register(names).view(-1, 2)
                src, dst = dense[:, 0].contiguous(), dense[:, 1].contiguous()
            self.open.add(
                end - at,
                next_offsets,
                src,
                dst,
                ts[keep],
                decoded.features[lo:hi][keep],
                fetched,
                positions[keep],
            )
            if keep.size and on_added is not None:
                on_added(int(keep.size))
            at = end
            if self.open.full:
                on_close(self.open.close(self.device))

    def _within_node_limit(self, names: list[str], known: Known) -> np.ndarray:
        """``[len(names) // 2]`` bool: whether each event (names in pairs, log order) may join
        without the state passing ``max_nodes``. An event that would add a node past the limit
        is refused and adds none; later events are judged with the nodes added so far."""
        found, held = known(names)
        room = self.max_nodes - held
        new = [n for n, f in zip(names, found.tolist()) if not f]
        allowed = np.ones(len(names) // 2, dtype=bool)
        if len(set(new)) <= room:
            return allowed
        added: set[str] = set()
        for i in range(len(allowed)):
            fresh = {
                n for n, f in ((names[2 * i], found[2 * i]), (names[2 * i + 1], found[2 * i + 1])) if not f
            }
            fresh -= added
            if len(added) + len(fresh) > room:
                allowed[i] = False
            else:
                added |= fresh
        return allowed
