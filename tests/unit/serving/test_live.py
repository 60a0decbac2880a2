"""LiveEngine: readers never overlap a writer; unknown ids read as cold start."""

from __future__ import annotations

import threading
import time

import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep
from tgnstream.runtime.live import LiveEngine, ReadWriteLock


def test_writer_excludes_readers_and_waiting_writer_blocks_new_readers():
    lock = ReadWriteLock()
    log: list[str] = []
    reader_in = threading.Event()
    release_reader = threading.Event()

    def long_reader():
        with lock.read():
            reader_in.set()
            release_reader.wait(5)
            log.append("reader1 out")

    def writer():
        with lock.write():
            log.append("writer in")
            time.sleep(0.05)
            log.append("writer out")

    def late_reader():
        with lock.read():
            log.append("reader2 in")

    t1 = threading.Thread(target=long_reader)
    t1.start()
    reader_in.wait(5)
    t2 = threading.Thread(target=writer)
    t2.start()
    time.sleep(0.05)  # the writer is now waiting for reader1
    t3 = threading.Thread(target=late_reader)
    t3.start()
    time.sleep(0.05)
    assert log == [], "neither the writer nor a new reader may enter while reader1 holds the lock"
    release_reader.set()
    for t in (t1, t2, t3):
        t.join(5)
    assert log == ["reader1 out", "writer in", "writer out", "reader2 in"]


def test_unknown_ids_map_to_an_empty_slot_that_scores_like_a_brand_new_node():
    torch.manual_seed(0)
    engine = MemoryEngine(
        ModelConfig(memory_dim=8, time_dim=4, embedding_dim=8, num_neighbors=3), capacity=2
    ).eval()
    live = LiveEngine(engine, "v1")
    with live.write() as e:
        dense, _ = e.ids.lookup(["a", "b", "c", "a"])
        TemporalStep(e).apply(
            EventBatch(
                dense[0::2].contiguous(),
                dense[1::2].contiguous(),
                torch.tensor([1.0, 2.0], dtype=torch.float64),
                torch.zeros(2, 0),
            )
        )
        live.open = None  # publishes: the ids registered above are now visible to queries
    assert engine.capacity >= len(engine.ids) + 1, "the cold slot is always allocated"
    with live.read() as e:
        idx, unknown = live.resolve(["a", "zzz", "c", "yyy"])
        assert unknown.tolist() == [False, True, False, True]
        assert idx.tolist() == [0, 3, 2, 3]
        t = torch.full((2,), 5.0, dtype=torch.float64)
        served = e.score(idx[[0, 2]], idx[[1, 3]], t)
        stamp = live.stamp()
    assert stamp.events_applied == 2 and stamp.watermark == 2.0 and stamp.model_version == "v1"
    # Independent reference: a new id registered for real, with no events.
    with live.write() as e:
        fresh, _ = e.ids.lookup(["zzz"])
        reference = e.score(torch.tensor([0, 2]), fresh.repeat(2), torch.full((2,), 5.0, dtype=torch.float64))
    torch.testing.assert_close(served, reference)
