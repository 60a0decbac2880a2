"""Shared fixtures: a small real engine fed a synthetic stream with string ids, served over a
real gRPC server on 127.0.0.1 (port 0)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.core.step import TemporalStep
from tgnstream.core.synthetic import generate_stream
from tgnstream.model_server.config import GrpcConfig
from tgnstream.model_server.grpc_server import build_server, stop_server
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.metrics import ServerMetrics

SMALL = dict(memory_dim=16, time_dim=8, embedding_dim=16, num_neighbors=5, decoder_hidden=16)
NUM_SRC, NUM_DST, NUM_EVENTS, BATCH = 40, 25, 600, 100


def node_name(i: int) -> str:
    """External id of dense node ``i``: users then pages, as in a bipartite stream."""
    return f"user-{i}" if i < NUM_SRC else f"page-{i - NUM_SRC}"


def make_stream(num_events: int = NUM_EVENTS, seed: int = 1) -> EventBatch:
    return generate_stream(num_events, num_src=NUM_SRC, num_dst=NUM_DST, bipartite=True, seed=seed).events


def make_engine(pair_features: bool = True, seed: int = 0) -> MemoryEngine:
    """A fresh engine whose dense ids are those of ``make_stream`` (names registered in order)."""
    torch.manual_seed(seed)
    engine = MemoryEngine(ModelConfig.preset("tgn", pair_features=pair_features, **SMALL), capacity=8)
    engine.ids.lookup([node_name(i) for i in range(NUM_SRC + NUM_DST)], create=True)
    return engine.eval()


def feed(engine: MemoryEngine, stream: EventBatch, batch: int = BATCH) -> None:
    for i in range(0, len(stream), batch):
        TemporalStep(engine).apply(stream.slice(i, i + batch))


@dataclass
class Served:
    engine: MemoryEngine
    live: LiveEngine
    config: GrpcConfig
    metrics: ServerMetrics
    server: grpc.Server
    health: object
    port: int
    channel: grpc.Channel
    stub: pb_grpc.LinkPredictionStub


def serve(live: LiveEngine, config: GrpcConfig, **channel_kw) -> Served:
    metrics = ServerMetrics()
    server, health, port = build_server(live, config, metrics)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return Served(
        live.engine, live, config, metrics, server, health, port, channel, pb_grpc.LinkPredictionStub(channel)
    )


def shutdown(s: Served) -> None:
    s.channel.close()
    stop_server(s.server, s.health, 0)


TEST_CONFIG = dict(port=0, max_pairs=50, max_k=20, max_candidates=30, max_embed_nodes=40)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    engine = make_engine()
    feed(engine, make_stream())
    s = serve(LiveEngine(engine, "v-test", {0: 600}), GrpcConfig(**TEST_CONFIG))
    yield s
    shutdown(s)
