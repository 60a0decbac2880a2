"""IdMap against a plain dict that numbers ids in order of first appearance."""

from __future__ import annotations

import random

import torch

from tgnstream.core.idmap import IdMap


def _random_batches(seed: int, batches: int, size: int, universe: int) -> list[list[str]]:
    rng = random.Random(seed)
    names = [f"user-{i}" if i % 3 else f"págé/{i}" for i in range(universe)]  # some non-ASCII
    return [[rng.choice(names) for _ in range(size)] for _ in range(batches)]


def test_lookup_matches_a_naive_dict_across_many_flushes():
    m, ref = IdMap(), {}
    for batch in _random_batches(0, 60, 97, 3_000):
        known_before = dict(ref)
        peek, peek_new = m.lookup(batch, create=False)
        assert peek.tolist() == [known_before.get(k, -1) for k in batch]
        assert peek_new.tolist() == [k not in known_before for k in batch]
        dense, new = m.lookup(batch, create=True)
        for k in batch:
            ref.setdefault(k, len(ref))
        assert dense.tolist() == [ref[k] for k in batch]
        assert new.tolist() == [k not in known_before for k in batch]
        assert dense.dtype == torch.long and new.dtype == torch.bool
        if random.Random(len(ref)).random() < 0.7:
            m.flush()
        # names() reads flushed and pending ids alike
        some = random.Random(1).sample(range(len(ref)), 20)
        inverse = {v: k for k, v in ref.items()}
        assert m.names(some) == [inverse[i] for i in some]
    assert len(m) == len(ref)


def test_state_dict_is_compact_and_round_trips():
    m = IdMap()
    for batch in _random_batches(2, 40, 50, 1_000):
        m.lookup(batch)
        m.flush()
    state = m.state_dict()
    names = m.names(range(len(m)))
    assert state["offsets"].numel() == len(m) + 1
    assert state["blob"].numel() == sum(len(n.encode("utf-8")) for n in names)
    assert state["blob"].untyped_storage().nbytes() == state["blob"].numel()  # not the grown storage
    back = IdMap()
    back.load_state_dict(state)
    assert back.names(range(len(m))) == names
    assert back.lookup(names, create=False)[0].tolist() == list(range(len(m)))
    back.lookup(["brand-new"])  # keeps growing after a load
    back.flush()
    assert back.names([len(m)]) == ["brand-new"]
