"""Reading the topic as batches in this process: what the trainer and a hot swap's catch-up use.

``LocalFetcher`` is the fetch side without a child process (the ingest loop's ``Prefetcher``
runs the same ``KafkaSource`` in one); ``BatchReader`` puts a fetcher and a ``BatchAssembler``
together and hands out closed batches. Both readers therefore cut the log the same way the
server's ingest does: same records, same offsets -> same batches, same rejections, same ids.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import torch

from tgnstream.stream.assemble import BatchAssembler, Known, RecordRejection, Register
from tgnstream.stream.batcher import ClosedBatch
from tgnstream.stream.config import StreamConfig
from tgnstream.stream.prefetch import FetchedBatch, package, take_resets
from tgnstream.stream.source import KafkaSource, LogReset

__all__ = ["BatchReader", "LocalFetcher"]

log = logging.getLogger(__name__)


class LocalFetcher:
    """``KafkaSource`` batches as ``FetchedBatch``es, in this process (the ``Prefetcher``'s
    interface: ``start``, ``get``, ``partitions``, ``highwater``, ``connected``, ``resets``,
    ``topic_id``, ``request_commit``, ``stop``)."""

    def __init__(self, config: StreamConfig, start_offsets: dict[int, int], topic_id: str | None = None):
        self._config = config
        self._start = dict(start_offsets)
        self._expected_topic_id = topic_id
        self._source: KafkaSource | None = None
        self.partitions: list[int] = []
        self.start_offsets: dict[int, int] = {}
        self.topic_id: str | None = topic_id
        self.highwater: dict[int, int | None] = {}
        self.connected = True
        self.resets: list[LogReset] = []

    def start(self) -> None:
        self._source = KafkaSource(self._config, self._start, self._expected_topic_id)
        self.partitions = list(self._source.partitions)
        self.start_offsets = dict(self._source.next_offsets)
        self.topic_id = self._source.topic_id
        self.resets.extend(take_resets(self._source))

    def get(self, timeout: float | None = None) -> FetchedBatch | None:
        """The next micro-batch, None when nothing arrived within the configured poll timeout
        (``timeout`` is accepted for the ``Prefetcher``'s interface)."""
        if self._source is None:
            raise RuntimeError("LocalFetcher.get before start()")
        batch = self._source.next_batch()
        fetched = package(self._source, batch) if batch is not None else None
        resets = fetched.resets if fetched is not None else take_resets(self._source)
        self.resets.extend(resets)
        self.connected = self._source.connected()
        self.topic_id = self._source.topic_id
        for p, hw in self._source.highwaters().items():
            if hw is not None or p not in self.highwater:
                self.highwater[p] = hw
        return fetched

    def request_commit(self, offsets: dict[int, int]) -> None:
        if self._source is not None:
            self._source.commit(offsets)

    def stop(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None


class BatchReader:
    """Closed batches of the topic from given offsets, assembled on the shared path.

    Args:
        config: the stream settings; batch boundaries count from ``start_offsets``, so a reader
            that must reproduce another's batches starts at one of its batch boundaries.
        start_offsets: per partition, the first offset to read (a state's ``next_offsets``).
        edge_dim, watermark, register: the engine the batches are for (``register`` creates dense
            ids in that engine's id map).
        fetcher: defaults to a ``LocalFetcher``.
        on_reject: called for every rejected record (default: counted in ``rejected`` only).
    """

    def __init__(
        self,
        config: StreamConfig,
        start_offsets: dict[int, int],
        edge_dim: int,
        watermark: float,
        register: Register,
        device: torch.device | str = "cpu",
        topic_id: str | None = None,
        fetcher: LocalFetcher | None = None,
        on_reject: Callable[[RecordRejection], None] | None = None,
        known: Known | None = None,
    ):
        self.fetcher = fetcher if fetcher is not None else LocalFetcher(config, start_offsets, topic_id)
        self.assembler = BatchAssembler(config, edge_dim, watermark, device)
        self.register = register
        self.known = known  # the id map's lookup, for stream.max_nodes
        self.rejected: Counter[str] = Counter()  # by reason
        self._on_reject = on_reject
        self._closed_watermark = float(watermark)  # the running watermark after the last close
        self._held: FetchedBatch | None = None  # fetched records beyond a poll's ``until``
        self.fetcher.start()
        #: Per partition, the next offset after the last closed batch handed out.
        self.next_offsets: dict[int, int] = dict(self.fetcher.start_offsets)

    def _reject(self, rejection: RecordRejection) -> None:
        self.rejected[rejection.reason] += 1
        if self._on_reject is not None:
            self._on_reject(rejection)

    def poll(self, until: dict[int, int] | None = None) -> list[ClosedBatch]:
        """The batches that closed during one fetch (often none: an open batch fills over several
        fetches, and an idle poll returns nothing). A log reset (policy ``reset``) discards the
        open batch, as in the ingest loop.

        ``until``: per partition, read no record at or after this offset now (a catch-up that
        must stop exactly at another reader's position); records fetched beyond it are held and
        read by a later poll, so nothing is skipped."""
        held = self._held is not None
        if held:
            fetched, self._held = self._held, None
        else:
            fetched = self.fetcher.get()
        if self.fetcher.resets:
            resets, self.fetcher.resets = self.fetcher.resets, []
            if self.assembler.open.records:
                log.warning("log gap: the open batch (%d records) is discarded", self.assembler.open.records)
            self.assembler.discard(self._closed_watermark)
            for r in resets:
                self.next_offsets[r.partition] = r.new
            if held:  # records of the old log
                fetched = None
        if fetched is None:
            return []
        if until:
            fetched, self._held = fetched.split_at(until)
            if fetched.num_records == 0:
                return []
        out: list[ClosedBatch] = []

        def closed(batch: ClosedBatch) -> None:
            out.append(batch)
            self._closed_watermark = self.assembler.watermark

        self.assembler.feed(fetched, self.register, on_close=closed, on_reject=self._reject, known=self.known)
        for b in out:
            self.next_offsets.update(b.next_offsets)
        return out

    def lag(self) -> int:
        """Records between the last closed batch and the log ends last seen (0 when unknown)."""
        return sum(
            max(0, hw - self.next_offsets.get(p, 0))
            for p, hw in self.fetcher.highwater.items()
            if hw is not None
        )

    def close(self) -> None:
        self.fetcher.stop()
