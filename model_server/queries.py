"""What each RPC computes: pure functions of (LiveEngine, parsed query) -> result dataclasses.

Every function takes the read lock once, and computes its answer and the ``StateStamp`` inside
it, so a reply always describes one complete state (never a half-applied batch). Readers never
mutate state or grow buffers: unknown ids go to the cold-start slot (``LiveEngine.resolve``).

Batched forms (``score_batch``, ``top_k_batch``) answer several queries under one lock with
shared engine calls (``coalesce.py`` feeds them); same-time queries only, so every answer equals
the one-query answer.

TopK semantics (candidate-embedding cache). Embedding all ~1,000 candidates with temporal
attention costs 30-45 ms on 2 cores, so candidate embeddings are computed once per *state
version* (engine object, model version, events applied) **at the state's watermark** (0.0
before any event), and reused by every TopK until the next batch is applied. A TopK at query
time ``t`` therefore combines

* the source embedding at ``t``,
* every candidate's embedding at the watermark (explicit candidates too, so a reply does not
  depend on whether the cache was warm),
* pair features (when the model has them) at ``t``.

With the default time (``t`` = watermark) this is exactly ``MemoryEngine.top_k(src, t, ...)``;
for another ``t`` it is ``MemoryEngine.rank_logits(src, t, candidates, t_candidates=watermark)``.
Both decode with ``MemoryForward.rank_forward``, the one ranker (evaluation's too); this module
only chooses the embeddings it is given (cached candidates) and what a reply drops.
The cache keeps the newest version only; at most one computation per version runs, however
many requests miss at once (the others wait for it).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from tgnstream.core.engine import MemoryEngine
from tgnstream.core.events import EventBatch
from tgnstream.model_server.catalog import CatalogIndex, CatalogSettings, PairPartners
from tgnstream.model_server.convert import EmbedQuery, RequestError, ScoreQuery, TopKQuery
from tgnstream.runtime.live import LiveEngine, StateStamp

__all__ = [
    "CandidateCache",
    "CacheWarmer",
    "CandidateEmbeddings",
    "NonFiniteResult",
    "ScoreResult",
    "TopKResult",
    "EmbedResult",
    "ModelInfoResult",
    "score",
    "score_batch",
    "top_k",
    "top_k_batch",
    "embed",
    "model_info",
    "state_time",
    "model_name",
    "embedding_dim",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ScoreResult:
    """``probabilities [B]`` float32, ``src_unknown``/``dst_unknown [B]`` bool (CPU tensors)."""

    probabilities: torch.Tensor
    src_unknown: torch.Tensor
    dst_unknown: torch.Tensor
    stamp: StateStamp


@dataclass(frozen=True)
class TopKResult:
    """Best first, at most k: ``ids[i]`` with ``probabilities[i]``, ``unknown[i]`` = cold start."""

    ids: list[str]
    probabilities: list[float]
    unknown: list[bool]
    src_unknown: bool
    stamp: StateStamp


@dataclass(frozen=True)
class EmbedResult:
    """``values [M, dim]`` float32 CPU, ``unknown [M]`` bool, rows in request order."""

    ids: list[str]
    values: torch.Tensor
    unknown: torch.Tensor
    dim: int
    stamp: StateStamp


@dataclass(frozen=True)
class ModelInfoResult:
    stamp: StateStamp
    num_nodes: int
    model: str
    embedding_dim: int
    device: str
    next_offsets: dict[int, int]


class NonFiniteResult(RuntimeError):
    """The model produced a NaN/inf for this request (damaged weights or state): the reply is
    refused (INTERNAL), never sent as OK. ``where``: score, topk or embed."""

    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.where = where


# ----------------------------------------------------------------------------------- helpers
def check_time(engine: MemoryEngine, t: float | None, slack: float | None) -> None:
    """``RequestError`` unless ``t`` (None: the default time) lies within
    [first event - slack, watermark + slack]; before any event every time is allowed (there is
    nothing to be inconsistent with, and every node answers as cold start)."""
    if t is None or slack is None:
        return
    first, wm = float(engine.first_event_time), float(engine.watermark)
    if wm == float("-inf"):
        return
    if not first - slack <= t <= wm + slack:
        raise RequestError(
            f"time {t!r} is outside the span this state can answer for: [{first - slack!r}, "
            f"{wm + slack!r}] (first event {first!r} and watermark {wm!r}, each +- "
            f"query_time_slack_s={slack:g})"
        )


def _finite_or_raise(values: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteResult(
            where,
            f"the model produced a non-finite {where} result (NaN/inf in its weights or state); not returned",
        )


def state_time(engine: MemoryEngine) -> float:
    """The applied state's watermark (latest applied event time), or 0.0 before any event:
    the time candidate embeddings are computed at."""
    wm = float(engine.watermark)
    return wm if wm != float("-inf") else 0.0


def query_time(stamp: StateStamp) -> float:
    """The default time of a query: the latest event time it reflects (open batch included),
    or 0.0 before any event."""
    return stamp.watermark if stamp.watermark != float("-inf") else 0.0


def model_name(engine: MemoryEngine) -> str:
    return engine.config.label


def embedding_dim(engine: MemoryEngine) -> int:
    cfg = engine.config
    return cfg.embedding_dim if cfg.embedding == "attention" else cfg.memory_dim


def _ensure_eval(engine: MemoryEngine) -> None:
    # An engine built or loaded for serving starts in training mode (nn.Module default), which
    # would apply attention dropout to replies. Setting the flag is idempotent and touches no
    # state, so a reader may do it; the composition root should call engine.eval() anyway.
    if engine.training:
        log.warning("serving engine was in training mode (dropout on); switching it to eval()")
        engine.eval()


def _full(n: int, t: float, device: torch.device) -> torch.Tensor:
    return torch.full((n,), t, dtype=torch.float64, device=device)


# ------------------------------------------------------------------------- candidate cache
@dataclass(frozen=True)
class CandidateEmbeddings:
    """Embeddings of every destination of one state version, at that state's watermark (or,
    with ``last_change`` candidate times, each at the time its neighbourhood last changed).

    key: ``(id(engine), model_version, events_applied)``; time: the watermark (0.0 before any
    event); nodes: ``[D]`` sorted int64 ids; z: ``[D, d_emb]``; signature: ``[D]`` int64 (see
    ``MemoryEngine.last_change``; ``last_change`` entries only): rows whose signature is the
    same in a later state need no recomputation.
    """

    key: tuple
    time: float
    nodes: torch.Tensor
    z: torch.Tensor
    built_at: float = 0.0  # time.monotonic() when computed
    signature: torch.Tensor | None = None


class CandidateCache:
    """Thread-safe, newest-version-only cache of ``CandidateEmbeddings``. Call under the read
    lock (the key must describe the state being read)."""

    def __init__(
        self, max_age_s: float = 0.0, candidate_time: str = "query", catalog: CatalogSettings | None = None
    ) -> None:
        # Two-stage TopK over large catalogs (catalog.py): settings, and the index kept in step
        # with this cache's entries (made on first use).
        self.catalog_settings = catalog or CatalogSettings()
        self.catalog: CatalogIndex | None = None
        self.partners = PairPartners()
        # max_age_s > 0 lets an entry of an older version of the same engine and model serve
        # for that long (bounded staleness: under a live feed every applied batch would cost a
        # rebuild); 0 keeps replies exact for every version.
        self.max_age_s = max_age_s
        # "last_change" embeds each candidate as of its neighbourhood's last change, so a new
        # version recomputes only the candidates a batch reached (MemoryEngine.candidate_times).
        if candidate_time not in ("query", "last_change"):
            raise ValueError(f"candidate_time must be 'query' or 'last_change', got {candidate_time!r}")
        self.candidate_time = candidate_time
        self.computed = 0  # candidate embeddings computed here (all kinds of entries)
        self.reused = 0  # candidate embeddings carried over from an older entry (last_change)
        self._lock = threading.Lock()
        self._entry: CandidateEmbeddings | None = None
        self._building: dict[tuple, Future] = {}
        self.builds = 0  # entries computed here
        self.shared_hits = 0  # entries copied from another reader process (candidate_store)
        # With reader processes: how long to wait for another reader's entry before building.
        self.shared_wait_s = 0.25
        self.last_used = float("-inf")  # time.monotonic() of the last get() (the warmer's cue)

    def mode_for(self, candidates: int) -> str:
        """The candidate times of an entry over ``candidates`` destinations: the configured ones
        below the catalog threshold; from it on ``last_change``, so that a new state version
        recomputes only the candidates its batch reached (re-embedding a whole catalog per applied
        batch cannot keep up with a feed) and the ANN index updates only those rows."""
        return self.candidate_time if candidates < self.catalog_settings.threshold else "last_change"

    @staticmethod
    def key(live: LiveEngine, engine: MemoryEngine) -> tuple:
        return (id(engine), live.model_version, int(engine.events_applied))

    def peek(self, key: tuple, exact: bool = False) -> CandidateEmbeddings | None:
        """The entry for ``key``; unless ``exact``, also an older version's within ``max_age_s``."""
        entry = self._entry
        if entry is None:
            return None
        if entry.key == key:
            return entry
        if exact:
            return None
        fresh_enough = time.monotonic() - entry.built_at <= self.max_age_s
        return entry if self.max_age_s > 0 and entry.key[:2] == key[:2] and fresh_enough else None

    def get(self, live: LiveEngine, engine: MemoryEngine, use: bool = True) -> CandidateEmbeddings:
        """The entry for the current state, computing it if needed (once per key: concurrent
        callers wait for the first one's result). ``use``: a query's (not a warm-up's) call."""
        key = self.key(live, engine)
        if use:
            self.last_used = time.monotonic()
        with self._lock:
            entry = self.peek(key)
            if entry is not None:
                return entry
            fut = self._building.get(key)
            owner = fut is None
            if owner:
                fut = self._building[key] = Future()
        if not owner:
            return fut.result()
        try:
            entry, valid = self._build(live, engine, key)
        except BaseException as exc:
            with self._lock:
                del self._building[key]
            fut.set_exception(exc)
            raise
        with self._lock:
            # A reader process's view computes optimistically: an entry whose inputs were
            # copied while the writer changed the state is returned (the caller's attempt is
            # discarded and retried) but never kept.
            if valid:
                self._entry = entry
            del self._building[key]
        fut.set_result(entry)
        return entry

    def _build(self, live: LiveEngine, engine: MemoryEngine, key: tuple) -> tuple[CandidateEmbeddings, bool]:
        """The entry and whether it describes the state of ``key``: computed here, or, with
        reader processes, copied from the reader that computed it (one computes a state's entry
        at a time: the store's build lock; the others wait for it)."""
        store = live.candidate_store
        events = int(engine.events_applied)
        building = False
        if store is not None:
            deadline = time.monotonic() + self.shared_wait_s
            while True:
                got = store.load(live.generation, events)
                if got is not None:
                    t, nodes, z = got
                    self.shared_hits += 1
                    if self.mode_for(nodes.numel()) == "query":
                        return CandidateEmbeddings(key, t, nodes, z, time.monotonic()), True
                    # The signature that goes with it is the state's, read now: keep the entry
                    # (as the base of later refreshes) only if the state is still that one.
                    _, sig = engine.last_change(nodes)
                    return CandidateEmbeddings(key, t, nodes, z, time.monotonic(), sig), live.still_valid()
                building = store.lock.acquire(block=False)
                if building or time.monotonic() >= deadline or not live.still_valid():
                    break  # build it here (or the state moved on: this attempt is lost anyway)
                time.sleep(0.0005)
        try:
            t = state_time(engine)
            nodes = engine.destinations()
            mode = self.mode_for(nodes.numel())
            with torch.inference_mode():
                # Copy what the embeddings read (fast), check that it is one state, then compute
                # from the copies: a batch applied meanwhile cannot spoil the entry.
                sig = todo = None
                if mode == "last_change":  # candidate_times's rule, with one pass over the table
                    times, sig = engine.last_change(nodes)
                    times = torch.where(torch.isfinite(times), times, torch.full_like(times, t))
                else:
                    times = engine.candidate_times(nodes, t, mode)
                if mode == "last_change":
                    base, base_rows, kept = self._unchanged(key, nodes, sig)
                    todo = (~kept).nonzero().squeeze(1)
                    inputs, rows = engine.embed_inputs(nodes[todo], times[todo])
                else:
                    inputs, rows = engine.embed_inputs(nodes, times)
                valid = live.still_valid()
                fresh = engine.embed_forward(inputs, engine.fold(rows))
                if todo is None:
                    z = fresh
                else:
                    z = fresh.new_empty(nodes.numel(), fresh.shape[1])
                    z[todo] = fresh
                    if bool(kept.any()):
                        z[kept] = base.z.index_select(0, base_rows[kept])
                    self.reused += int(kept.sum())
                self.computed += int(fresh.shape[0])
            if building and valid:
                store.publish(live.generation, events, t, nodes, z)
        finally:
            if building:
                store.lock.release()
        self.builds += 1
        return CandidateEmbeddings(key, t, nodes, z, time.monotonic(), sig), valid

    def _unchanged(self, key: tuple, nodes: torch.Tensor, sig: torch.Tensor):
        """For ``nodes [D]`` with signatures ``sig [D]``: the kept entry (the base), their rows
        in it and whether each row can be reused (same engine and model, node and signature)."""
        base = self._entry
        if base is None or base.signature is None or base.key[:2] != key[:2] or base.nodes.numel() == 0:
            return base, torch.zeros_like(nodes), torch.zeros_like(nodes, dtype=torch.bool)
        rows = torch.searchsorted(base.nodes, nodes).clamp(max=base.nodes.numel() - 1)
        same = (base.nodes[rows] == nodes) & (base.signature[rows] == sig)
        return base, rows, same

    def warm(self, live: LiveEngine) -> None:
        """Compute the entry for the live state now (e.g. right after a batch is applied), so
        the next TopK does not pay for it."""

        def build() -> None:
            with live.read() as engine:
                self.get(live, engine, use=False)

        live.consistent(build)


