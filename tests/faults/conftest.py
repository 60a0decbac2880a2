"""Fault-injection harness: a broker per test (so a test may stop, restart or empty it), a real
``tgnstream serve`` process per scenario, and probes that read what an operator would see
(gRPC replies, /metrics, /livez, /readyz, the server's log, its exit code).

Every test module here sets ``pytestmark = pytest.mark.faults``; ``make test-faults`` runs them
(CI: its own step); the default suite leaves them out.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaProducer

from tgnstream.apps.broker import EmbeddedBroker, free_port
from tgnstream.apps.testing import child_pids, serve_config_dict
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc
from tgnstream.stream.kafka_admin import create_topic

SMALL_MODEL = {"preset": "tgn", "memory_dim": 32, "seed": 0, "pair_features": True}
TOPIC = "events"


# ------------------------------------------------------------------------------------ broker
class Broker:
    """An embedded broker on a fixed port that can be stopped and started again (empty: the
    embedded broker keeps everything in memory, which is exactly a "broker replaced" fault)."""

    def __init__(self) -> None:
        self.port = free_port()
        self._broker: EmbeddedBroker | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, topic: str | None = TOPIC) -> Broker:
        self._broker = EmbeddedBroker(port=self.port, startup_timeout=30.0).start()
        if topic is not None:
            create_topic(self.bootstrap, topic, 1)
        return self

    def stop(self) -> None:
        if self._broker is not None:
            self._broker.stop()
            self._broker = None


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker().start()
    yield b
    b.stop()


def produce(bootstrap: str, values: list[bytes], topic: str = TOPIC) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20)
    for v in values:
        producer.send(topic, key=b"k", value=v)
    producer.flush(60)
    producer.close()


def event(src: str, dst: str, ts: float) -> bytes:
    return json.dumps({"src": src, "dst": dst, "ts": ts}).encode()


def stream(n: int, start_ts: float = 0.0, offset: int = 0) -> list[bytes]:
    """``n`` valid events: 50 users x 20 pages, one second apart."""
    return [event(f"u{(offset + i) % 50}", f"p{(offset + i) % 20}", start_ts + i) for i in range(n)]


# ------------------------------------------------------------------------------------ server
def server_config(tmp: Path, bootstrap: str, **sections) -> dict:
    return serve_config_dict(tmp, bootstrap, TOPIC, SMALL_MODEL, batch_max_wait_ms=100, **sections)


class Server:
    """``tgnstream serve`` as a child process, with probes."""

    def __init__(self, config: dict, tmp: Path, name: str = "server"):
        self.tmp = tmp
        self.config = config
        self.config_path = tmp / f"{name}.json"
        self.log_path = tmp / f"{name}.log"
        self.ready_file = Path(config["ready_file"])
        self.proc: subprocess.Popen | None = None
        self.ports: dict = {}
        self.token: str | None = None

    def start(self, wait: bool = True, timeout: float = 90.0, file_size_limit: int | None = None) -> Server:
        self.config_path.write_text(json.dumps(self.config))
        self.ready_file.unlink(missing_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0

        def limits():  # runs in the child before exec
            if file_size_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tgnstream", "serve", "--config", str(self.config_path)],
            stdout=open(self.log_path, "ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=limits,
        )
        if wait:
            deadline = time.monotonic() + timeout
            while not self.ready_file.exists():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not up after {timeout} s:\n{self.log()[-3000:]}")
                time.sleep(0.05)
            self.ports = json.loads(self.ready_file.read_text())
        return self

    # --------------------------------------------------------------------------- probes
    def log(self, since_start: bool = True) -> str:
        data = self.log_path.read_bytes()
        return (
            data[self._log_offset :].decode(errors="replace")
            if since_start
            else data.decode(errors="replace")
        )

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.ports['grpc_port']}")

    def stub(self, channel: grpc.Channel) -> pb_grpc.LinkPredictionStub:
        return pb_grpc.LinkPredictionStub(channel)

    def metadata(self):
        return [("authorization", f"Bearer {self.token}")] if self.token else None

    def info(self) -> pb.ModelInfo:
        with self.channel() as ch:
            return self.stub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=self.metadata())

    def wait_applied(self, at_least: int, timeout: float = 120.0) -> pb.ModelInfo:
        return wait_for(
            lambda: (i := self.info()).events_applied >= at_least and i, timeout, f"{at_least} events"
        )

    def wait_offset(self, offset: int, timeout: float = 120.0) -> pb.ModelInfo:
        return wait_for(
            lambda: (i := self.info()).next_offsets.get(0, 0) >= offset and i, timeout, f"offset {offset}"
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_for(lambda: self.http("/readyz")[0] == 200, timeout, f"readiness ({self.http('/readyz')[1]})")

    def health(self, service: str) -> int:
        with self.channel() as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    def http(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.ports['metrics_port']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str, **labels) -> float | None:
        """The value of one series from /metrics (None when absent)."""
        _, text = self.http("/metrics")
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$", line)
            if m is None or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
            if all(got.get(k) == str(v) for k, v in labels.items()):
                return float(m.group(4))
        return None

    def children(self) -> list[int]:
        return child_pids(self.proc.pid)

    def fetch_process(self) -> int:
        for pid in self.children():
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        raise AssertionError(f"no fetch process among {self.children()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 90.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for child in self.children():
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def servers(tmp_path) -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(config: dict, name: str = "server") -> Server:
        s = Server(config, tmp_path, name)
        made.append(s)
        return s

    yield make
    for s in made:
        s.kill()


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (grpc.RpcError, OSError) as e:  # not up yet, or restarting
            last_error, value = e, None
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"waited {timeout} s for {what} (last error: {last_error})")


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LINK_PREDICTION = pb.DESCRIPTOR.services_by_name["LinkPrediction"].full_name
