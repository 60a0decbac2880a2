"""stream.max_nodes: events that would add a node past the limit are rejected (node_limit) in log
order, events between known nodes go on; the same log gives the same decisions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgnstream.apps.replay import encode_event
from tgnstream.core.idmap import IdMap
from tgnstream.stream.assemble import BatchAssembler, known_in
from tgnstream.stream.config import StreamConfig
from tgnstream.stream.prefetch import FetchedBatch


def _chunk(events: list[tuple[str, str, float]]) -> FetchedBatch:
    n = len(events)
    return FetchedBatch(
        [encode_event(s, d, t) for s, d, t in events], [None] * n, np.zeros(n, np.int32),
        np.arange(n, dtype=np.int64), np.zeros(n, np.int64), {0: n}, {0: n},
    )  # fmt: skip


def _assemble(events, max_nodes: int | None, batch: int = 4):
    ids = IdMap()
    asm = BatchAssembler(StreamConfig(batch_max_events=batch, max_nodes=max_nodes), 0, float("-inf"))
    closed, rejected = [], []

    def register(names):
        dense, _ = ids.lookup(names, create=True)
        ids.flush()
        return dense

    asm.feed(_chunk(events), register, closed.append, rejected.append, known=known_in(lambda: ids))
    applied = [
        (ids.names([s])[0], ids.names([d])[0])
        for b in closed
        for s, d in zip(b.events.src.tolist(), b.events.dst.tolist())
    ]
    return applied, [(r.record.offset, r.reason) for r in rejected], len(ids)


EVENTS = [
    ("a", "b", 1.0),  # a, b: 2 nodes
    ("a", "c", 2.0),  # c: 3
    ("d", "e", 3.0),  # d, e would make 5 > 4: rejected, neither is added
    ("b", "c", 4.0),  # known nodes: applied
    ("d", "a", 5.0),  # d: 4
    ("e", "a", 6.0),  # e would make 5: rejected
    ("c", "d", 7.0),  # known: applied
    ("a", "b", 8.0),
]


def test_events_past_the_node_limit_are_rejected_in_log_order():
    applied, rejected, nodes = _assemble(EVENTS, max_nodes=4)
    assert rejected == [(2, "node_limit"), (5, "node_limit")]
    assert applied == [("a", "b"), ("a", "c"), ("b", "c"), ("d", "a"), ("c", "d"), ("a", "b")]
    assert nodes == 4
    # The same log, the same decisions; no limit, nothing rejected.
    assert _assemble(EVENTS, max_nodes=4) == (applied, rejected, nodes)
    assert _assemble(EVENTS, max_nodes=None)[1] == []


def test_the_limit_needs_the_id_map():
    asm = BatchAssembler(StreamConfig(batch_max_events=4, max_nodes=3), 0, float("-inf"))
    with pytest.raises(ValueError, match="max_nodes"):
        asm.feed(_chunk(EVENTS[:1]), lambda names: torch.zeros(len(names), dtype=torch.long), print, print)