class CacheWarmer(threading.Thread):
    """Background thread that rebuilds the candidate cache as soon as a new state version
    appears, so that TopK requests after each applied batch do not pay for it (~45 ms for the
    1,000 wikipedia pages on 2 cores). It only works while TopK is in use (a default-candidate
    TopK within ``idle_s``), so a server without TopK traffic spends nothing on it.

    Checks every ``poll_s``; ``stop()`` ends it. Reads the version without the lock: only a cue,
    ``warm`` takes the read lock and keys the entry properly.
    """

    def __init__(self, live: LiveEngine, cache: CandidateCache, poll_s: float = 0.005, idle_s: float = 30.0):
        super().__init__(name="topk-cache-warmer", daemon=True)
        self._live, self._cache = live, cache
        self._poll_s, self._idle_s = poll_s, idle_s
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        live, cache = self._live, self._cache
        poll = self._poll_s
        while not self._stop_event.wait(poll):
            if time.monotonic() - cache.last_used > self._idle_s:
                poll = 0.25  # idle: look less often
                continue
            poll = self._poll_s
            if cache.peek(cache.key(live, live.engine)) is not None:
                continue
            try:
                cache.warm(live)
            except Exception:
                log.exception("warming the TopK candidate cache failed; retrying in 1 s")
                self._stop_event.wait(1.0)


