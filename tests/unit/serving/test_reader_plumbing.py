"""The plumbing around reader processes: the shared port and the merged metrics exposition."""

from __future__ import annotations

import socket

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from tgnstream.apps.reader_pool import reserve_port
from tgnstream.core.step import TemporalStep
from tgnstream.runtime.metrics import ReaderMetrics, ServerMetrics, reader_families


def test_a_port_another_server_answers_on_is_refused():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(RuntimeError, match="another server already answers"):
            reserve_port("127.0.0.1", busy.getsockname()[1])
    finally:
        busy.close()


def test_a_free_port_is_reserved_for_the_readers_and_can_be_shared():
    sock = reserve_port("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port > 0
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))  # what a reader's grpc server does
        other.close()
    finally:
        sock.close()


def test_reader_series_are_merged_into_one_family_per_name_with_a_reader_label():
    own = ServerMetrics()
    readers = [ServerMetrics(), ServerMetrics()]
    for i, m in enumerate(readers):
        m.grpc_handled.labels("unary", "svc", "Score", "OK").inc(10 + i)
        m.nonfinite.labels("score").inc(i)
        m.ingest_events.labels("applied").inc(99)  # not a reader's: never exported from it
    merged = ReaderMetrics(own.registry)
    for i, m in enumerate(readers):
        merged.update(i, reader_families(m.registry))
    exposition = CollectorRegistry()
    exposition.register(merged)
    text = generate_latest(exposition).decode()
    assert text.count("# TYPE grpc_server_handled_total counter") == 1
    assert (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Score",grpc_service="svc",'
        'grpc_type="unary",reader="1"} 11.0' in text
    )
    assert 'tgnstream_nonfinite_total{reader="1",where="score"} 1.0' in text
    assert 'tgnstream_nonfinite_total{reader="0",where="ingest"}' not in text
    assert 'tgnstream_ingest_events_total{reader="0"' not in text and "reader=" not in "".join(
        line for line in text.splitlines() if line.startswith("tgnstream_ingest_events_total")
    )


def test_topk_candidates_are_computed_by_one_reader_and_copied_by_the_others():
    """Two readers' views over one shared state: the first TopK of a state computes the
    candidate embeddings and publishes them, the second reader copies them (same values); a
    new batch is a new state, computed again."""
    import torch.multiprocessing as tmp

    from tgnstream.core.config import ModelConfig
    from tgnstream.core.engine import MemoryEngine
    from tgnstream.core.events import EventBatch
    from tgnstream.model_server import queries
    from tgnstream.model_server.convert import TopKQuery
    from tgnstream.runtime.live import LiveEngine
    from tgnstream.runtime.shared_state import SharedLiveView, StateBoard

    torch.manual_seed(0)
    engine = MemoryEngine(ModelConfig.preset("tgn", width=8, num_neighbors=3), 16).eval()
    live = LiveEngine(engine, "v1")
    ctx = tmp.get_context("spawn")
    board = StateBoard(engine, "v1", 8, ctx)
    live.board = board

    def apply(names, t0):
        with live.write() as e:
            dense, _ = e.ids.lookup(names)
            n = len(names) // 2
            t = torch.arange(n, dtype=torch.float64) + t0
            TemporalStep(e).apply(
                EventBatch(dense[0::2].contiguous(), dense[1::2].contiguous(), t, torch.zeros(n, 0))
            )
            live.open = None

    apply(["a", "x", "b", "y", "c", "x", "a", "z"], 1.0)
    views = [SharedLiveView(board.handles, board.layout, board.new_reader_queue()) for _ in range(2)]
    caches = [queries.CandidateCache(), queries.CandidateCache()]
    q = TopKQuery(src="a", k=3, candidates=None, exclude_seen=False, time=None, strict=False)
    first = views[0].consistent(lambda: queries.top_k(views[0], q, caches[0]))
    second = views[1].consistent(lambda: queries.top_k(views[1], q, caches[1]))
    assert (caches[0].builds, caches[0].shared_hits) == (1, 0)
    assert (caches[1].builds, caches[1].shared_hits) == (0, 1)
    assert first.ids == second.ids and first.probabilities == second.probabilities
    reference = queries.top_k(live, q, queries.CandidateCache())  # the writer's own process
    assert reference.ids == first.ids and reference.probabilities == first.probabilities
    apply(["b", "z", "c", "y"], 10.0)
    views[1].consistent(lambda: queries.top_k(views[1], q, caches[1]))
    assert (caches[1].builds, caches[1].shared_hits) == (1, 1)


def test_topk_before_any_event_is_an_empty_ranking():
    from tgnstream.core.config import ModelConfig
    from tgnstream.core.engine import MemoryEngine
    from tgnstream.model_server import queries
    from tgnstream.model_server.convert import TopKQuery
    from tgnstream.runtime.live import LiveEngine

    live = LiveEngine(MemoryEngine(ModelConfig.preset("tgn", width=8, num_neighbors=3), 4).eval(), "v0")
    q = TopKQuery(src="a", k=3, candidates=None, exclude_seen=False, time=None, strict=False)
    r = queries.top_k(live, q, queries.CandidateCache())
    assert r.ids == [] and r.src_unknown


