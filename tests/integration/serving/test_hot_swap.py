"""Hot swap on a real broker: the trainer publishes versions while the server ingests and a
client hammers Score and TopK; every query succeeds, the served version follows the published
ones, and every Score reply equals that version replayed offline over the prefix its stamp
names (same batch boundaries). A damaged or incompatible version is refused and the old one
keeps serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from tgnstream.apps.testing import prefix_answer, serve_config_dict, wait_until
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.loaders import load_dataset
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc
from tgnstream.runtime.models import ModelStore

from .conftest import event_values, produce

pytestmark = pytest.mark.kafka

WIKI = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "wikipedia.csv"
TOTAL, BATCH, FIRST = 3_000, 200, 1_000


def _trainer(tmp: Path, bootstrap: str, topic: str) -> subprocess.Popen:
    cfg = {
        "stream": {
            "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "group_id": None},
            "batch_max_events": BATCH,
            "batch_max_wait_ms": 100,
            "poll_timeout_ms": 100,
        },
        "start": {"memory_dim": 16, "seed": 1},
        "training": {
            "window_events": 1_600,
            "every_events": 800,
            "min_new_events": 400,
            "holdout_events": 400,
            "batch_size": 400,
            "lr": 1e-3,
        },
        "gate": {"max_ap_drop": 1.0, "max_mrr_drop": 1.0},
        "publish": {"dir": str(tmp / "models"), "keep": 10},
        "checkpoints": {"dir": str(tmp / "trainer")},
        "metrics_port": 0,
        "torch_threads": 1,
        "progress": False,
    }
    path = tmp / "trainer.json"
    path.write_text(json.dumps(cfg))
    return subprocess.Popen(
        [sys.executable, "-m", "tgnstream", "trainer", "--config", str(path)],
        stdout=open(tmp / "trainer.log", "ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


class Hammer(threading.Thread):
    """Score and TopK in a loop; keeps every Score reply's (version, events, probabilities)."""

    def __init__(self, port: int, pairs: list[tuple[str, str]], t: float, src: str):
        super().__init__(daemon=True)
        self.port, self.pairs, self.t, self.src = port, pairs, t, src
        self.replies: list[tuple[str, int, list[float]]] = []
        self.failures: list[str] = []
        self.topk = 0
        self.done = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            stub = pb_grpc.LinkPredictionStub(ch)
            req = pb.ScoreRequest(pairs=[pb.Pair(src=s, dst=d) for s, d in self.pairs], time=self.t)
            while not self.done.is_set():
                try:
                    r = stub.Score(req, timeout=10)
                    self.replies.append(
                        (r.state.model_version, r.state.events_applied, list(r.probabilities))
                    )
                    stub.TopK(pb.TopKRequest(src=self.src, k=5, time=self.t), timeout=10)
                    self.topk += 1
                except grpc.RpcError as e:
                    self.failures.append(f"{e.code()}: {e.details()}")