def _explicit_candidate_embeddings(
    engine: MemoryEngine, cand: torch.Tensor, cached: CandidateEmbeddings | None, t_c: float, mode: str
) -> torch.Tensor:
    """``[Q, d_emb]`` embeddings of ``cand [Q]`` at their candidate times (``t_c``, or their last
    change with ``mode="last_change"``): rows of the warm cache where it has them, the rest
    computed now (same times, so the reply is the same either way)."""
    if cached is None or cached.nodes.numel() == 0:
        return engine.embed(cand, engine.candidate_times(cand, t_c, mode))
    d = cached.nodes.numel()
    rows = torch.searchsorted(cached.nodes, cand).clamp(max=d - 1)
    hit = cached.nodes[rows] == cand
    if bool(hit.all()):
        return cached.z.index_select(0, rows)
    z = cached.z.new_empty(cand.numel(), cached.z.shape[1])
    z[hit] = cached.z[rows[hit]]
    miss = (~hit).nonzero().squeeze(1)
    z[miss] = engine.embed(cand[miss], engine.candidate_times(cand[miss], t_c, mode))
    return z


# ----------------------------------------------------------------------------------- queries
def _group_by_time(times: list[float]) -> dict[float, list[int]]:
    groups: dict[float, list[int]] = {}
    for i, t in enumerate(times):
        groups.setdefault(t, []).append(i)
    return groups