def test_an_answer_is_recomputed_when_a_batch_lands_during_its_reads_but_not_after_reads_done():
    """The sequence protocol, step by step: a batch applied while a query reads the state costs
    the attempt; a batch applied after the query said its reads were copied does not; a new
    open batch (published with every fetched chunk) never does."""
    import torch.multiprocessing as tmp

    from tgnstream.core.config import ModelConfig
    from tgnstream.core.engine import MemoryEngine
    from tgnstream.core.events import EventBatch
    from tgnstream.runtime.live import LiveEngine, OpenBatch
    from tgnstream.runtime.shared_state import SharedLiveView, StateBoard

    engine = MemoryEngine(ModelConfig.preset("tgn", width=8, num_neighbors=3), 16).eval()
    engine.ids.lookup(["a", "b", "c", "d"])  # registered up front: no id store grows below
    live = LiveEngine(engine, "v1")
    board = StateBoard(engine, "v1", 8, tmp.get_context("spawn"))
    live.board = board
    view = SharedLiveView(board.handles, board.layout, board.new_reader_queue())
    t = [0.0]

    def apply_batch():
        with live.write() as e:
            dense, _ = e.ids.lookup(["a", "b"])
            t[0] += 1
            times = torch.tensor([t[0]], dtype=torch.float64)
            TemporalStep(e).apply(EventBatch(dense[:1], dense[1:], times, torch.zeros(1, 0)))
            live.open = None

    def publish_open():
        with live.write(state=False) as e:
            dense, _ = e.ids.lookup(["c", "d"])
            times = torch.tensor([t[0]], dtype=torch.float64)
            live.open = OpenBatch(EventBatch(dense[:1], dense[1:], times, torch.zeros(1, 0)), {0: 1})

    calls = []

    def query(land, after_reads_done):
        def fn():
            stamp = view.stamp()  # the query's read of the state
            calls.append(stamp.events_applied)
            first = len(calls) == 1
            if after_reads_done:
                view.reads_done()
            if first:
                land()  # the writer, while this attempt is computing
            return stamp

        return fn

    stamp = view.consistent(query(apply_batch, after_reads_done=False))
    assert view.retries == 1 and calls == [0, 1] and stamp.events_applied == 1
    calls.clear()
    stamp = view.consistent(query(apply_batch, after_reads_done=True))
    assert view.retries == 1 and calls == [1], "kept: the batch landed after the reads"
    calls.clear()
    stamp = view.consistent(query(publish_open, after_reads_done=False))
    assert view.retries == 1 and calls == [2], "a new open batch does not cost the attempt"
    assert stamp.events_applied == 2  # read at the attempt's start: the open batch came after
    assert view.consistent(view.stamp).events_applied == 3  # the next query sees it


def test_a_reallocation_is_attached_only_when_no_query_of_the_reader_is_computing():
    """Buffers never move under a running query: a reader thread that meets a newer layout
    waits until the queries already computing in its process are done, and a query never sees
    the engine's tensors swapped half way."""
    import threading

    import torch.multiprocessing as tmp

    from tgnstream.core.config import ModelConfig
    from tgnstream.core.engine import MemoryEngine
    from tgnstream.runtime.live import LiveEngine
    from tgnstream.runtime.shared_state import SharedLiveView, StateBoard

    engine = MemoryEngine(ModelConfig.preset("tgn", width=8, num_neighbors=3), 16).eval()
    live = LiveEngine(engine, "v1")
    board = StateBoard(engine, "v1", 8, tmp.get_context("spawn"))
    live.board = board
    view = SharedLiveView(board.handles, board.layout, board.new_reader_queue())
    capacity = view.engine.memory.memory.shape[0]
    computing, finish = threading.Event(), threading.Event()
    seen_by_slow, order = [], []

    def slow():
        rows = view.engine.memory.memory.shape[0]
        seen_by_slow.append(rows)
        computing.set()
        finish.wait(10)
        seen_by_slow.append(view.engine.memory.memory.shape[0])  # still the buffers it began with
        order.append("slow")
        return rows

    slow_thread = threading.Thread(target=lambda: view.consistent(slow))
    slow_thread.start()
    assert computing.wait(10)
    with live.write() as e:  # the writer grows the state meanwhile (a new layout)
        e.ensure_capacity(4 * capacity)
    fast_rows = []
    fast_thread = threading.Thread(
        target=lambda: fast_rows.append(view.consistent(lambda: view.engine.memory.memory.shape[0]))
    )
    fast_thread.start()
    fast_thread.join(0.3)
    assert fast_thread.is_alive(), "the re-attach must wait for the query that is computing"
    assert seen_by_slow[-1] == capacity
    finish.set()
    fast_thread.join(10)
    slow_thread.join(10)
    assert seen_by_slow[:2] == [capacity, capacity] and order[0] == "slow"
    assert fast_rows == [4 * capacity], "the waiting query answers from the new layout"
    assert view.retries >= 1, "the slow answer began before the reallocation: computed again"
