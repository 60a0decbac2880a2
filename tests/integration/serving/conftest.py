"""Serving harness: wikipedia records on a topic, server processes, an offline reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaProducer

from tgnstream.apps.testing import child_pids, serve_config_dict
from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.loaders import load_dataset
from tgnstream.core.step import TemporalStep
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc

SMALL_MODEL = {"preset": "tgn", "memory_dim": 32, "seed": 0, "pair_features": True}


def event_values(data_path: Path, limit: int) -> list[tuple[bytes, bytes]]:
    """(key, JSON value) of the first ``limit`` events, written here by hand from the design's
    event contract (not by the replay tool), so the contract itself is under test."""
    data = load_dataset(data_path, limit=limit)
    names, ev = data.raw_ids, data.events
    out = []
    for s, d, t in zip(ev.src.tolist(), ev.dst.tolist(), ev.t.tolist()):
        value = json.dumps({"src": names[s], "dst": names[d], "ts": t, "label": 0}).encode()
        out.append((names[s].encode(), value))
    return out


def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20)
    for key, value in records:
        producer.send(topic, key=key, value=value)
    producer.flush(60)
    producer.close()


def fresh_engine(model: dict = SMALL_MODEL) -> MemoryEngine:
    """The weights a server starts with when it has no snapshot or checkpoint."""
    cfg = ModelConfig.preset(model["preset"], width=model["memory_dim"], pair_features=model["pair_features"])
    torch.manual_seed(model["seed"])
    return MemoryEngine(cfg, 1024).eval()


def apply_reference(engine: MemoryEngine, batches: list[list[tuple[str, str, float]]]) -> MemoryEngine:
    """Apply micro-batches of (src, dst, ts) the plain way: ids registered in order of
    appearance, each batch sorted by time, pending messages folded after each batch."""
    for events in batches:
        events = sorted(events, key=lambda e: e[2])  # stable: ties keep stream order
        if not events:
            continue
        keys = [name for s, d, _ in events for name in (s, d)]
        dense, _ = engine.ids.lookup(keys)
        t = torch.tensor([e[2] for e in events], dtype=torch.float64)
        TemporalStep(engine).apply(
            EventBatch(dense[0::2].contiguous(), dense[1::2].contiguous(), t, torch.zeros(len(events), 0))
        )
        engine.fold_pending()
    return engine


def reference_engine(data_path: Path, limit: int, batch: int, model: dict = SMALL_MODEL) -> MemoryEngine:
    """The uninterrupted, offline answer for the first ``limit`` events in ``batch``-sized
    micro-batches, from the same initial weights."""
    data = load_dataset(data_path, limit=limit)
    names, ev = data.raw_ids, data.events
    triples = [(names[s], names[d], t) for s, d, t in zip(ev.src.tolist(), ev.dst.tolist(), ev.t.tolist())]
    return apply_reference(fresh_engine(model), [triples[i : i + batch] for i in range(0, limit, batch)])


def serve_config(tmp: Path, bootstrap: str, topic: str, **overrides) -> dict:
    return serve_config_dict(tmp, bootstrap, topic, SMALL_MODEL, **overrides)


class ServerProcess:
    """``tgnstream serve`` in a child process (so it can be SIGKILLed)."""

    def __init__(self, config: dict, tmp: Path):
        self.config_path = tmp / "serve.json"
        self.config_path.write_text(json.dumps(config))
        self.ready = Path(config["ready_file"])
        self.log = open(tmp / "server.log", "ab")
        self.proc: subprocess.Popen | None = None
        self.ports: dict = {}

    def start(self, timeout: float = 60.0, restored: bool = True) -> ServerProcess:
        """Start the process; return once its ports are known and (``restored``) once it answers
        queries (health ``""`` SERVING: restored and caught up with the log once)."""
        self.ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tgnstream", "serve", "--config", str(self.config_path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout} s; see {self.log.name}")
            time.sleep(0.05)
        self.ports = json.loads(self.ready.read_text())
        if restored:
            self.wait_serving("", max(1.0, deadline - time.monotonic()))
        return self

    def health(self, service: str = "") -> int:
        """The gRPC health status of ``service`` (a ``HealthCheckResponse.ServingStatus``)."""
        with grpc.insecure_channel(f"127.0.0.1:{self.ports['grpc_port']}") as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        return reply.status

    def wait_serving(self, service: str = "", timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(service) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"health {service!r} not SERVING after {timeout:.0f} s; see {self.log.name}"
                )
            time.sleep(0.05)

    def info(self) -> pb.ModelInfo:
        with grpc.insecure_channel(f"127.0.0.1:{self.ports['grpc_port']}") as ch:
            return pb_grpc.LinkPredictionStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)

    def wait_applied(self, at_least: int, timeout: float = 120.0) -> pb.ModelInfo:
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if info.events_applied >= at_least:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {info.events_applied} events applied after {timeout} s")
            time.sleep(0.02)

    def _children(self) -> list[int]:
        return child_pids(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the server; its Kafka fetch process must then exit by itself (no orphans)."""
        children = self._children()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{c}").exists() and "zombie" not in _state(c) for c in children):
            if time.monotonic() > deadline:
                alive = [c for c in children if Path(f"/proc/{c}").exists()]
                for c in alive:
                    os.kill(c, signal.SIGKILL)
                raise AssertionError(f"child processes {alive} outlived their SIGKILLed server")
            time.sleep(0.1)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def _state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.lower()
    except OSError:
        return "gone zombie"
    return ""


@pytest.fixture
def server_factory(tmp_path):
    started: list[ServerProcess] = []

    def make(config: dict) -> ServerProcess:
        s = ServerProcess(config, tmp_path)
        started.append(s)
        return s

    yield make
    for s in started:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)