@torch.inference_mode()
def score_batch(live: LiveEngine, qs: list[ScoreQuery]) -> list[ScoreResult | BaseException]:
    """``MemoryEngine.score`` of every pair of every query (one result per query), under one
    read lock: one engine call per distinct query time (a call embeds each node once, at its
    earliest time in the call, so only same-time queries may share one)."""
    out: list[ScoreResult | BaseException] = [RuntimeError("not computed")] * len(qs)
    with live.read() as engine:
        _ensure_eval(engine)
        stamp = live.stamp()
        names = [n for q in qs for n in q.src + q.dst]
        idx, unknown = live.resolve(names)
        starts = [0]
        for q in qs:
            starts.append(starts[-1] + 2 * len(q.src))
        wm = query_time(stamp)
        context = live.context
        valid = []
        for i, q in enumerate(qs):
            try:
                check_time(engine, q.time, q.time_slack_s)
                valid.append(i)
            except RequestError as exc:  # this query is refused; the others are answered
                out[i] = exc
        times = [wm if qs[i].time is None else qs[i].time for i in valid]
        for t, positions in _group_by_time(times).items():
            members = [valid[m] for m in positions]
            try:
                src = torch.cat([idx[starts[i] : starts[i] + len(qs[i].src)] for i in members])
                dst = torch.cat([idx[starts[i] + len(qs[i].src) : starts[i + 1]] for i in members])
                probs = engine.score(src, dst, _full(src.numel(), t, src.device), context).float().cpu()
            except Exception as exc:  # this group fails; the others are still answered
                for i in members:
                    out[i] = exc
                continue
            at = 0
            for i in members:
                b, s0 = len(qs[i].src), starts[i]
                mine = probs[at : at + b]
                at += b
                try:
                    _finite_or_raise(mine, "score")
                except NonFiniteResult as exc:
                    out[i] = exc
                    continue
                out[i] = ScoreResult(mine, unknown[s0 : s0 + b], unknown[s0 + b : s0 + 2 * b], stamp)
    return out


