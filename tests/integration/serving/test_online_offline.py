"""Online == offline: after ingesting a prefix through Kafka, gRPC answers equal the engine's
offline answers for the same weights, prefix and batch boundaries."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from tgnstream.apps.serve import ServingProcess
from tgnstream.apps.serve_config import ServeConfig
from tgnstream.rpc.v1 import link_prediction_pb2 as pb
from tgnstream.rpc.v1 import link_prediction_pb2_grpc as pb_grpc

from .conftest import event_values, produce, reference_engine, serve_config

pytestmark = pytest.mark.kafka

PREFIX = 3_000
BATCH = 500


@pytest.fixture
def served_prefix(kafka_bootstrap, kafka_topic, wikipedia_csv, tmp_path):
    produce(kafka_bootstrap, kafka_topic, event_values(wikipedia_csv, PREFIX))
    proc = ServingProcess(ServeConfig(**serve_config(tmp_path, kafka_bootstrap, kafka_topic)))
    proc.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}")
    stub = pb_grpc.LinkPredictionStub(channel)
    deadline = time.monotonic() + 60
    while stub.GetModelInfo(pb.GetModelInfoRequest()).events_applied < PREFIX:
        assert time.monotonic() < deadline, "prefix not ingested in 60 s"
        time.sleep(0.05)
    yield proc, stub
    channel.close()
    proc.stop()


def test_score_topk_embed_equal_the_offline_engine(served_prefix, wikipedia_csv):
    proc, stub = served_prefix
    ref = reference_engine(wikipedia_csv, PREFIX, BATCH)
    names = list(ref.ids._index)  # every external id, in dense order
    g = torch.Generator().manual_seed(0)
    src = torch.randint(len(names), (200,), generator=g)
    dst = torch.randint(len(names), (200,), generator=g)
    t = float(ref.watermark) + 3600.0
    reply = stub.Score(
        pb.ScoreRequest(
            pairs=[pb.Pair(src=names[s], dst=names[d]) for s, d in zip(src.tolist(), dst.tolist())], time=t
        )
    )
    want = ref.score(src, dst, torch.full((200,), t, dtype=torch.float64))
    torch.testing.assert_close(torch.tensor(list(reply.probabilities)), want.float(), rtol=0, atol=1e-5)
    assert not any(reply.src_unknown) and not any(reply.dst_unknown)
    assert reply.state.events_applied == PREFIX and reply.state.watermark == float(ref.watermark)

    # TopK at the watermark over every destination: same ids, same order, same probabilities.
    user = names[0]  # the first event's source: a user with history
    top = stub.TopK(pb.TopKRequest(src=user, k=10))
    ids, probs = ref.top_k(names.index(user), float(ref.watermark), 10)
    assert [r.id for r in top.results] == [names[i] for i in ids.tolist()]
    torch.testing.assert_close(
        torch.tensor([r.probability for r in top.results]), probs.float(), rtol=0, atol=1e-5
    )

    emb = stub.Embed(pb.EmbedRequest(nodes=names[:5], time=t))
    want_emb = ref.embed(torch.arange(5), torch.full((5,), t, dtype=torch.float64))
    torch.testing.assert_close(
        torch.tensor([list(e.values) for e in emb.embeddings]), want_emb, rtol=0, atol=1e-5
    )


def test_unknown_ids_are_cold_start_and_flagged(served_prefix, wikipedia_csv):
    _, stub = served_prefix
    ref = reference_engine(wikipedia_csv, PREFIX, BATCH)
    names = list(ref.ids._index)
    t = float(ref.watermark)
    reply = stub.Score(pb.ScoreRequest(pairs=[pb.Pair(src="never-seen-user", dst=names[1])], time=t))
    assert list(reply.src_unknown) == [True] and list(reply.dst_unknown) == [False]
    cold, _ = ref.ids.lookup(["never-seen-user"])  # an id with no events: cold start by definition
    want = ref.score(cold, torch.tensor([1]), torch.tensor([t], dtype=torch.float64))
    assert abs(reply.probabilities[0] - float(want)) < 1e-5
