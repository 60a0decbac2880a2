"""Queries during ingest see whole states only: the writer (the real ingest loop, fed chunks of
random sizes) applies fixed-size batches and publishes the open batch, while reader threads
score; every reply must equal the offline answer for the prefix its stamp names (full batches
applied, the rest of the prefix as context), never a mix."""

from __future__ import annotations

import random
import threading

import numpy as np
import torch

from tgnstream.apps.replay import encode_event
from tgnstream.apps.testing import StubFetcher, feed_in_chunks, prefix_answer
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.ingest.config import IngestConfig
from tgnstream.ingest.loop import IngestLoop
from tgnstream.model_server import queries
from tgnstream.model_server.convert import ScoreQuery
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.metrics import ServerMetrics
from tgnstream.runtime.snapshots import SnapshotConfig
from tgnstream.stream.prefetch import FetchedBatch
from tgnstream.stream.records import RecordDecoder

BATCH, TOTAL = 50, 600
MODEL = ModelConfig.preset("tgn", width=8, pair_features=True, num_neighbors=4)


def _engine() -> MemoryEngine:
    torch.manual_seed(3)
    return MemoryEngine(MODEL, 16).eval()


def _stream():
    rng = random.Random(5)
    return [(f"u{rng.randrange(12)}", f"p{rng.randrange(9)}", float(i)) for i in range(TOTAL)]


def test_every_reply_matches_the_offline_answer_for_its_stamp():
    events = _stream()
    values = [encode_event(s, d, t) for s, d, t in events]
    live = LiveEngine(_engine(), "v", {})
    config = IngestConfig(batch_max_events=BATCH, quality={"enabled": False})
    loop = IngestLoop(
        config, live, StubFetcher(TOTAL), RecordDecoder(), None, None, SnapshotConfig(), ServerMetrics()
    )
    pairs = [("u1", "p2"), ("u3", "p3"), ("u5", "p1"), ("u0", "nobody")]
    t_query = float(TOTAL + 10)
    seen: dict[int, list[float]] = {}
    errors: list[BaseException] = []
    done = threading.Event()

    def reader():
        try:
            while not done.is_set():
                r = queries.score(live, ScoreQuery([p[0] for p in pairs], [p[1] for p in pairs], t_query))
                seen.setdefault(r.stamp.events_applied, r.probabilities.tolist())
                assert seen[r.stamp.events_applied] == r.probabilities.tolist(), "same stamp, other answer"
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for th in threads:
        th.start()
    feed_in_chunks(loop, values)
    done.set()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert len(seen) >= 5, f"the readers saw only {len(seen)} states"
    for n, probs in seen.items():
        assert probs == prefix_answer(_engine(), events, n, BATCH, pairs, t_query), (
            f"reply at {n} events is not that state's answer"
        )
    with live.read():
        assert live.stamp().events_applied == TOTAL and live.next_offsets == {0: TOTAL // BATCH * BATCH}


class _Letters:
    def __init__(self):
        self.sent = []

    def publish(self, **kw):
        self.sent.append((kw["offset"], kw["reason"]))

    def flush(self, timeout=None):
        pass


def test_events_that_would_write_non_finite_memory_are_dead_lettered_not_applied():
    """A damaged model (a NaN weight in the memory updater): every event of a closing batch is
    dead-lettered as non_finite_state with its own Kafka offset, and the memory stays finite."""
    engine = _engine()
    with torch.no_grad():
        engine.model.updater.bias_hh.fill_(float("nan"))
    live = LiveEngine(engine, "v", {})
    letters = _Letters()
    config = IngestConfig(batch_max_events=BATCH, quality={"enabled": False})
    loop = IngestLoop(
        config, live, StubFetcher(TOTAL), RecordDecoder(), letters, None, SnapshotConfig(), ServerMetrics()
    )
    events = _stream()[:BATCH]
    values = [encode_event(s, d, t) for s, d, t in events]
    loop._handle(
        FetchedBatch(
            values, [None] * BATCH, np.zeros(BATCH, np.int32), np.arange(100, 100 + BATCH),
            np.full(BATCH, -1), {0: 100 + BATCH}, {0: 100 + BATCH},
        )
    )  # fmt: skip
    assert sorted(letters.sent) == [(100 + i, "non_finite_state") for i in range(BATCH)]
    assert int(engine.events_applied) == 0 and torch.isfinite(engine.memory.memory).all()
    assert live.next_offsets == {0: 100 + BATCH}  # the position moves on: nothing is retried forever