def score(live: LiveEngine, q: ScoreQuery) -> ScoreResult:
    """``MemoryEngine.score`` of every pair at one time (default: the watermark)."""
    return _one(score_batch(live, [q]))


def _one(results: list):
    r = results[0]
    if isinstance(r, BaseException):
        raise r
    return r


@torch.inference_mode()
def top_k_batch(
    live: LiveEngine, qs: list[TopKQuery], cache: CandidateCache
) -> list[TopKResult | BaseException]:
    """TopK of every query (see the module docstring for the times), under one read lock.
    Queries over the default candidates at the same time share one ranking pass
    (``[P sources, Q candidates]``); queries with explicit candidates run one by one."""
    out: list[TopKResult | BaseException] = [RuntimeError("not computed")] * len(qs)
    with live.read() as engine:
        _ensure_eval(engine)
        stamp = live.stamp()
        wm = query_time(stamp)
        refused = set()
        for i, q in enumerate(qs):
            try:
                check_time(engine, q.time, q.time_slack_s)
            except RequestError as exc:
                out[i] = exc
                refused.add(i)
        shared = [i for i, q in enumerate(qs) if q.candidates is None and i not in refused]
        for i, q in enumerate(qs):
            if q.candidates is not None and i not in refused:
                try:
                    out[i] = _top_k_explicit(live, engine, q, cache, stamp)
                except Exception as exc:
                    out[i] = exc
        groups = _group_by_time([wm if qs[i].time is None else qs[i].time for i in shared])
        for t, members in groups.items():
            group = [shared[m] for m in members]
            try:
                for i, r in zip(group, _top_k_shared(live, engine, [qs[i] for i in group], t, cache, stamp)):
                    out[i] = r
            except Exception as exc:
                for i in group:
                    out[i] = exc
    return out


