"""State is a pure function of the log prefix: the same events delivered as a backlog, as a live
trickle with random pauses, and with a restart in the middle give bit-identical state and Score
answers; they also equal an offline replay with the same batch boundaries (full batches applied,
the open batch as query context)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from tgnstream.apps.serve import ServingProcess
from tgnstream.apps.serve_config import ServeConfig
from tgnstream.core.events import EventBatch
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc
from tgnstream.stream.kafka_admin import create_topic

from .conftest import apply_reference, event_values, fresh_engine, produce, serve_config

pytestmark = pytest.mark.kafka

N, BATCH = 3250, 500  # ends with an open batch of 250 events


def _start(tmp: Path, bootstrap: str, topic: str, readers: int = 0) -> ServingProcess:
    cfg = serve_config(tmp, bootstrap, topic, ingest={"batch_max_wait_ms": 20}, grpc={"readers": readers})
    proc = ServingProcess(ServeConfig(**cfg))
    proc.start()
    return proc


def _wait_visible(proc: ServingProcess, n: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with proc.live.read():
            seen = proc.live.visible_offsets.get(0, 0)
        if seen >= n:
            return
        assert time.monotonic() < deadline, f"only {seen} of {n} records read"
        time.sleep(0.02)


def _answers(proc: ServingProcess, pairs: list[tuple[str, str]], t: float) -> dict:
    """Score at the default time and at ``t``, plus the state, from one server."""
    with __import__("grpc").insecure_channel(f"127.0.0.1:{proc.grpc_port}") as ch:
        stub = pb_grpc.LinkPredictionStub(ch)
        request = [pb.Pair(src=s, dst=d) for s, d in pairs]
        at_default = stub.Score(pb.ScoreRequest(pairs=request), timeout=30)
        at_t = stub.Score(pb.ScoreRequest(pairs=request, time=t), timeout=30)
    with proc.live.read() as engine:
        n = len(engine.ids)
        state = {}
        for k, v in engine.state_dict().items():
            state[k] = v[:n].clone() if v.dim() and v.shape[0] == engine.capacity else v.clone()
        ids = dict(engine.ids._index)
        context = proc.live.context
    return {
        "default": list(at_default.probabilities),
        "at_t": list(at_t.probabilities),
        "stamp": (at_default.state.events_applied, at_default.state.watermark),
        "state": state,
        "ids": ids,
        "context": None if context is None else (context.src.clone(), context.dst.clone(), context.t.clone()),
    }


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a["default"] == b["default"], f"{what}: Score at the default time differs"
    assert a["at_t"] == b["at_t"], f"{what}: Score at an explicit time differs"
    assert a["stamp"] == b["stamp"] and a["ids"] == b["ids"], what
    assert set(a["state"]) == set(b["state"])
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), f"{what}: {key} differs"
    for x, y in zip(a["context"], b["context"]):
        assert torch.equal(x, y), f"{what}: open batch differs"


def test_backlog_trickle_restart_and_offline_replay_agree_bit_for_bit(
    kafka_bootstrap, wikipedia_csv, tmp_path
):
    records = event_values(wikipedia_csv, N)
    names = [
        (
            r[1].split(b'"src": "')[1].split(b'"')[0].decode(),
            r[1].split(b'"dst": "')[1].split(b'"')[0].decode(),
        )
        for r in records
    ]
    rng = random.Random(11)
    pairs = [(names[rng.randrange(N)][0], names[rng.randrange(N)][1]) for _ in range(200)]
    pairs += [names[i] for i in range(3000, 3250, 10)]  # pairs of the open batch itself
    t_query = 100_000.0

    # 1. Backlog: everything is in the topic before the server starts.
    create_topic(kafka_bootstrap, "det-backlog", 1)
    produce(kafka_bootstrap, "det-backlog", records)
    proc = _start(tmp_path / "backlog", kafka_bootstrap, "det-backlog")
    _wait_visible(proc, N)
    backlog = _answers(proc, pairs, t_query)
    proc.stop()
    assert backlog["stamp"][0] == N

    # 2. Live trickle: random chunks with random pauses while the server is caught up.
    create_topic(kafka_bootstrap, "det-trickle", 1)
    proc = _start(tmp_path / "trickle", kafka_bootstrap, "det-trickle")
    at = 0
    while at < N:
        step = rng.randint(1, 400)
        produce(kafka_bootstrap, "det-trickle", records[at : at + step])
        at += step
        time.sleep(rng.uniform(0, 0.15))
    _wait_visible(proc, N)
    _assert_same(backlog, _answers(proc, pairs, t_query), "live trickle vs backlog")
    proc.stop()

    # 3. A restart in the middle (inside an open batch): the snapshot holds the closed batches.
    create_topic(kafka_bootstrap, "det-restart", 1)
    produce(kafka_bootstrap, "det-restart", records[:1700])
    proc = _start(tmp_path / "restart", kafka_bootstrap, "det-restart")
    _wait_visible(proc, 1700)
    assert proc.stop() == 0
    produce(kafka_bootstrap, "det-restart", records[1700:])
    proc = _start(tmp_path / "restart", kafka_bootstrap, "det-restart")
    _wait_visible(proc, N)
    _assert_same(backlog, _answers(proc, pairs, t_query), "restart vs backlog")
    proc.stop()

    # 4. Offline replay: full batches applied, the rest as context, the same weights.
    triples = [(s, d, float(r[1].split(b'"ts": ')[1].split(b",")[0])) for (s, d), r in zip(names, records)]
    full = N // BATCH * BATCH
    ref = apply_reference(fresh_engine(), [triples[i : i + BATCH] for i in range(0, full, BATCH)])
    dense, _ = ref.ids.lookup([x for s, d, _ in triples[full:] for x in (s, d)])
    tail = torch.tensor([t for _, _, t in triples[full:]], dtype=torch.float64)
    order = torch.argsort(tail, stable=True)
    context = EventBatch(dense[0::2][order], dense[1::2][order], tail[order], torch.zeros(N - full, 0))
    src, _ = ref.ids.lookup([s for s, _ in pairs], create=False)
    dst, _ = ref.ids.lookup([d for _, d in pairs], create=False)
    unknown_src, unknown_dst = src < 0, dst < 0
    cold = len(ref.ids)
    ref.ensure_capacity(cold + 1)
    src, dst = src.masked_fill(unknown_src, cold), dst.masked_fill(unknown_dst, cold)
    t = torch.full((len(pairs),), t_query, dtype=torch.float64)
    offline = ref.score(src, dst, t, context).float().tolist()
    assert offline == backlog["at_t"], "offline replay vs served"


def test_two_replicas_answer_identically(kafka_bootstrap, kafka_topic, wikipedia_csv, tmp_path):
    """Two servers on one topic, started at different moments while events flow in, one answering
    in its own process and one from two reader processes over shared memory: at the same
    events_applied they give the same answers and hold the same state."""
    records = event_values(wikipedia_csv, 2600)
    produce(kafka_bootstrap, kafka_topic, records[:900])
    first = _start(tmp_path / "a", kafka_bootstrap, kafka_topic)
    produce(kafka_bootstrap, kafka_topic, records[900:1800])
    second = _start(tmp_path / "b", kafka_bootstrap, kafka_topic, readers=2)
    for i in range(1800, 2600, 100):
        produce(kafka_bootstrap, kafka_topic, records[i : i + 100])
        time.sleep(0.05)
    for proc in (first, second):
        _wait_visible(proc, 2600)
    pairs = [("0", "8227"), ("1", "8228"), ("2", "8229"), ("nobody", "8227")]
    a, b = _answers(first, pairs, 100_000.0), _answers(second, pairs, 100_000.0)
    _assert_same(a, b, "replica A vs replica B")
    first.stop()
    second.stop()
