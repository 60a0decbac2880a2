"""Coalescing: concurrent requests share engine calls and still get exactly their own answers."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tgnstream.model_server.coalesce import Coalescer
from tgnstream.model_server.config import GrpcConfig
from tgnstream.rpc.v1 import link_prediction_pb2 as pb

from .conftest import NUM_DST, NUM_SRC, TEST_CONFIG, node_name, serve, shutdown


def _run_threads(fn, args_list):
    results, errors = [None] * len(args_list), []

    def work(i, a):
        try:
            results[i] = fn(a)
        except BaseException as exc:  # collected for the assertion
            errors.append((i, exc))

    threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results, errors


def test_coalescer_batches_concurrent_items_and_keeps_them_apart():
    seen_batches = []

    def run(items):
        seen_batches.append(list(items))
        time.sleep(0.05)  # later arrivals queue up behind this batch
        return [x * 10 if x != 7 else ValueError("seven") for x in items]

    c = Coalescer(run, max_batch=100)
    results, errors = _run_threads(c.submit, list(range(12)))
    assert [i for i, _ in errors] == [7] and str(errors[0][1]) == "seven"
    assert [r for i, r in enumerate(results) if i != 7] == [i * 10 for i in range(12) if i != 7]
    assert c.items == 12 and c.batches == len(seen_batches) < 12
    assert sorted(x for b in seen_batches for x in b) == list(range(12))


def test_coalescer_respects_max_batch_and_survives_a_failing_batch():
    calls = []

    def run(items):
        calls.append(sum(items))
        time.sleep(0.02)
        if 99 in items:
            raise RuntimeError("batch failed")
        return items

    c = Coalescer(run, max_batch=10, size=lambda x: x)
    results, errors = _run_threads(c.submit, [4, 4, 4, 4, 25, 4])
    assert all(total <= 10 or total == 25 for total in calls), calls  # 25 > max runs alone
    assert not errors and sorted(results) == [4, 4, 4, 4, 4, 25]
    with pytest.raises(RuntimeError, match="batch failed"):
        c.submit(99)
    assert c.submit(3) == 3, "the coalescer is usable after a failed batch"


def test_concurrent_requests_are_batched_with_exact_answers(served, monkeypatch):
    """Requests pile up behind a held write lock, then run as shared batches; every reply equals
    the engine's own answer for that request (mixed times, exclude_seen, unknown ids)."""
    e = served.engine
    cfg = {**TEST_CONFIG, "max_workers": 40, "max_inflight": 30, "max_queued": 4, "hard_limit_rpcs": 64}
    s = serve(served.live, GrpcConfig(**cfg))
    calls = {"score": 0, "embed": 0}
    real_score, real_embed = e.score, e.embed

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(e, "score", counting("score", real_score))
    monkeypatch.setattr(e, "embed", counting("embed", real_embed))
    wm = float(e.watermark)
    users = [node_name(i) for i in range(0, NUM_SRC, 4)]
    page = [node_name(NUM_SRC + j) for j in range(NUM_DST)]
    score_reqs = [
        pb.ScoreRequest(
            pairs=[pb.Pair(src=u, dst=page[(3 * i) % NUM_DST]), pb.Pair(src="nobody", dst=page[i])]
        )
        for i, u in enumerate(users)
    ]
    score_reqs += [
        pb.ScoreRequest(pairs=[pb.Pair(src=users[0], dst=page[1])], time=wm + 100.0 * i) for i in (1, 2)
    ]
    topk_reqs = [pb.TopKRequest(src=u, k=4, exclude_seen=bool(i % 2)) for i, u in enumerate(users)]
    topk_reqs += [pb.TopKRequest(src="nobody", k=3), pb.TopKRequest(src=users[1], k=5, time=wm + 50.0)]
    try:
        with s.live.write():
            futures = [s.stub.Score.future(r, timeout=20) for r in score_reqs]
            futures += [s.stub.TopK.future(r, timeout=20) for r in topk_reqs]
            deadline = time.monotonic() + 5
            while s.metrics.registry.get_sample_value("tgnstream_grpc_inflight_requests") < len(futures):
                assert time.monotonic() < deadline
                time.sleep(0.005)
        replies = [f.result() for f in futures]
    finally:
        shutdown(s)
    monkeypatch.undo()
    # 12 Score requests at 3 distinct times, 12 TopK at 2 (+ the candidate-cache build).
    assert calls["score"] < len(score_reqs), calls
    assert calls["embed"] < len(topk_reqs), calls

    def idx(name):
        i, new = e.ids.lookup([name], create=False)
        return int(i[0]) if not new[0] else len(e.ids)  # unknown -> the cold slot

    for req, rep in zip(score_reqs, replies[: len(score_reqs)]):
        t = req.time if req.HasField("time") else wm
        src = torch.tensor([idx(p.src) for p in req.pairs])
        dst = torch.tensor([idx(p.dst) for p in req.pairs])
        ref = e.score(src, dst, torch.full((len(src),), t, dtype=torch.float64))
        assert torch.allclose(torch.tensor(rep.probabilities), ref, atol=1e-6)
        assert list(rep.src_unknown) == [p.src == "nobody" for p in req.pairs]
    for req, rep in zip(topk_reqs, replies[len(score_reqs) :]):
        t = req.time if req.HasField("time") else wm
        s_idx = idx(req.src)
        cand = e.destinations()
        logits = e.rank_logits(torch.tensor([s_idx]), torch.tensor([t], dtype=torch.float64), cand, wm)[0]
        if req.exclude_seen:
            count, _ = e.history.lookup(torch.full_like(cand, s_idx), cand)
            logits = logits.masked_fill(count > 0, float("-inf"))
        top = torch.topk(logits, req.k)
        assert [r.id for r in rep.results] == [node_name(i) for i in cand[top.indices].tolist()]
        assert torch.allclose(
            torch.tensor([r.probability for r in rep.results]), torch.sigmoid(top.values), atol=1e-6
        )
        assert rep.src_unknown == (req.src == "nobody")
