"""TopK candidates embedded as of their neighbourhood's last change (``topk_candidate_time:
last_change``): the times and signatures against a naive per-event reference, embeddings that
do not change while the signature does not, and a cache that recomputes only what changed yet
answers like a from-scratch ranking."""

from __future__ import annotations

import torch

from tgnstream.core.step import TemporalStep
from tgnstream.model_server import queries
from tgnstream.model_server.convert import TopKQuery
from tgnstream.runtime.live import LiveEngine

from .conftest import BATCH, make_engine, make_stream, node_name


def _naive_last_change(stream, upto: int, num_nodes: int, k: int):
    """Per node: the newest event time of it and of its K most recent partners, and the events of
    the same nodes counted (a partner repeated in the K counts once per slot), by a plain loop."""
    entries: list[list[tuple[int, float]]] = [[] for _ in range(num_nodes)]
    for i in range(upto):
        s, d, t = int(stream.src[i]), int(stream.dst[i]), float(stream.t[i])
        entries[s].append((d, t))
        entries[d].append((s, t))
    latest = [max((t for _, t in e), default=float("-inf")) for e in entries]
    times, sig = [], []
    for n in range(num_nodes):
        recent = entries[n][-k:]
        times.append(max([latest[n]] + [latest[p] for p, _ in recent]))
        sig.append(len(entries[n]) + sum(len(entries[p]) for p, _ in recent))
    return torch.tensor(times, dtype=torch.float64), torch.tensor(sig)


def test_last_change_matches_a_naive_per_event_reference():
    stream = make_stream()
    engine = make_engine()
    n = len(engine.ids)
    engine.ensure_capacity(n)
    nodes = torch.arange(n)
    done = 0
    for upto in (0, BATCH, 3 * BATCH, len(stream)):
        for i in range(done, upto, BATCH):
            TemporalStep(engine).apply(stream.slice(i, min(i + BATCH, upto)))
        done = upto
        times, sig = engine.last_change(nodes)
        want_t, want_sig = _naive_last_change(stream, upto, n, engine.neighbors.k)
        assert torch.equal(times, want_t), upto
        assert torch.equal(sig, want_sig), upto


def _feed_to(engine, stream, upto):
    for i in range(0, upto, BATCH):
        TemporalStep(engine).apply(stream.slice(i, min(i + BATCH, upto)))


def test_an_unchanged_signature_means_an_unchanged_embedding():
    stream = make_stream()
    engine = make_engine()
    previous = None
    kept_total = changed_total = 0
    for upto in range(BATCH, len(stream) + 1, BATCH):
        TemporalStep(engine).apply(stream.slice(upto - BATCH, upto))
        nodes = engine.destinations()
        _, sig = engine.last_change(nodes)
        z = engine.embed(nodes, engine.candidate_times(nodes, float(engine.watermark), "last_change"))
        if previous is not None:
            p_nodes, p_sig, p_z = previous
            rows = torch.searchsorted(p_nodes, nodes).clamp(max=p_nodes.numel() - 1)
            same = (p_nodes[rows] == nodes) & (p_sig[rows] == sig)
            kept_total += int(same.sum())
            changed_total += int((~same).sum())
            # Same inputs and time: the same embedding (to float rounding of a different batch).
            assert torch.allclose(z[same], p_z[rows[same]], atol=1e-6)
        previous = nodes, sig, z
    assert kept_total > 0 and changed_total > 0


def test_the_cache_recomputes_only_changed_candidates_and_answers_like_a_full_ranking():
    stream = make_stream()
    engine = make_engine()
    _feed_to(engine, stream, 400)
    live = LiveEngine(engine, "v-test", {0: 400})
    cache = queries.CandidateCache(candidate_time="last_change")
    first = cache.get(live, engine)
    d0 = first.nodes.numel()
    assert cache.computed == d0 and cache.reused == 0
    with live.write() as e:
        TemporalStep(e).apply(stream.slice(400, 420))  # a small batch reaches few neighbourhoods
    second = cache.get(live, engine)
    assert second is not first
    assert cache.reused > 0, "nothing carried over"
    assert cache.computed - d0 < second.nodes.numel(), "every candidate recomputed"
    # The entry is what embedding every candidate from scratch at its last change gives.
    t = float(engine.watermark)
    full = engine.embed(second.nodes, engine.candidate_times(second.nodes, t, "last_change"))
    assert torch.allclose(second.z, full, atol=1e-6)
    # And TopK through the cache ranks like MemoryEngine.rank_logits with the same setting.
    for user in range(6):
        reply = queries.top_k(live, TopKQuery(node_name(user), 5, None, False, None, False), cache)
        s = torch.tensor([user])
        logits = engine.rank_logits(
            s, torch.tensor([t], dtype=torch.float64), second.nodes, t, candidate_time="last_change"
        )[0]
        want = second.nodes[torch.topk(logits, 5).indices]
        assert reply.ids == [node_name(i) for i in want.tolist()]


def test_query_mode_is_unchanged_by_the_setting_default():
    stream = make_stream()
    engine = make_engine()
    _feed_to(engine, stream, 600)
    nodes = engine.destinations()
    t = float(engine.watermark)
    at_query = engine.candidate_times(nodes, t)
    assert torch.equal(at_query, torch.full_like(at_query, t))
    later = engine.candidate_times(nodes, t, "last_change")
    assert bool((later <= t).all()) and bool((later < t).any())


def test_an_entry_copied_from_another_reader_is_a_base_for_later_refreshes():
    """With reader processes one reader publishes a state's entry and another copies it; the
    copy gets the state's signatures, so the copying reader's next refresh reuses its rows."""
    import multiprocessing

    from tgnstream.runtime.shared_state import SharedCandidates

    stream = make_stream()
    engine = make_engine()
    _feed_to(engine, stream, 400)
    store = SharedCandidates(
        64, engine.config.embedding_dim, torch.device("cpu"), multiprocessing.get_context()
    )
    builder_live, copier_live = (LiveEngine(engine, "v-test", {0: 400}) for _ in range(2))
    for live in (builder_live, copier_live):
        live.candidate_store = store
    builder = queries.CandidateCache(candidate_time="last_change")
    copier = queries.CandidateCache(candidate_time="last_change")
    built = builder.get(builder_live, engine)
    copied = copier.get(copier_live, engine)
    assert copier.shared_hits == 1 and copier.computed == 0
    assert torch.equal(copied.z, built.z) and copied.signature is not None
    with copier_live.write() as e:
        TemporalStep(e).apply(stream.slice(400, 420))
    store.meta[1] = -1  # nothing to copy for the new state: the copier builds it itself
    refreshed = copier.get(copier_live, engine)
    assert copier.reused > 0 and copier.computed < refreshed.nodes.numel()
    full = engine.embed(
        refreshed.nodes, engine.candidate_times(refreshed.nodes, float(engine.watermark), "last_change")
    )
    assert torch.allclose(refreshed.z, full, atol=1e-6)
