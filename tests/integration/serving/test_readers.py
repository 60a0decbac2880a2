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
import urllib.request

import grpc
import numpy as np
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.ingest.config import IngestConfig
from tgnstream.ingest.loop import IngestLoop
from tgnstream.ingest.prefetch import FetchedBatch
from tgnstream.ingest.records import RecordDecoder
from tgnstream.ingest.replay import encode_event
from tgnstream.live import LiveEngine
from tgnstream.metrics import ServerMetrics
from tgnstream.model_server.config import GrpcConfig
from tgnstream.reader_pool import ReaderPool
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc

BATCH, TOTAL = 40, 1200
MODEL = ModelConfig.preset("tgn", width=8, pair_features=True, num_neighbors=4)
USERS, PAGES = 700, 30  # > the 1,024 node slots the shared state starts with: it must grow
PAIRS = [("u1", "p2"), ("u3", "p3"), ("u5", "p1"), ("u650", "p7"), ("u0", "nobody")]


def _engine() -> MemoryEngine:
    torch.manual_seed(3)
    return MemoryEngine(MODEL, 16).eval()


def _stream():
    rng = random.Random(5)
    # New users keep arriving, so ids pass the pre-sized capacity part way through.
    return [(f"u{rng.randrange(min(USERS, 20 + i))}", f"p{rng.randrange(PAGES)}", float(i)) for i in range(TOTAL)]


class _Fetcher:
    partitions, connected, topic_id = [0], True, None

    def __init__(self):
        self.highwater, self.resets = {0: TOTAL}, []

    def request_commit(self, offsets):
        pass


def _offline(events, n: int, pairs, t: float) -> list[float]:
    """The answer for the log prefix [0, n): its full batches applied, the rest as context."""
    engine = _engine()
    full = n // BATCH * BATCH
    for start in range(0, full, BATCH):
        chunk = events[start : start + BATCH]
        dense, _ = engine.ids.lookup([x for s, d, _ in chunk for x in (s, d)])
        t_b = torch.tensor([e[2] for e in chunk], dtype=torch.float64)
        engine.apply_events(
            EventBatch(dense[0::2].contiguous(), dense[1::2].contiguous(), t_b, torch.zeros(len(chunk), 0))
        )
        engine.fold_pending()
    rest = events[full:n]
    context = None
    if rest:
        dense, _ = engine.ids.lookup([x for s, d, _ in rest for x in (s, d)])
        context = EventBatch(
            dense[0::2], dense[1::2], torch.tensor([e[2] for e in rest], dtype=torch.float64), torch.zeros(len(rest), 0)
        )
    src, _ = engine.ids.lookup([p[0] for p in pairs], create=False)
    dst, _ = engine.ids.lookup([p[1] for p in pairs], create=False)
    cold = len(engine.ids)
    engine.ensure_capacity(cold + 1)
    src, dst = src.masked_fill(src < 0, cold), dst.masked_fill(dst < 0, cold)
    probs = engine.score(src, dst, torch.full((len(pairs),), t, dtype=torch.float64), context)
    return probs.float().tolist()


def test_reader_processes_answer_whole_states_only_while_the_writer_applies_and_grows():
    events = _stream()
    values = [encode_event(s, d, t) for s, d, t in events]
    live = LiveEngine(_engine(), "v-shared", {})
    metrics = ServerMetrics()
    pool = ReaderPool(live, GrpcConfig(port=0, warm_candidates=False), 2, metrics, open_capacity=BATCH)
    pool.start()
    config = IngestConfig(batch_max_events=BATCH, quality={"enabled": False})
    loop = IngestLoop(config, live, _Fetcher(), RecordDecoder(), None, None, __import__(
        "tgnstream.snapshots", fromlist=["SnapshotConfig"]).SnapshotConfig(), metrics)
    t_query = float(TOTAL + 10)
    seen: dict[int, list[float]] = {}
    errors: list[BaseException] = []
    done = threading.Event()
    request = pb.ScoreRequest(pairs=[pb.Pair(src=s, dst=d) for s, d in PAIRS], time=t_query)

    started = threading.Semaphore(0)

    def client():
        try:
            with grpc.insecure_channel(f"127.0.0.1:{pool.port}") as ch:
                stub = pb_grpc.LinkPredictionStub(ch)
                stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
                started.release()
                while not done.is_set():
                    r = stub.Score(request, timeout=30)
                    probs = list(r.probabilities)
                    n = r.state.events_applied
                    assert seen.setdefault(n, probs) == probs, f"two answers for the state at {n} events"
                    assert r.state.model_version == "v-shared"
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(3)]
    try:
        for th in threads:
            th.start()
        for _ in threads:  # connected and answered once: the feed starts with the readers busy
            assert started.acquire(timeout=60)
        rng = random.Random(9)
        at = 0
        while at < TOTAL:
            k = min(rng.randint(1, 70), TOTAL - at)
            loop._handle(
                FetchedBatch(
                    values[at : at + k], [None] * k, np.zeros(k, np.int32), np.arange(at, at + k),
                    np.full(k, -1), {0: at + k}, {0: TOTAL},
                )
            )  # fmt: skip
            at += k
            time.sleep(rng.random() * 0.02)
        time.sleep(0.3)  # the last state is answered too
        done.set()
        for th in threads:
            th.join()
        assert not errors, errors[0]
        assert pool.board.layout_changes >= 1, "the node capacity was meant to grow during the run"
        assert TOTAL in seen and len(seen) >= 10, f"the readers answered only {len(seen)} states"
        threads_before = torch.get_num_threads()
        torch.set_num_threads(1)  # as the readers: float sums must run in the same order
        try:
            want_by_n = {n: _offline(events, n, PAIRS, t_query) for n in seen}
        finally:
            torch.set_num_threads(threads_before)
        for n, probs in seen.items():
            want = want_by_n[n]
            assert probs == want, f"reply at {n} events is not that state's answer"
        # Their request metrics reach this process's exposition, labelled per reader.
        time.sleep(1.2)
        text = b"".join(
            __import__("prometheus_client").exposition.generate_latest(_Registry(pool.collector))
            .splitlines(keepends=True)
        ).decode()
        assert 'grpc_server_handled_total{grpc_code="OK"' in text and 'reader="0"' in text and 'reader="1"' in text
    finally:
        done.set()
        pool.stop(1.0)
    assert all(p.exitcode is not None for p in pool._procs), "readers stop with the pool"


class _Registry:
    def __init__(self, collector):
        self.collector = collector

    def collect(self):
        return self.collector.collect()
