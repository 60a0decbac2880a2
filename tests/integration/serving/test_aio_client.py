"""``tgnstream.aio_client.AsyncLinkPredictionClient`` against a live server: the replies of the
sync client, concurrent calls on one channel, the token, per-call deadlines, errors that
retrying cannot fix raised at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from tgnstream.aio_client import AsyncLinkPredictionClient
from tgnstream.client import LinkPredictionClient

from .conftest import event_values, produce, serve_config

pytestmark = pytest.mark.kafka

WIKI = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "wikipedia.csv"


def test_async_client_against_a_live_server(tmp_path, kafka_bootstrap, kafka_topic, server_factory):
    produce(kafka_bootstrap, kafka_topic, event_values(WIKI, 600))
    cfg = serve_config(tmp_path, kafka_bootstrap, kafka_topic, grpc={"auth_token": "s3cret"})
    server = server_factory(cfg).start()
    target = f"127.0.0.1:{server.ports['grpc_port']}"
    with LinkPredictionClient(target, token="s3cret") as sync:
        deadline = time.monotonic() + 60
        while sync.model_info().events_applied < 600:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        expected_score = sync.score([("0", "8227"), ("nobody", "8227")], time=2_000.0)
        expected_top = sync.top_k("0", k=3, exclude_seen=True)

    async def main():
        async with AsyncLinkPredictionClient(target, token="s3cret", retries=3) as client:
            assert await client.health() == "SERVING"
            score, top, emb, info = await asyncio.gather(
                client.score([("0", "8227"), ("nobody", "8227")], time=2_000.0),
                client.top_k("0", k=3, exclude_seen=True),
                client.embed([str(i) for i in range(10_000)], timeout_s=60),
                client.model_info(timeout_s=10),
            )
            assert list(score.probabilities) == list(expected_score.probabilities)
            assert [r.id for r in top.results] == [r.id for r in expected_top.results]
            assert len(emb.embeddings) == 10_000 and emb.dim > 0
            assert info.events_applied == 600
            many = await asyncio.gather(*(client.top_k(str(u), k=5) for u in range(20)))
            assert all(len(r.results) == 5 for r in many)
        async with AsyncLinkPredictionClient(target, retries=5, backoff_s=1.0) as anonymous:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                await anonymous.model_info()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() - t0 < 1.0

    asyncio.run(main())