@pytest.mark.parametrize("readers", [0, 2])
def test_versions_are_swapped_in_under_load_without_a_failed_query(
    readers, tmp_path, kafka_bootstrap, kafka_topic, server_factory
):
    data = load_dataset(WIKI, limit=TOTAL)
    names, ev = data.raw_ids, data.events
    events = [(names[s], names[d], t) for s, d, t in zip(ev.src.tolist(), ev.dst.tolist(), ev.t.tolist())]
    values = event_values(WIKI, TOTAL)
    produce(kafka_bootstrap, kafka_topic, values[:FIRST])
    trainer = _trainer(tmp_path, kafka_bootstrap, kafka_topic)
    store = ModelStore(tmp_path / "models")
    try:
        wait_until(
            lambda: len(store.versions()) >= 2, 120, "the trainer's first round"
        )  # after its start model
        first = store.latest().version
        cfg = serve_config_dict(
            tmp_path,
            kafka_bootstrap,
            kafka_topic,
            {"preset": "tgn", "memory_dim": 16},  # not used: the server starts from the published version
            batch_max_wait_ms=50,
            ingest={"batch_max_events": BATCH},
            models={"dir": str(tmp_path / "models"), "watch_interval_s": 0.3},
            grpc={"port": 0, "readers": readers},
        )
        server = server_factory(cfg).start()
        assert server.info().model_version == first
        t_q = events[-1][2] + 10.0
        pairs = [(events[i][0], events[i][1]) for i in (5, 700, 1500, 2500)] + [("nobody", events[3][1])]
        hammer = Hammer(server.ports["grpc_port"], pairs, t_q, events[1][0])
        hammer.start()
        for i in range(FIRST, TOTAL, 250):  # the rest arrives while versions are published
            produce(kafka_bootstrap, kafka_topic, values[i : i + 250])
            time.sleep(0.5)
        wait_until(lambda: len(store.versions()) >= 4, 180, "three versions after the start model")
        newest = store.latest().version
        wait_until(
            lambda: server.info().model_version == newest and server.info().events_applied == TOTAL,
            120,
            f"the server to serve {newest} over all events",
        )
        time.sleep(0.5)
        hammer.done.set()
        hammer.join(30)
    finally:
        trainer.kill()
        trainer.wait(10)
    assert not hammer.failures, hammer.failures[:5]
    assert hammer.topk > 0
    seen = [v for v, _, _ in hammer.replies]
    served = list(dict.fromkeys(seen))  # in order of first appearance
    assert served[0] == first and served[-1] == newest and len(served) >= 2, served
    assert all(a < b for a, b in zip(served, served[1:])), "versions only move forward"
    # Every distinct (version, prefix) reply equals that version replayed offline.
    checked = {}
    for version, n, probs in hammer.replies:
        checked.setdefault((version, n), probs)
    for (version, n), probs in sorted(checked.items())[:: max(1, len(checked) // 12)] + [
        max(checked.items())
    ]:
        published = store.get(version)
        engine = published.load()
        start = published.next_offsets.get(0, 0)
        want = prefix_answer(engine, events, n, BATCH, pairs, t_q, start=start)
        torch.testing.assert_close(
            torch.tensor(probs), torch.tensor(want), rtol=0, atol=1e-6, msg=f"{version}@{n}"
        )
    metrics = _scrape(server.ports["metrics_port"])
    assert (
        f'tgnstream_model_info{{device="cpu",model="tgn",version="{newest}"}} 1.0'
        in metrics.replace('model="tgn",device="cpu"', 'device="cpu",model="tgn"')
        or f'version="{newest}"' in metrics
    )
    swapped = [
        line
        for line in metrics.splitlines()
        if line.startswith('tgnstream_model_swaps_total{reason="",result="swapped"}')
    ]
    assert swapped and float(swapped[0].split()[-1]) >= len(served) - 1


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_a_damaged_or_incompatible_version_is_refused_and_the_old_one_keeps_serving(
    tmp_path, kafka_bootstrap, kafka_topic, server_factory
):
    values = event_values(WIKI, 600)
    produce(kafka_bootstrap, kafka_topic, values)
    store = ModelStore(tmp_path / "models")
    cfg_model = ModelConfig.preset("tgn", width=16, pair_features=True)
    torch.manual_seed(0)
    good = store.publish(MemoryEngine(cfg_model, 64).eval(), {}, kafka_topic)
    cfg = serve_config_dict(
        tmp_path,
        kafka_bootstrap,
        kafka_topic,
        {"preset": "tgn", "memory_dim": 16},
        ingest={"batch_max_events": BATCH},
        models={"dir": str(tmp_path / "models"), "watch_interval_s": 0.2},
    )
    server = server_factory(cfg).start()
    wait_until(lambda: server.info().events_applied == 600, 60, "600 events")
    assert server.info().model_version == good.version
    # A damaged version: its state no longer matches the manifest.
    torch.manual_seed(1)
    damaged = store.publish(MemoryEngine(cfg_model, 64).eval(), {}, kafka_topic)
    state = damaged.path / "state.pt"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state.write_bytes(bytes(raw))
    wait_until(
        lambda: 'tgnstream_model_swaps_total{reason="unloadable",result="refused"} 1.0'
        in _scrape(server.ports["metrics_port"]),
        30,
        "the damaged version's refusal",
    )
    # An incompatible one: another architecture.
    other = ModelConfig.preset("tgn", width=32, pair_features=True)
    store.publish(MemoryEngine(other, 64).eval(), {}, kafka_topic)
    wait_until(
        lambda: 'tgnstream_model_swaps_total{reason="architecture",result="refused"} 1.0'
        in _scrape(server.ports["metrics_port"]),
        30,
        "the incompatible version's refusal",
    )
    info = server.info()
    assert info.model_version == good.version and info.events_applied == 600
    log = (tmp_path / "server.log").read_text()
    assert "does not load or verify" in log and "architecture differs" in log
    with grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc_port']}") as ch:
        r = pb_grpc.LinkPredictionStub(ch).Score(
            pb.ScoreRequest(pairs=[pb.Pair(src="0", dst="8227")]), timeout=10
        )
        assert r.state.model_version == good.version


def test_a_restart_serves_the_newest_published_version(
    tmp_path, kafka_bootstrap, kafka_topic, server_factory
):
    values = event_values(WIKI, 600)
    produce(kafka_bootstrap, kafka_topic, values)
    store = ModelStore(tmp_path / "models")
    cfg_model = ModelConfig.preset("tgn", width=16, pair_features=True)
    torch.manual_seed(0)
    first = store.publish(MemoryEngine(cfg_model, 64).eval(), {}, kafka_topic)
    cfg = serve_config_dict(
        tmp_path,
        kafka_bootstrap,
        kafka_topic,
        {"preset": "tgn", "memory_dim": 16},
        ingest={"batch_max_events": BATCH},
        models={"dir": str(tmp_path / "models"), "watch_interval_s": 0.2},
    )
    server = server_factory(cfg).start()
    wait_until(lambda: server.info().events_applied == 600, 60, "600 events")
    assert server.terminate() == 0  # the final snapshot records v000001 at offset 600
    # Published while the server was down: the state after 400 events of other weights.
    torch.manual_seed(7)
    engine = MemoryEngine(cfg_model, 64).eval()
    data = load_dataset(WIKI, limit=400)
    names, ev = data.raw_ids, data.events
    events = [(names[s], names[d], t) for s, d, t in zip(ev.src.tolist(), ev.dst.tolist(), ev.t.tolist())]
    prefix_answer(engine, events, 400, BATCH, [], 0.0)  # applies the 2 batches of 200 (no query)
    second = store.publish(engine, {0: 400}, kafka_topic, parent=first.version)
    restarted = server_factory(cfg).start()
    wait_until(
        lambda: restarted.info().model_version == second.version, 60, "the newest version after the restart"
    )
    info = restarted.info()
    assert info.events_applied == 600 and dict(info.next_offsets) == {0: 600}
    log = (tmp_path / "server.log").read_text()
    assert "restored from snapshot" in log and f"now serving {second.version} at offsets {{0: 600}}" in log
