"""TopK over large catalogs: an ANN shortlist (FAISS IVF-Flat, inner product) kept in step with
the candidate-embedding cache, then the exact ranking of the shortlist only.

The shortlist of a source ``u`` (``CatalogIndex.shortlist``) is the union of

* the ``shortlist`` best candidates by the linearised decoder score ``y_u . x_v``
  (``tgnstream.core.retrieval``), found in an IVF index;
* ``u``'s recent partners (its neighbour-table row) that are candidates: the pairs whose pair
  features (seen, count, recency) the linearisation leaves out;
* the ``recent`` candidates with the newest events and the ``popular`` candidates with the most
  events (ties by id): what the decoder's activity features reward for pairs that never met.

Determinism: the shortlist is a function of the candidate ids, their embeddings, the decoder
weights, the coarse quantizer and the state's neighbour table, whatever the order in which rows
were added, removed or updated and however the queries were batched:

* list membership: each vector goes to its nearest centroid, decided in float32 only when the
  margin over the runner-up exceeds float32's rounding bound, else in float64; exact ties go to
  the lower centroid;
* probed lists: the ``nprobe`` best centroids by float64 inner product, ties to the lower index;
* FAISS's own top-``M'`` scan (whose float32 scores may depend on a vector's slot in its list)
  only proposes: the proposals are re-scored in float64 from the embeddings, and ``M'`` grows
  until every vector of the probed lists that could belong to the top ``M`` is provably among
  them; the top ``M`` is then taken by (float64 score, id).

The quantizer is k-means (FAISS, fixed seed, one thread) over a fixed-stride sample of the
candidate vectors, trained when the index is first built, when the model changes and when the
candidate count has doubled or halved since it was trained. Indexes trained on the same state
agree exactly; one trained later (a restarted reader) partitions differently and may miss other
near-boundary candidates until both retrain (see docs/topk-catalog.md).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from tgnstream.core.edge_history import live_keys
from tgnstream.core.retrieval import GateStats, candidate_vectors, gate_stats, query_vectors, score_weights

__all__ = ["CatalogIndex", "CatalogSettings", "PairPartners"]

# Bound on |float32 score - float64 score| relative to the operands' norms (the float32 dot
# products of a few hundred terms, and the rounding of x = W_d z, stay well under it).
_REL_EPS = 1e-4
# Rows assigned to centroids per chunk (bounds the [rows, nlist] score matrix).
_ASSIGN_CHUNK = 16_384
# Rows whose nearest centroid is decided in float64 at a time (bounds a [rows, nlist, h] product).
_EXACT_CHUNK = 256
# k-means: sample points per centroid and iterations.
_TRAIN_PER_LIST = 48
_TRAIN_ITERS = 12


@dataclass(frozen=True)
class CatalogSettings:
    """When TopK goes two-stage and how large its shortlist is (``GrpcConfig.topk_*``).

    threshold: candidates from which the two-stage path is used; shortlist: ANN top-M per source;
    nprobe: IVF lists scanned per source; nlist: IVF lists (0: about sqrt(candidates), a power of
    two); recent / popular: candidates with the newest events / the most events added to every
    shortlist; gate: ``retrieval.query_vectors``'s; seed: k-means seed.
    """

    threshold: int = 50_000
    shortlist: int = 500
    nprobe: int = 32
    nlist: int = 0
    recent: int = 200
    popular: int = 100
    gate: str = "soft"
    seed: int = 1234


def default_nlist(count: int) -> int:
    """IVF lists for ``count`` candidates: the power of two nearest sqrt(count), within
    [16, 4096] and at most count / 39 (k-means wants a few dozen points per centroid)."""
    n = 2 ** round(math.log2(max(math.sqrt(max(count, 1)), 1.0)))
    return int(max(1, min(max(16, min(n, 4096)), count // 39)))


class CatalogIndex:
    """FAISS ``IndexIVFFlat`` (inner product, ids = node ids) over the retrieval vectors
    ``x_v [D, h]`` of one candidate-cache entry (``CandidateEmbeddings``), kept in step with the
    newer entries by updating only the rows whose embedding changed.

    ``sync(entry, decoder)`` brings it to an entry; ``extras(...)`` gives the state's recent and
    popular candidates; ``shortlist(...)`` the sorted candidate ids ``[S_p]`` of each source.
    Thread-safe (one lock: syncing and searching are short next to the ranking).
    """

    def __init__(self, settings: CatalogSettings | None = None) -> None:
        self.settings = settings or CatalogSettings()
        self._lock = threading.Lock()
        self._reset()
        self.trained = 0  # quantizers trained
        self.rows_added = 0  # vectors (re)added, first builds included
        self.rows_near_two = 0  # of those, rows whose list was decided in float64 (near two centroids)
        self.extras_key: tuple | None = None
        self._extras: torch.Tensor | None = None

    def _reset(self) -> None:
        self.key: tuple | None = None  # the entry this index describes
        self._model: tuple | None = None
        self._nodes: torch.Tensor | None = None  # [D] sorted ids
        self._z: torch.Tensor | None = None  # [D, d] the entry's embeddings
        self._sig: torch.Tensor | None = None
        self._index = None
        self._centroids: torch.Tensor | None = None  # [nlist, h] float32
        self._trained_for = 0
        self._gates: GateStats | None = None
        self._max_x = 0.0  # largest |x_v| and |z_v| (rounding bounds)
        self._max_z = 0.0
        self._w_norm = 0.0

    # ------------------------------------------------------------------------------ build
    @property
    def nlist(self) -> int:
        return 0 if self._centroids is None else int(self._centroids.shape[0])

    def sync(self, entry, decoder) -> None:
        """Describe ``entry`` (a ``CandidateEmbeddings``: nodes ``[D]`` sorted, z ``[D, d]``) with
        the weights of ``decoder`` (a ``LinkDecoder``; ``entry.key[:2]`` names the model)."""
        with self._lock:
            if self.key == entry.key:
                return
            d = entry.nodes.numel()
            if d == 0:
                self._reset()
                self.key = entry.key
                return
            retrain = (
                self._centroids is None
                or self._model != entry.key[:2]
                or d >= 2 * self._trained_for
                or 2 * d <= self._trained_for
            )
            if retrain:
                self._build(entry, decoder)
            else:
                self._update(entry, decoder)
            self.key, self._model = entry.key, entry.key[:2]
            self._nodes, self._z, self._sig = entry.nodes, entry.z, entry.signature
            self._gates = gate_stats(candidate_vectors(decoder, entry.z[:: max(1, d // 16_384)]))
            self._w_norm = float(decoder.lin_dst.weight.double().norm())
            self._max_z = float(entry.z.norm(dim=1).max())

    def _build(self, entry, decoder) -> None:
        self._reset()
        x = candidate_vectors(decoder, entry.z)
        d, h = x.shape
        nlist = self.settings.nlist or default_nlist(d)
        nlist = max(1, min(nlist, d))
        sample = x[:: max(1, d // (_TRAIN_PER_LIST * nlist))].contiguous().numpy()
        kmeans = faiss.Kmeans(
            h,
            nlist,
            niter=_TRAIN_ITERS,
            seed=self.settings.seed,
            max_points_per_centroid=1 << 30,
            verbose=False,
        )
        if nlist == 1:
            centroids = sample.astype(np.float64).mean(0, keepdims=True).astype(np.float32)
        else:
            threads = faiss.omp_get_max_threads()
            # One thread: the centroids are then the same in every process whatever its thread
            # count (FAISS and torch share the OpenMP runtime: restore the count at once).
            faiss.omp_set_num_threads(1)
            try:
                kmeans.train(sample)
            finally:
                faiss.omp_set_num_threads(threads)
            centroids = kmeans.centroids
        self._centroids = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32).copy())
        quantizer = faiss.IndexFlatL2(h)
        quantizer.add(self._centroids.numpy())
        index = faiss.IndexIVFFlat(quantizer, h, nlist, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = False
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        self._quantizer = quantizer  # the index does not own it: keep it alive
        self._index = index
        self._trained_for = d
        self.trained += 1
        self._add(entry.nodes, x)

    def _update(self, entry, decoder) -> None:
        """Re-add the rows of ``entry`` that are new or whose embedding changed."""
        old_nodes, old_z, old_sig = self._nodes, self._z, self._sig
        nodes = entry.nodes
        rows = torch.searchsorted(old_nodes, nodes).clamp(max=old_nodes.numel() - 1)
        present = old_nodes[rows] == nodes
        if entry.signature is not None and old_sig is not None:
            # last_change entries: a row with the same signature was carried over unchanged.
            same = present & (old_sig[rows] == entry.signature)
        else:
            same = present & (old_z[rows] == entry.z).all(1)
        gone = old_nodes[~torch.isin(old_nodes, nodes)]
        changed = (~same).nonzero().squeeze(1)
        stale = torch.cat([nodes[changed[present[changed]]], gone])
        if stale.numel():
            ids = np.ascontiguousarray(stale.numpy().astype(np.int64))
            self._index.remove_ids(faiss.IDSelectorArray(ids.size, faiss.swig_ptr(ids)))
        if changed.numel():
            self._add(nodes[changed], candidate_vectors(decoder, entry.z[changed]))

    def _add(self, ids: torch.Tensor, x: torch.Tensor) -> None:
        # Named arrays: swig_ptr keeps no reference, so a temporary would be freed too early.
        xs = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        xids = np.ascontiguousarray(ids.numpy(), dtype=np.int64)
        lists = np.ascontiguousarray(self._assign(x).numpy(), dtype=np.int64)
        self._index.add_core(xs.shape[0], faiss.swig_ptr(xs), faiss.swig_ptr(xids), faiss.swig_ptr(lists))
        self._max_x = max(self._max_x, float(x.norm(dim=1).max()))
        self.rows_added += int(ids.numel())

    def _assign(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest centroid (L2) of each row of ``x [n, h]``: ``[n]`` int64, independent of how
        the rows are batched (see the module docstring)."""
        c = self._centroids
        half = 0.5 * (c * c).sum(1)  # argmin |x - c|^2 = argmax x.c - |c|^2 / 2
        c64, half64 = c.double(), 0.5 * (c.double() ** 2).sum(1)
        scale = float(c.norm(dim=1).max())
        out = []
        for i in range(0, x.shape[0], _ASSIGN_CHUNK):
            xb = x[i : i + _ASSIGN_CHUNK]
            s = xb @ c.T - half
            if s.shape[1] == 1:
                out.append(torch.zeros(xb.shape[0], dtype=torch.long))
                continue
            top = s.topk(2, dim=1)
            best = top.indices[:, 0].clone()
            bound = _REL_EPS * (xb.norm(dim=1) * scale + scale * scale)
            close = (top.values[:, 0] - top.values[:, 1]) <= bound
            near = close.nonzero().squeeze(1)
            self.rows_near_two += int(near.numel())
            for j in range(0, near.numel(), _EXACT_CHUNK):
                sel = near[j : j + _EXACT_CHUNK]
                floor = top.values[sel, 0] - 2 * bound[sel]
                best[sel] = _nearest_exactly(xb[sel], s[sel], floor, c64, half64)
            out.append(best)
        return torch.cat(out)

    # ---------------------------------------------------------------------------- queries
    def extras(self, key: tuple, nodes: torch.Tensor, latest: Callable, counts: Callable) -> torch.Tensor:
        """Sorted ids of the ``recent`` candidates with the newest events and the ``popular`` ones
        with the most (ties by id), for the state ``key``, computed once per state.
        ``latest(nodes) -> [D]`` float64 and ``counts(nodes) -> [D]`` int64 read the state."""
        if self.extras_key == key and self._extras is not None:
            return self._extras
        picks = [nodes[:0]]
        for n, values in ((self.settings.recent, latest), (self.settings.popular, counts)):
            if n > 0 and nodes.numel():
                picks.append(nodes[_top_by_value_then_id(values(nodes), min(n, nodes.numel()))])
        out = torch.unique(torch.cat(picks))
        self.extras_key, self._extras = key, out
        return out

    def shortlist(self, decoder, z_src: torch.Tensor, k: int) -> list[torch.Tensor]:
        """For each source embedding of ``z_src [P, d]``: node ids ``[<= M]`` of the best
        candidates by the linearised score (``M = max(shortlist, 2k)``), best first (float64
        score, then id). Call after ``sync``."""
        m = max(self.settings.shortlist, 2 * k)
        with self._lock:
            if self._index is None or self._nodes is None or self._nodes.numel() == 0:
                return [torch.zeros(0, dtype=torch.long) for _ in range(z_src.shape[0])]
            out = []
            # One source at a time: its shortlist must not depend on the batch it came in.
            for p in range(z_src.shape[0]):
                y = query_vectors(decoder, z_src[p : p + 1], self._gates, self.settings.gate)[0]  # [h]
                q = score_weights(decoder, y.unsqueeze(0))[0]  # [d]
                out.append(self._search(y, q, self._probes(y), m))
            return out

    def _probes(self, y: torch.Tensor) -> torch.Tensor:
        """``[nprobe]`` lists to scan for query ``y [h]``: the best centroids by float64 inner
        product (element-wise, so independent of any batching), ties to the lower list."""
        nprobe = min(self.settings.nprobe, self.nlist)
        s = (self._centroids.double() * y.double()).sum(1)
        return torch.sort(-s, stable=True).indices[:nprobe].contiguous()

    def _search(self, y: torch.Tensor, q: torch.Tensor, probes: torch.Tensor, m: int) -> torch.Tensor:
        eps = _REL_EPS * float(y.double().norm()) * (self._max_x + self._w_norm * self._max_z)
        want = m + 32
        self._index.nprobe = probes.numel()
        xq = np.ascontiguousarray(y.numpy().reshape(1, -1), dtype=np.float32)
        lists = np.ascontiguousarray(probes.numpy().reshape(1, -1).astype(np.int64))
        coarse = np.zeros(lists.shape, dtype=np.float32)
        while True:
            dist, ids = self._index.search_preassigned(xq, want, lists, coarse)
            dist, ids = torch.from_numpy(dist[0]), torch.from_numpy(ids[0])
            ok = ids >= 0
            dist, ids = dist[ok], ids[ok]
            rows = torch.searchsorted(self._nodes, ids)
            exact = (self._z.index_select(0, rows).double() * q).sum(1)  # [n] float64
            order = _top_by_value_then_id(exact, ids.numel(), ids)
            if ids.numel() < want or ids.numel() <= m:
                break  # every vector of the probed lists was returned
            # Complete if anything FAISS left out scores below the m-th exact score for sure.
            if float(dist.min()) < float(exact[order[m - 1]]) - 2 * eps:
                break
            want *= 2
        return ids[order[:m]]


