"""Two-stage TopK over large catalogs (``catalog.py``): recall against the exact ranking, an
index whose shortlist does not depend on the order of its updates, a brute-force reference for
what the ANN part of a shortlist holds, and the exact path kept below the threshold."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tgnstream.core.config import ModelConfig
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.modules import LinkDecoder
from tgnstream.core.retrieval import candidate_vectors, query_vectors, score_weights
from tgnstream.core.step import TemporalStep
from tgnstream.core.synthetic import generate_stream
from tgnstream.model_server import queries
from tgnstream.model_server.catalog import CatalogIndex, CatalogSettings
from tgnstream.model_server.convert import TopKQuery
from tgnstream.runtime.live import LiveEngine

from .conftest import BATCH, make_engine, make_stream, node_name


@dataclass(frozen=True)
class _Entry:
    """What ``CatalogIndex.sync`` reads of a ``CandidateEmbeddings``."""

    key: tuple
    nodes: torch.Tensor
    z: torch.Tensor
    signature: torch.Tensor | None = None


def _entries(d: int = 3000, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nodes = torch.arange(d) * 7 + 3
    z1 = torch.randn(d, dim, generator=g)
    z2 = z1.clone()
    z2[::5] = torch.randn(z2[::5].shape, generator=g)  # a later state: a fifth of the rows changed
    mid = z1.clone()
    mid[1::3] = torch.randn(mid[1::3].shape, generator=g)  # some other state in between
    return nodes, z1, mid, z2


def _decoder(dim: int = 16) -> LinkDecoder:
    torch.manual_seed(4)
    return LinkDecoder(dim, 12).eval()


@torch.no_grad()
def test_the_shortlist_does_not_depend_on_the_order_of_updates():
    nodes, z1, mid, z2 = _entries()
    dec = _decoder()
    settings = CatalogSettings(shortlist=50, nprobe=4)
    direct, detour, fresh = CatalogIndex(settings), CatalogIndex(settings), CatalogIndex(settings)
    direct.sync(_Entry((1, "m", 1), nodes, z1), dec)
    direct.sync(_Entry((1, "m", 3), nodes, z2), dec)
    detour.sync(_Entry((1, "m", 1), nodes, z1), dec)
    detour.sync(_Entry((1, "m", 2), nodes, mid), dec)
    detour.sync(_Entry((1, "m", 3), nodes, z2), dec)
    # A fresh index with the same quantizer (trained on the same first state), its rows added in
    # another order: the quantizer comes from z1, the rows from z2 in reverse.
    fresh.sync(_Entry((1, "m", 1), nodes, z1), dec)
    fresh.sync(_Entry((1, "m", 2), nodes, z2 * 0 + z1[0]), dec)  # every row changes
    fresh.sync(_Entry((1, "m", 3), nodes, z2), dec)
    assert direct.trained == detour.trained == fresh.trained == 1
    assert detour.rows_added > direct.rows_added > nodes.numel()
    z_src = torch.randn(12, 16, generator=torch.Generator().manual_seed(9))
    a, b, c = (ix.shortlist(dec, z_src, 10) for ix in (direct, detour, fresh))
    for x, y, w in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, w)
    # Batching does not matter either: one source at a time gives the same lists.
    for p in range(3):
        assert torch.equal(direct.shortlist(dec, z_src[p : p + 1], 10)[0], a[p])


@torch.no_grad()
def test_the_ann_shortlist_is_the_exact_top_m_of_the_probed_lists():
    """Reference by brute force: every vector's nearest centroid, the query's best centroids and
    the top M of the float64 scores over those lists, in plain loops."""
    nodes, z1, _, z2 = _entries(d=1500)
    dec = _decoder()
    index = CatalogIndex(CatalogSettings(shortlist=40, nprobe=3))
    index.sync(_Entry((1, "m", 1), nodes, z1), dec)
    index.sync(_Entry((1, "m", 2), nodes, z2), dec)
    cents = index._centroids.double()
    x = candidate_vectors(dec, z2).double()
    home = []
    for row in x:
        dist = [float(((row - c) ** 2).sum()) for c in cents]
        home.append(min(range(len(dist)), key=lambda i: (dist[i], i)))
    z_src = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    got = index.shortlist(dec, z_src, 10)
    for p in range(5):
        y = query_vectors(dec, z_src[p : p + 1], index._gates)[0].double()
        q = score_weights(dec, y.unsqueeze(0).float())[0]
        by_centroid = [float((c * y).sum()) for c in cents]
        probed = sorted(range(len(cents)), key=lambda i: (-by_centroid[i], i))[:3]
        pool = [
            (float((z2[r].double() * q).sum()), int(nodes[r])) for r in range(len(home)) if home[r] in probed
        ]
        want = [n for _, n in sorted(pool, key=lambda sn: (-sn[0], sn[1]))[:40]]
        assert got[p].tolist() == want


def _catalog_engine(num_dst: int, events: int):
    torch.manual_seed(0)
    # Untrained weights: the activity features' random recency preferences would rank old
    # candidates first (a trained model prefers recent ones, docs/topk-catalog.md), so this model
    # has pair features without them.
    config = ModelConfig.preset(
        "tgn",
        pair_features=True,
        memory_dim=16,
        time_dim=8,
        embedding_dim=16,
        num_neighbors=5,
        decoder_hidden=16,
    )
    engine = MemoryEngine(config, capacity=1024).eval()
    num_src = num_dst // 2
    engine.ids.lookup([f"n{i}" for i in range(num_src + num_dst)], create=True)
    stream = generate_stream(events, num_src=num_src, num_dst=num_dst, activity_exponent=0.6, seed=3).events
    with torch.no_grad():
        for i in range(0, events, 2000):
            TemporalStep(engine).apply(stream.slice(i, min(i + 2000, events)))
    engine.fold_pending()
    return engine, stream


def _ask(live, cache, names, k=10, exclude_seen=False):
    return queries.top_k_batch(live, [TopKQuery(n, k, None, exclude_seen, None, False) for n in names], cache)


def test_two_stage_recall_at_10_against_the_exact_ranking():
    engine, stream = _catalog_engine(10_000, 60_000)
    live = LiveEngine(engine, "v", {0: len(stream)})
    exact = queries.CandidateCache(candidate_time="last_change")
    two = queries.CandidateCache(candidate_time="last_change", catalog=CatalogSettings(threshold=1000))
    sources = [f"n{i}" for i in torch.unique(stream.src[-2000:])[:40].tolist()]
    assert exact.get(live, engine).nodes.numel() > 5000
    hits = total = 0
    for exclude in (False, True):
        for a, b in zip(
            _ask(live, exact, sources, exclude_seen=exclude), _ask(live, two, sources, exclude_seen=exclude)
        ):
            hits += len(set(a.ids) & set(b.ids))
            total += len(a.ids)
    assert two.catalog is not None and two.catalog.trained == 1
    assert hits / total >= 0.95


def test_below_the_threshold_answers_are_todays_exact_ones():
    engine = make_engine()
    stream = make_stream()
    for i in range(0, len(stream), BATCH):
        TemporalStep(engine).apply(stream.slice(i, i + BATCH))
    live = LiveEngine(engine, "v-test", {0: len(stream)})
    cache = queries.CandidateCache()
    names = [node_name(u) for u in range(8)]
    replies = _ask(live, cache, names, k=5)
    assert cache.catalog is None  # the two-stage path was never taken
    t = float(engine.watermark)
    for u, reply in enumerate(replies):
        ids, _ = engine.top_k(u, t, 5)
        assert reply.ids == [node_name(i) for i in ids.tolist()]


def test_a_shortlist_covering_the_catalog_answers_like_the_exact_path():
    engine = make_engine()
    stream = make_stream()
    for i in range(0, len(stream), BATCH):
        TemporalStep(engine).apply(stream.slice(i, i + BATCH))
    live = LiveEngine(engine, "v-test", {0: len(stream)})
    names = [node_name(u) for u in range(10)]
    # Over a catalog, candidates are embedded as of their last change (CandidateCache.mode_for).
    exact = _ask(live, queries.CandidateCache(candidate_time="last_change"), names, k=5, exclude_seen=True)
    two = _ask(
        live, queries.CandidateCache(catalog=CatalogSettings(threshold=1, shortlist=100)), names, 5, True
    )
    for a, b in zip(exact, two):
        assert a.ids == b.ids
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)


def test_the_servicer_takes_its_catalog_settings_from_the_grpc_config():
    from tgnstream.apps.testing import small_engine
    from tgnstream.model_server.config import GrpcConfig
    from tgnstream.model_server.servicer import LinkPredictionServicer
    from tgnstream.runtime.live import LiveEngine

    config = GrpcConfig(topk_catalog_threshold=1234, topk_shortlist=77, topk_recent=5, topk_popular=6)
    servicer = LinkPredictionServicer(LiveEngine(small_engine(), "v"), config)
    got = servicer.cache.catalog_settings
    assert (got.threshold, got.shortlist, got.recent, got.popular) == (1234, 77, 5, 6)


def test_candidate_times_follow_the_catalog_size():
    cache = queries.CandidateCache(catalog=CatalogSettings(threshold=100))
    assert cache.mode_for(99) == "query" and cache.mode_for(100) == "last_change"