def top_k(live: LiveEngine, q: TopKQuery, cache: CandidateCache) -> TopKResult:
    """The k most likely destinations of ``q.src`` (see the module docstring for the times)."""
    return _one(top_k_batch(live, [q], cache))


def _rank_inputs(
    engine: MemoryEngine, src: torch.Tensor, t: float, cand: torch.Tensor, context: EventBatch | None
):
    """What ranking reads from the state, as copies: source embeddings ``[P, d]`` at ``t``, the
    pair statistics against ``cand [Q]`` (None without pair features), and the source times."""
    t_src = _full(src.numel(), t, src.device)
    z_s = engine.embed(src, t_src, context)
    visible = None if context is None else torch.full_like(src, len(context))
    return z_s, engine.gather_ranking(src, cand, context, visible), t_src


def _rank(
    engine: MemoryEngine,
    src: torch.Tensor,
    t: float,
    cand: torch.Tensor,
    z_c: torch.Tensor,
    context: EventBatch | None,
) -> torch.Tensor:
    """Logits ``[P, Q]`` of sources ``src [P]`` at ``t`` against candidates ``cand [Q]`` whose
    embeddings ``z_c [Q, d]`` are given; pair features (if any) at ``t``."""
    z_s, stats, t_src = _rank_inputs(engine, src, t, cand, context)
    return engine.rank_forward(z_s, z_c, stats, t_src)


