"""Queries while the writer applies batches never see a half-applied batch; the TopK candidate
cache follows the state version and computes once per version under concurrent misses."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from tgnstream.core.step import TemporalStep
from tgnstream.model_server import queries
from tgnstream.model_server.config import GrpcConfig
from tgnstream.model_server.convert import TopKQuery
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.runtime.live import LiveEngine

from .conftest import TEST_CONFIG, feed, make_engine, make_stream, node_name, serve, shutdown

BATCH, FIRST, TOTAL = 100, 200, 1000
PAIRS = [(node_name(i), node_name(40 + (3 * i) % 25)) for i in range(0, 40, 4)]
SRC = node_name(2)


def _reference(engine, stream) -> dict[int, tuple[torch.Tensor, list[str], float]]:
    """Scores of PAIRS, top-5 names for SRC and watermark after each batch, keyed by event count."""
    ref = {}
    src_i = engine.ids.lookup([p[0] for p in PAIRS], create=False)[0]
    dst_i = engine.ids.lookup([p[1] for p in PAIRS], create=False)[0]
    s = int(engine.ids.lookup([SRC], create=False)[0][0])
    for n in range(FIRST, TOTAL + 1, BATCH):
        if n > FIRST:  # the writer's boundaries: two halves per batch
            feed(engine, stream.slice(n - BATCH, n), batch=BATCH // 2)
        wm = float(engine.watermark)
        probs = engine.score(src_i, dst_i, torch.full((len(PAIRS),), wm, dtype=torch.float64))
        ids, _ = engine.top_k(s, wm, 5)
        ref[n] = (probs, [node_name(i) for i in ids.tolist()], wm)
    return ref


def test_readers_never_see_a_half_applied_batch():
    stream = make_stream(TOTAL, seed=3)
    engine = make_engine(seed=1)
    feed(engine, stream.slice(0, FIRST))
    ref = _reference(copy.deepcopy(engine), stream)
    live = LiveEngine(engine, "v-live")
    s = serve(live, GrpcConfig(**TEST_CONFIG))
    done = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def writer():
        try:
            for n in range(FIRST, TOTAL, BATCH):
                with live.write() as e:
                    # Two halves with a pause between: a reader slipping in would see n + 50.
                    TemporalStep(e).apply(stream.slice(n, n + BATCH // 2))
                    time.sleep(0.01)
                    TemporalStep(e).apply(stream.slice(n + BATCH // 2, n + BATCH))
                time.sleep(0.02)
        finally:
            done.set()

    def reader(kind: str):
        try:
            while not done.is_set():
                if kind == "score":
                    r = s.stub.Score(
                        pb.ScoreRequest(pairs=[pb.Pair(src=a, dst=b) for a, b in PAIRS]), timeout=10
                    )
                    n = r.state.events_applied
                    assert torch.allclose(torch.tensor(r.probabilities), ref[n][0], atol=1e-6), n
                else:
                    r = s.stub.TopK(pb.TopKRequest(src=SRC, k=5), timeout=10)
                    n = r.state.events_applied
                    assert [x.id for x in r.results] == ref[n][1], n
                assert n % BATCH == 0 and r.state.watermark == ref[n][2]
                seen.append(n)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            done.set()

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(k,)) for k in ("score", "topk", "score")
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        shutdown(s)
    if errors:
        raise errors[0]
    assert len(set(seen)) >= 4, f"readers saw too few states: {sorted(set(seen))}"


def test_candidate_cache_one_build_per_version_under_concurrent_misses(monkeypatch):
    engine = make_engine()
    stream = make_stream()
    feed(engine, stream.slice(0, 500))
    live = LiveEngine(engine, "v")
    cache = queries.CandidateCache()
    real = engine.destinations
    calls = []

    def slow_destinations():
        calls.append(1)
        time.sleep(0.2)  # keep the build in progress while the other threads miss
        return real()

    monkeypatch.setattr(engine, "destinations", slow_destinations)
    q = TopKQuery(src=node_name(1), k=5, candidates=None, exclude_seen=False, time=None, strict=False)
    results, barrier = [], threading.Barrier(6)

    def ask():
        barrier.wait()
        results.append(queries.top_k(live, q, cache))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 6 and cache.builds == 1 and len(calls) == 1
    assert all(r.ids == results[0].ids for r in results)
    # A new state version invalidates it; the same version does not.
    queries.top_k(live, q, cache)
    assert cache.builds == 1
    with live.write() as e:
        TemporalStep(e).apply(stream.slice(500, 600))
    after = queries.top_k(live, q, cache)
    assert cache.builds == 2 and after.stamp.events_applied == 600
    live.model_version = "v2"  # a hot swap changes the version even at the same event count
    queries.top_k(live, q, cache)
    assert cache.builds == 3


def test_candidate_cache_build_failure_reaches_every_waiter_and_is_retried(monkeypatch):
    engine = make_engine()
    feed(engine, make_stream(200))
    live = LiveEngine(engine, "v")
    cache = queries.CandidateCache()
    monkeypatch.setattr(engine, "destinations", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    q = TopKQuery(src=node_name(1), k=5, candidates=None, exclude_seen=False, time=None, strict=False)
    with pytest.raises(RuntimeError, match="boom"):
        queries.top_k(live, q, cache)
    monkeypatch.undo()
    assert len(queries.top_k(live, q, cache).ids) == 5 and cache.builds == 1


@pytest.mark.parametrize("warm", [True, False])
def test_cache_warmer_rebuilds_after_each_batch_only_when_topk_is_used(warm):
    from tgnstream.model_server.servicer import LinkPredictionServicer

    engine = make_engine()
    stream = make_stream()
    feed(engine, stream.slice(0, 300))
    live = LiveEngine(engine, "v")
    servicer = LinkPredictionServicer(live, GrpcConfig(**TEST_CONFIG, warm_candidates=warm))
    q = TopKQuery(src=node_name(1), k=5, candidates=None, exclude_seen=False, time=None, strict=False)
    try:
        with live.write() as e:  # before any TopK: nothing to warm
            TemporalStep(e).apply(stream.slice(300, 400))
        time.sleep(0.1)
        assert servicer.cache.builds == 0
        servicer._top_k(q)
        assert servicer.cache.builds == 1
        with live.write() as e:
            TemporalStep(e).apply(stream.slice(400, 500))
        deadline = time.monotonic() + 3
        while warm and servicer.cache.builds < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert servicer.cache.builds == (2 if warm else 1)
        r = servicer._top_k(q)
        assert servicer.cache.builds == 2 and r.stamp.events_applied == 500
    finally:
        servicer.close()
