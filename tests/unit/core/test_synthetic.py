"""Synthetic stream generator and the dense-array dataset builder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgnstream.core.synthetic import dataset_from_arrays, generate_stream

# Many sources and destinations with mild skew: chance re-encounters stay rare, so the repeat
# mechanism dominates the measured repeat rate.
SPARSE = dict(num_src=5000, num_dst=5000, activity_exponent=0.8)


def seen_before_rate(ds) -> float:
    """Fraction of events whose (src, dst) pair already occurred earlier in the stream."""
    seen: set[tuple[int, int]] = set()
    hits = 0
    for pair in zip(ds.events.src.tolist(), ds.events.dst.tolist(), strict=True):
        hits += pair in seen
        seen.add(pair)
    return hits / len(ds)


def assert_same(a, b) -> None:
    for x, y in [
        (a.events.src, b.events.src),
        (a.events.dst, b.events.dst),
        (a.events.t, b.events.t),
        (a.events.feats, b.events.feats),
        (a.labels, b.labels),
    ]:
        assert torch.equal(x, y)


def test_same_seed_is_identical_and_other_seed_differs():
    a = generate_stream(5000, edge_dim=3, drift=0.3, seed=7)
    assert_same(a, generate_stream(5000, edge_dim=3, drift=0.3, seed=7))
    b = generate_stream(5000, edge_dim=3, drift=0.3, seed=8)
    assert not torch.equal(a.events.src, b.events.src)
    assert not torch.equal(a.events.t, b.events.t)


def test_shorter_stream_is_prefix_without_drift():
    long = generate_stream(3000, seed=3, edge_dim=2)
    short = generate_stream(1234, seed=3, edge_dim=2)
    assert_same(
        short,
        dataset_from_arrays(
            long.events.src[:1234],
            long.events.dst[:1234],
            long.events.t[:1234],
            long.events.feats[:1234],
            num_nodes=long.num_nodes,
        ),
    )


def test_shapes_dtypes_and_times():
    ds = generate_stream(20_000, num_src=50, num_dst=30, edge_dim=4, start_time=100.0, mean_gap=2.0)
    ev = ds.events
    assert len(ds) == 20_000 and ev.feats.shape == (20_000, 4) and ds.edge_dim == 4
    assert ev.src.dtype == ev.dst.dtype == ds.labels.dtype == torch.int64
    assert ev.t.dtype == torch.float64 and ev.feats.dtype == torch.float32
    assert ds.labels.abs().sum() == 0
    assert ev.t[0] == 100.0 and bool((ev.t[1:] >= ev.t[:-1]).all())
    mean_gap = float((ev.t[-1] - ev.t[0]) / (len(ds) - 1))
    assert mean_gap == pytest.approx(2.0, rel=0.05)
    assert ds.num_nodes == 80


def test_bipartite_id_ranges():
    ds = generate_stream(20_000, num_src=50, num_dst=30)
    src, dst = ds.events.src, ds.events.dst
    assert int(src.min()) >= 0 and int(src.max()) < 50
    assert int(dst.min()) >= 50 and int(dst.max()) < 80
    assert ds.bipartite
    assert ds.dst_nodes.tolist() == sorted(set(dst.tolist()))


def test_non_bipartite_shares_nodes_without_self_loops():
    ds = generate_stream(20_000, num_src=40, bipartite=False, repeat_prob=0.3)
    src, dst = ds.events.src, ds.events.dst
    assert ds.num_nodes == 40 and int(max(src.max(), dst.max())) < 40
    assert not bool((src == dst).any())
    assert not ds.bipartite


def test_repeat_rate_tracks_repeat_prob():
    rates = {p: seen_before_rate(generate_stream(20_000, repeat_prob=p, **SPARSE)) for p in (0, 0.3, 0.6, 1)}
    assert rates[0] < 0.15 and rates[1] > 0.6
    # Repeat decisions are independent coin flips, so the rate interpolates linearly.
    for p in (0.3, 0.6):
        assert rates[p] == pytest.approx(rates[0] + p * (rates[1] - rates[0]), abs=0.04)


def test_source_activity_is_heavy_tailed():
    def top_share(exponent: float) -> float:
        ds = generate_stream(50_000, num_src=1000, activity_exponent=exponent)
        counts = np.sort(np.bincount(ds.events.src.numpy(), minlength=1000))[::-1]
        return counts[:10].sum() / counts.sum()

    # Zipf(1) over 1000 sources gives the top 1% H(10)/H(1000) ~= 0.39 of events.
    assert top_share(1.0) == pytest.approx(0.39, abs=0.05)
    assert top_share(0.0) < 0.03


def test_drift_moves_destination_popularity():
    def favourite(ds, part: slice) -> int:
        return int(np.bincount(ds.events.dst.numpy()[part]).argmax())

    still = generate_stream(50_000, repeat_prob=0.0, drift=0.0)
    assert favourite(still, slice(0, 5000)) == favourite(still, slice(-5000, None))
    moving = generate_stream(50_000, repeat_prob=0.0, drift=1.0)
    assert favourite(moving, slice(0, 5000)) != favourite(moving, slice(-5000, None))


def test_zero_events_and_bad_arguments():
    empty = generate_stream(0)
    assert len(empty) == 0 and empty.num_nodes == 1500
    for kwargs in [
        dict(repeat_prob=1.5),
        dict(drift=-0.1),
        dict(num_dst=0),
        dict(num_src=1, bipartite=False),
    ]:
        with pytest.raises(ValueError):
            generate_stream(10, **kwargs)


def test_dataset_from_arrays_derives_metadata():
    ds = dataset_from_arrays(
        torch.tensor([0, 2, 0]), np.array([1, 3, 1]), [0.0, 1.0, 1.0], labels=[0, 1, 0], name="toy"
    )
    assert ds.num_nodes == 4 and ds.dst_nodes.tolist() == [1, 3] and ds.bipartite
    assert ds.events.feats.shape == (3, 0) and ds.labels.tolist() == [0, 1, 0] and ds.name == "toy"
    shared = dataset_from_arrays(np.array([0, 1]), np.array([1, 2]), np.array([0.0, 1.0]), num_nodes=5)
    assert not shared.bipartite and shared.num_nodes == 5


@pytest.mark.parametrize(
    "src, dst, t, kwargs, fragment",
    [
        ([0, 1], [1], [0.0, 1.0], {}, "equal length"),
        ([0, 1], [1, 0], [1.0, 0.0], {}, "decreases at index 1"),
        ([0, 1], [1, 0], [0.0, float("nan")], {}, "non-finite"),
        ([0, -1], [1, 0], [0.0, 1.0], {}, "non-negative"),
        ([0, 1], [1, 5], [0.0, 1.0], {"num_nodes": 3}, "out of range"),
        ([0.5, 1], [1, 0], [0.0, 1.0], {}, "integer"),
        ([0, 1], [1, 0], [0.0, 1.0], {"feats": np.zeros((3, 2))}, "feats"),
    ],
)
def test_dataset_from_arrays_rejects_bad_input(src, dst, t, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        dataset_from_arrays(np.array(src), np.array(dst), np.array(t), **kwargs)
