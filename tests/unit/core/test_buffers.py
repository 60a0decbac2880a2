"""``grown``: a buffer's rows kept, the new ones filled; in shared memory it stays shared and
saves and loads like any tensor (a zero-width buffer too: featureless neighbour features)."""

from __future__ import annotations

import io

import pytest
import torch

from tgnstream.core.buffers import grown


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("shape", [(4, 3), (4,), (4, 10, 0), (0, 2)])
def test_grown_keeps_rows_fills_the_rest_and_round_trips_through_torch_save(shared, shape):
    current = torch.arange(int(torch.tensor(shape).prod())).reshape(shape).float()
    if shared:
        current.share_memory_()
    out = grown(current, 9, fill=-1)
    assert out.shape == (9, *shape[1:])
    # A shared buffer with rows of data grows into shared memory; private ones stay private.
    assert out.is_shared() == (shared and out.numel() > 0)
    assert torch.equal(out[: shape[0]], current) and bool((out[shape[0] :] == -1).all())
    buf = io.BytesIO()
    torch.save({"t": out}, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf)["t"], out)
    assert grown(out, 3) is out  # never shrinks