def _top_k_shared(
    live: LiveEngine,
    engine: MemoryEngine,
    qs: list[TopKQuery],
    t: float,
    cache: CandidateCache,
    stamp: StateStamp,
) -> list[TopKResult]:
    """Queries over every destination, all at time ``t``: one ``[P, Q]`` ranking pass."""
    entry = cache.get(live, engine)
    cand, z_c = entry.nodes, entry.z
    src, src_unknown = live.resolve([q.src for q in qs])
    qn = cand.numel()
    if qn == 0:
        return [TopKResult([], [], [], bool(u), stamp) for u in src_unknown.tolist()]
    if qn >= cache.catalog_settings.threshold:
        return _top_k_catalog(live, engine, qs, t, cache, stamp, entry, src, src_unknown)
    z_s, stats, t_src = _rank_inputs(engine, src, t, cand, live.context)
    seen_rows = torch.tensor([q.exclude_seen for q in qs], device=src.device)
    seen = None
    if bool(seen_rows.any()):
        count, _ = engine.history.lookup(
            src.unsqueeze(1).expand(-1, qn), cand.unsqueeze(0).expand(len(qs), -1)
        )
        seen = (count > 0) & seen_rows.unsqueeze(1)
    # Every state read of this group is above (copies); what follows computes from them, so a
    # batch applied from here on cannot change the answer (a reader process keeps it).
    live.reads_done()
    logits = engine.rank_forward(z_s, z_c, stats, t_src)  # [P, Q]
    _finite_or_raise(logits, "topk")
    # A node is never its own destination. Candidates are known destinations, so an unknown
    # src (the cold slot, which has no events) never matches one.
    drop = cand.unsqueeze(0) == src.unsqueeze(1)
    if seen is not None:
        drop |= seen
    logits = logits.masked_fill(drop, float("-inf"))
    top = torch.topk(logits, min(max(q.k for q in qs), qn), dim=1)
    values, rows = top.values.cpu(), top.indices.cpu()
    picked = cand.cpu()[rows]  # [P, k_max] node ids
    finite = torch.isfinite(values)
    probs = torch.sigmoid(values).float()
    wanted = [picked[r][finite[r]][: q.k].tolist() for r, q in enumerate(qs)]
    names = iter(engine.ids.names([n for w in wanted for n in w]))
    out = []
    for r, w in enumerate(wanted):
        p = probs[r][finite[r]][: len(w)].tolist()
        out.append(TopKResult([next(names) for _ in w], p, [False] * len(w), bool(src_unknown[r]), stamp))
    return out


def _top_k_catalog(
    live: LiveEngine,
    engine: MemoryEngine,
    qs: list[TopKQuery],
    t: float,
    cache: CandidateCache,
    stamp: StateStamp,
    entry: CandidateEmbeddings,
    src: torch.Tensor,
    src_unknown: torch.Tensor,
) -> list[TopKResult]:
    """``_top_k_shared`` over a large catalog: each source's shortlist (``CatalogIndex``: ANN
    top-M, its past partners, the newest and busiest candidates) ranked exactly, with the same
    embeddings, pair features and drops as the exact path; one ranking pass per source, so an
    answer does not depend on the batch it came in."""
    cand = entry.nodes
    decoder = engine.model.decoder
    if cache.catalog is None:
        cache.catalog = CatalogIndex(cache.catalog_settings)
    index = cache.catalog
    # Only an entry the cache kept describes a state (a reader's discarded attempt does not).
    if cache.peek(entry.key, exact=True) is entry or index.key is None:
        index.sync(entry, decoder)
    key = cache.key(live, engine)
    extras = index.extras(key, cand, engine.neighbors.latest, lambda n: engine.neighbors.count[n])
    cache.partners.build(key, engine.history)
    t_src = _full(src.numel(), t, src.device)
    z_s = engine.embed(src, t_src, live.context)
    ann = index.shortlist(decoder, z_s, max(q.k for q in qs))
    visible = None if live.context is None else torch.full((1,), len(live.context), device=src.device)
    work = []
    for p, q in enumerate(qs):
        s = src[p : p + 1]
        mine = torch.unique(torch.cat([ann[p], cache.partners.partners(int(s)), extras]))
        rows = torch.searchsorted(cand, mine).clamp(max=cand.numel() - 1)
        mine = mine[cand[rows] == mine]  # candidates only (a partner may never have been a destination)
        rows = torch.searchsorted(cand, mine)
        stats = engine.gather_ranking(s, mine, live.context, visible)
        drop = mine == s
        if q.exclude_seen:
            count, _ = engine.history.lookup(s.expand(mine.numel()), mine)
            drop |= count > 0
        work.append((mine, entry.z.index_select(0, rows), stats, drop))
    if not live.still_valid():
        # A reader process's view changed while reading: this attempt is discarded and
        # retried; what it read must not be kept for the state's key.
        index.extras_key = cache.partners.key = None
    live.reads_done()
    out = []
    for p, (q, (mine, z_c, stats, drop)) in enumerate(zip(qs, work)):
        logits = engine.rank_forward(z_s[p : p + 1], z_c, stats, t_src[p : p + 1])[0]  # [S]
        _finite_or_raise(logits, "topk")
        logits = logits.masked_fill(drop, float("-inf"))
        top = torch.topk(logits, min(q.k, mine.numel()))
        keep = torch.isfinite(top.values)
        ids = mine[top.indices[keep]].cpu().tolist()
        probs = torch.sigmoid(top.values[keep]).float().cpu().tolist()
        out.append(TopKResult(engine.ids.names(ids), probs, [False] * len(ids), bool(src_unknown[p]), stamp))
    return out