class PairPartners:
    """Every partner of every node in the pair history (``EdgeHistory``), as a CSR built once
    per state: ``partners(u) -> [n]`` ids (sorted). The neighbour table keeps only a node's K
    newest partners; the decoder's pair features reward all of them."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self._ptr = torch.zeros(1, dtype=torch.long)
        self._partner = torch.zeros(0, dtype=torch.long)

    def build(self, key: tuple, history) -> None:
        if self.key == key:
            return
        keys = history.keys.clone()  # a private copy: a reader's view may change under it
        keys = keys[live_keys(keys)]
        lo, hi = keys >> 32, keys & 0xFFFFFFFF
        node, partner = torch.cat([lo, hi]), torch.cat([hi, lo])
        order = torch.argsort(node * (1 << 32) + partner)
        node, partner = node[order], partner[order]
        size = int(node.max()) + 1 if node.numel() else 0
        self._ptr = torch.zeros(size + 1, dtype=torch.long)
        self._ptr[1:] = torch.cumsum(torch.bincount(node, minlength=size), 0)
        self._partner = partner
        self.key = key

    def partners(self, u: int) -> torch.Tensor:
        if u < 0 or u + 1 >= self._ptr.numel():
            return self._partner[:0]
        return self._partner[int(self._ptr[u]) : int(self._ptr[u + 1])]


def _nearest_exactly(
    x: torch.Tensor, s: torch.Tensor, floor: torch.Tensor, c64: torch.Tensor, half64: torch.Tensor
) -> torch.Tensor:
    """Nearest centroid of each row of ``x [n, h]`` in float64, among the centroids whose float32
    score ``s [n, nlist]`` is at least ``floor [n]`` (below the best by twice the rounding bound,
    so the float64 best and every centroid tied with it are among them): ``[n]`` int64, the
    first (lowest) of equal maxima, exactly what comparing against every centroid gives. Each
    (row, centroid) value is one product summed over ``h``, whatever else is compared."""
    nlist = s.shape[1]
    within = s >= floor.unsqueeze(1)
    width = int(within.sum(1).max())
    ids = torch.arange(nlist).expand_as(s)
    cand = torch.where(within, ids, nlist).sort(1).values[:, :width]  # ascending, padded with nlist
    valid = cand < nlist
    safe = cand.clamp(max=nlist - 1)
    exact = (x.double().unsqueeze(1) * c64[safe]).sum(-1) - half64[safe]
    exact = exact.masked_fill(~valid, float("-inf"))
    return cand.gather(1, exact.argmax(1, keepdim=True)).squeeze(1)


def _top_by_value_then_id(values: torch.Tensor, n: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the ``n`` largest ``values [D]``, largest first, ties by smaller id (``ids``,
    default the positions)."""
    if ids is not None:
        by_id = torch.argsort(ids, stable=True)
        return by_id[torch.argsort(-values[by_id], stable=True)[:n]]
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    # O(D): everything above the n-th value, then the ties at it in position order.
    threshold = torch.topk(values, n).values[-1]
    above = (values > threshold).nonzero().squeeze(1)
    tied = (values == threshold).nonzero().squeeze(1)[: n - above.numel()]
    both = torch.cat([above, tied])
    return both[torch.argsort(-values[both], stable=True)]
