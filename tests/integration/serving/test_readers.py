"""Reader processes answer from the writer's state in shared memory, never from a torn state.

The writer (the real ingest loop in this process, fed chunks of random sizes) applies
fixed-size batches and publishes the open batch, while two reader processes (real gRPC servers
on one port, SO_REUSEPORT) answer Score queries sent from client threads. Every reply must equal
the offline answer for the log prefix its stamp names (full batches applied, the rest as batch
context), computed here by a naive replay; node capacity starts small so that the shared state
must grow (be reallocated and re-attached by the readers) in the middle of the run.
"""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from tgnstream.apps.reader_pool import ReaderPool
from tgnstream.apps.replay import encode_event
from tgnstream.apps.testing import StubFetcher, feed_in_chunks, prefix_answer
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.ingest.config import IngestConfig
from tgnstream.ingest.loop import IngestLoop
from tgnstream.model_server import queries
from tgnstream.model_server.config import GrpcConfig
from tgnstream.model_server.convert import TopKQuery
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.metrics import ServerMetrics
from tgnstream.runtime.snapshots import SnapshotConfig
from tgnstream.stream.records import RecordDecoder

BATCH, TOTAL = 40, 1200
MODEL = ModelConfig.preset("tgn", width=8, pair_features=True, num_neighbors=4)
USERS, PAGES = 700, 30  # > the 1,024 node slots the shared state starts with: it must grow
PAIRS = [("u1", "p2"), ("u3", "p3"), ("u5", "p1"), ("u650", "p7"), ("u0", "nobody")]


def _engine(device: str = "cpu") -> MemoryEngine:
    torch.manual_seed(3)
    return MemoryEngine(MODEL, 16).to(device).eval()


def _stream():
    rng = random.Random(5)
    # New users keep arriving, so ids pass the pre-sized capacity part way through.
    users = [f"u{rng.randrange(min(USERS, 20 + i))}" for i in range(TOTAL)]
    return [(u, f"p{rng.randrange(PAGES)}", float(i)) for i, u in enumerate(users)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_reader_processes_answer_whole_states_only_while_the_writer_applies_and_grows(device):
    """On CUDA the readers map the writer's device tensors (CUDA IPC) and query them there."""
    events = _stream()
    values = [encode_event(s, d, t) for s, d, t in events]
    live = LiveEngine(_engine(device), "v-shared", {})
    metrics = ServerMetrics()
    # No request coalescing: a coalesced call's matrix shapes depend on which requests met, and
    # with them the last bit of a float sum; this test asks for bit-identical answers.
    grpc_config = GrpcConfig(port=0, warm_candidates=False, coalesce=False)
    pool = ReaderPool(live, grpc_config, 2, metrics, open_capacity=BATCH)
    pool.start()
    config = IngestConfig(batch_max_events=BATCH, quality={"enabled": False})
    loop = IngestLoop(
        config, live, StubFetcher(TOTAL), RecordDecoder(), None, None, SnapshotConfig(), metrics
    )
    t_query = float(TOTAL + 10)
    seen: dict[int, list[float]] = {}
    errors: list[BaseException] = []
    done = threading.Event()
    request = pb.ScoreRequest(pairs=[pb.Pair(src=s, dst=d) for s, d in PAIRS], time=t_query)

    started = threading.Semaphore(0)
    sent = [0]
    sent_lock = threading.Lock()

    def client():
        try:
            with grpc.insecure_channel(f"127.0.0.1:{pool.port}") as ch:
                stub = pb_grpc.LinkPredictionStub(ch)
                stub.Score(request, timeout=60)  # the reader's first forward pass is slow
                with sent_lock:
                    sent[0] += 1
                started.release()
                while not done.is_set():
                    r = stub.Score(request, timeout=30)
                    with sent_lock:
                        sent[0] += 1
                    probs = list(r.probabilities)
                    n = r.state.events_applied
                    assert seen.setdefault(n, probs) == probs, f"two answers for the state at {n} events"
                    assert r.state.model_version == "v-shared"
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    topk_request = pb.TopKRequest(src="u1", k=5)
    topk_seen: dict[int, tuple] = {}

    def topk_client():
        try:
            with grpc.insecure_channel(f"127.0.0.1:{pool.port}") as ch:
                stub = pb_grpc.LinkPredictionStub(ch)
                stub.TopK(topk_request, timeout=60)
                started.release()
                while not done.is_set():
                    r = stub.TopK(topk_request, timeout=30)
                    got = ([x.id for x in r.results], [x.probability for x in r.results])
                    n = r.state.events_applied
                    assert topk_seen.setdefault(n, got) == got, f"two TopK answers for the state at {n}"
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(3)] + [threading.Thread(target=topk_client)]
    try:
        for th in threads:
            th.start()
        for _ in threads:  # connected and answered once: the feed starts with the readers busy
            assert started.acquire(timeout=60)
        feed_in_chunks(loop, values, max_pause_s=0.02)
        deadline = time.monotonic() + 30
        while not (TOTAL in seen and TOTAL in topk_seen) and not errors:  # the last state is answered too
            assert time.monotonic() < deadline, "the readers never answered from the final state"
            time.sleep(0.05)
        done.set()
        for th in threads:
            th.join()
        assert not errors, errors[0]
        assert pool.board.layout_changes >= 1, "the node capacity was meant to grow during the run"
        assert TOTAL in seen and len(seen) >= 5, f"the readers answered only {len(seen)} states"
        threads_before = torch.get_num_threads()
        torch.set_num_threads(1)  # as the readers: float sums must run in the same order
        try:
            want_by_n = {n: prefix_answer(_engine(device), events, n, BATCH, PAIRS, t_query) for n in seen}
        finally:
            torch.set_num_threads(threads_before)
        # TopK through the readers (shared candidate cache) = TopK in the writer's own process.
        torch.set_num_threads(1)
        try:
            q = TopKQuery(src="u1", k=5, candidates=None, exclude_seen=False, time=None, strict=False)
            here = queries.top_k(live, q, queries.CandidateCache())
        finally:
            torch.set_num_threads(threads_before)
        assert TOTAL in topk_seen and topk_seen[TOTAL] == (here.ids, here.probabilities)
        for n, probs in seen.items():
            want = want_by_n[n]
            assert probs == want, f"reply at {n} events is not that state's answer"
        # Their request metrics reach this process's exposition, labelled per reader.
        time.sleep(1.2)
        exposition = CollectorRegistry()
        exposition.register(pool.collector)
        text = generate_latest(exposition).decode()
        for index in ("0", "1"):
            assert f'tgnstream_grpc_inflight_requests{{reader="{index}"}}' in text
        scored = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("grpc_server_handled_total{") and 'grpc_method="Score"' in line
        )
        assert scored == sent[0], "every Score reply is counted once, by the reader that sent it"
    finally:
        done.set()
        pool.stop(1.0)
    assert all(p.exitcode is not None for p in pool._procs), "readers stop with the pool"
