"""A flood of new node ids under a query load (issue 26, item 2): the state grows by hundreds
of thousands of nodes (reallocations of every per-node buffer, the pair table and the id map,
re-attached by the reader processes) while Score and TopK keep answering within their deadline."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from confluent_kafka import Producer

from tgnstream.rpc.v1 import link_prediction_pb2 as pb

from .conftest import TOPIC, produce, server_config, stream

pytestmark = pytest.mark.faults

NEW_ID_EVENTS = 150_000  # 300,000 new nodes


class Probes(threading.Thread):
    """Score and TopK on known nodes, back to back, with a 10 s deadline (the fault suite's)."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.done = server, threading.Event()
        self.latencies, self.score_latencies, self.errors = [], [], []
        self.topk = True

    def run(self) -> None:
        with self.server.channel() as ch:
            stub = self.server.stub(ch)
            while not self.done.is_set():
                t0 = time.perf_counter()
                try:
                    stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src="u1", dst="p1")]), timeout=10)
                    self.score_latencies.append(time.perf_counter() - t0)
                    if self.topk:
                        stub.TopK(pb.TopKRequest(src="u2", k=5), timeout=10)
                    self.latencies.append(time.perf_counter() - t0)
                except grpc.RpcError as e:
                    self.errors.append(e.code())
                time.sleep(0.01)


def test_a_flood_of_new_ids_does_not_stall_queries(broker, servers, tmp_path):
    produce(broker.bootstrap, stream(2000))
    server = servers(server_config(tmp_path, broker.bootstrap, grpc={"readers": 2})).start()
    server.wait_offset(2000)
    probes = Probes(server)
    probes.start()
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20})
    for i in range(NEW_ID_EVENTS):  # every event two new ids, times after the first stream's
        producer.produce(TOPIC, f'{{"src":"new-a{i}","dst":"new-b{i}","ts":{2000 + i * 0.01}}}'.encode())
        if i % 10_000 == 0:
            producer.poll(0)
    producer.flush(60)
    started = time.monotonic()
    info = server.wait_offset(2000 + NEW_ID_EVENTS, timeout=300)
    took = time.monotonic() - started
    probes.done.set()
    probes.join(30)
    lat = sorted(probes.latencies)
    p99 = lat[int(0.99 * (len(lat) - 1))] if lat else float("nan")
    scores = sorted(probes.score_latencies)
    print(
        f"{info.num_nodes:,} nodes after the flood ({took:.0f} s to apply); {len(lat)} probe rounds "
        f"(Score + TopK), p50 {lat[len(lat) // 2] * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, max "
        f"{lat[-1] * 1e3:.0f} ms; Score alone p50 {scores[len(scores) // 2] * 1e3:.0f} ms, max "
        f"{scores[-1] * 1e3:.0f} ms; errors {probes.errors[:5]}"
    )
    assert info.num_nodes >= 2 * NEW_ID_EVENTS
    assert not probes.errors, probes.errors[:5]
    assert len(lat) > 10