def _top_k_explicit(
    live: LiveEngine, engine: MemoryEngine, q: TopKQuery, cache: CandidateCache, stamp: StateStamp
) -> TopKResult:
    """One query with its own candidate list."""
    src, src_unknown = live.resolve([q.src])
    src_unk = bool(src_unknown[0])
    t = query_time(stamp) if q.time is None else q.time
    cand, cand_unknown = live.resolve(q.candidates)
    if q.strict and bool(cand_unknown.any()):
        bad = [c for c, u in zip(q.candidates, cand_unknown.tolist()) if u]
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise RequestError(f"unknown candidate ids with strict=true: {', '.join(map(repr, bad[:5]))}{more}")
    cached = cache.peek(cache.key(live, engine), exact=True)
    # The state's catalog size decides the candidate times (CandidateCache.mode_for), warm cache or not.
    catalog = cached.nodes.numel() if cached is not None else int(engine.memory.is_destination.sum())
    mode = cache.mode_for(catalog)
    z_c = _explicit_candidate_embeddings(engine, cand, cached, state_time(engine), mode)
    qn = cand.numel()
    logits = _rank(engine, src, t, cand, z_c, live.context)[0]  # [Q]
    _finite_or_raise(logits, "topk")

    # A node is never its own destination. An unknown src shares the cold slot with unknown
    # candidates, so for it only the same string counts as "itself".
    drop = (cand == src) & ~cand_unknown.to(cand.device)
    if src_unk and q.src in q.candidates:
        drop[q.candidates.index(q.src)] = True
    if q.exclude_seen:
        count, _ = engine.history.lookup(src.expand(qn), cand)
        drop |= count > 0
    logits = logits.masked_fill(drop, float("-inf"))
    top = torch.topk(logits, min(q.k, qn))
    keep = torch.isfinite(top.values)
    pos = top.indices[keep].cpu()
    probs = torch.sigmoid(top.values[keep]).float().cpu().tolist()
    ids = [q.candidates[i] for i in pos.tolist()]
    return TopKResult(ids, probs, cand_unknown[pos].tolist(), src_unk, stamp)


@torch.inference_mode()
def embed(live: LiveEngine, q: EmbedQuery) -> EmbedResult:
    """``MemoryEngine.embed`` of every node at one time (default: the watermark)."""
    with live.read() as engine:
        _ensure_eval(engine)
        stamp = live.stamp()
        idx, unknown = live.resolve(q.nodes)
        check_time(engine, q.time, q.time_slack_s)
        t = query_time(stamp) if q.time is None else q.time
        z = engine.embed(idx, _full(idx.numel(), t, idx.device), live.context)
    _finite_or_raise(z, "embed")
    return EmbedResult(q.nodes, z.float().cpu(), unknown, int(z.shape[1]), stamp)


def model_info(live: LiveEngine) -> ModelInfoResult:
    with live.read() as engine:
        return ModelInfoResult(
            stamp=live.stamp(),
            num_nodes=live.cold_slot,  # the ids the answers know (see LiveEngine.visible_ids)
            model=model_name(engine),
            embedding_dim=embedding_dim(engine),
            device=str(engine.device),
            next_offsets=live.visible_offsets,
        )
