"""The catalog index's list assignment: rows near two centroids are decided in float64 among the
centroids within the rounding bound only, and come out as comparing against every centroid
does (the reference below), exact ties to the lower list, whatever the batch."""

from __future__ import annotations

import torch

from tgnstream.model_server import catalog
from tgnstream.model_server.catalog import CatalogIndex


def _reference(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """argmax over every centroid of x.c - |c|^2 / 2 in float64 (first maximum)."""
    c64 = c.double()
    return ((x.double().unsqueeze(1) * c64.unsqueeze(0)).sum(-1) - 0.5 * (c64**2).sum(1)).argmax(1)


def test_rows_near_ties_get_the_float64_nearest_list_in_any_batch(monkeypatch):
    g = torch.Generator().manual_seed(0)
    h, nlist = 24, 64
    c = torch.randn(nlist, h, generator=g)
    c[10] = c[3]  # duplicate centroids: exact ties, the lower list must win
    c[40] = c[3]
    c[20] = c[21] * (1 + 1e-7)  # all but equal
    # Rows at the midpoint of two centroids (a near tie), on duplicates, and anywhere.
    pairs = torch.randint(nlist, (300, 2), generator=g)
    mid = 0.5 * (c[pairs[:, 0]] + c[pairs[:, 1]]) + 1e-6 * torch.randn(300, h, generator=g)
    rows = torch.cat([mid, c[3].expand(20, h), c[21].expand(20, h), torch.randn(200, h, generator=g)])
    index = CatalogIndex()
    index._centroids = c
    monkeypatch.setattr(catalog, "_ASSIGN_CHUNK", 97)  # several chunks, rows of a tie split across them
    monkeypatch.setattr(catalog, "_EXACT_CHUNK", 13)
    got = index._assign(rows)
    want = _reference(rows, c)
    assert torch.equal(got, want)
    assert index.rows_near_two >= 40 and (got[300:320] == 3).all()
    one_by_one = torch.cat([index._assign(rows[i : i + 1]) for i in range(rows.shape[0])])
    assert torch.equal(one_by_one, got)
