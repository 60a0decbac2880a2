"""What the hot swap refuses, with which reason, and how it follows a store that was restarted
(``tgnstream.runtime.hot_swap``, issue 25). The catch-up reads no new events here
(``NoNewEvents``); the fault suite runs the same cases against a real server under load."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from tgnstream.apps.testing import NoNewEvents, publish_tampered, small_engine, wait_until
from tgnstream.runtime.hot_swap import HotSwapConfig, HotSwapper
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.models import ModelStore
from tgnstream.stream.config import StreamConfig


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr("tgnstream.runtime.hot_swap.BatchReader", NoNewEvents)
    stream = StreamConfig()
    store = ModelStore(tmp_path / "models")
    served = small_engine(seed=1)
    first = store.publish(served, {}, stream.kafka.topic)
    refused, lineages = [], []
    swapper = HotSwapper(
        HotSwapConfig(dir=tmp_path / "models", watch_interval_s=0.05),
        stream,
        LiveEngine(served, first.version, {}),
        first.version,
        on_refused=lambda v, r, m: refused.append((v, r, m)),
        on_lineage_change=lambda old, new: lineages.append((old, new)),
    )
    swapper.start()
    yield store, swapper, refused, lineages, stream.kafka.topic
    swapper.stop()


def test_a_sealed_version_with_one_nan_weight_is_refused_before_any_replay(setup):
    store, swapper, refused, _, topic = setup
    bad = small_engine(seed=2)
    with torch.no_grad():
        bad.model.decoder.lin_out.weight[0, 0] = float("nan")
    store.publish(bad, {}, topic, parent="v000001")
    wait_until(lambda: refused, 10, "the refusal")
    version, reason, message = refused[0]
    assert (version, reason) == ("v000002", "nonfinite_weights") and "model.decoder.lin_out.weight" in message
    store.publish(small_engine(seed=3), {}, topic, parent="v000001")
    ready = wait_until(lambda: swapper.take_ready({}), 10, "the next good version")
    assert ready.version == "v000003" and len(refused) == 1  # refused once, never retried


def test_an_edited_manifest_and_one_naming_another_version_are_refused_and_counted_once(setup):
    store, swapper, refused, _, topic = setup
    edited = publish_tampered(
        store.root, small_engine(seed=2), topic, lambda m: m.update(events_applied=12345), reseal=False
    )
    wait_until(lambda: refused, 10, "the edited manifest's refusal")
    assert refused[0][:2] == (edited, "manifest") and "checksum does not match" in refused[0][2]
    other = publish_tampered(
        store.root, small_engine(seed=3), topic, lambda m: m.update(version="v000001"), reseal=True
    )
    wait_until(lambda: len(refused) == 2, 10, "the misnamed manifest's refusal")
    assert refused[1][:2] == (other, "manifest") and "names version 'v000001'" in refused[1][2]
    time.sleep(0.3)  # several more looks at the store
    assert len(refused) == 2 and swapper.take_ready({}) is None


def test_a_wiped_store_that_starts_again_at_v1_is_followed_after_one_warning(setup, caplog):
    store, swapper, refused, lineages, topic = setup
    old_lineage = store.lineage()
    store.publish(small_engine(seed=2), {}, topic, parent="v000001")
    assert wait_until(lambda: swapper.take_ready({}), 10).version == "v000002"
    for path in store.root.iterdir():
        shutil.rmtree(path)
    restarted = store.publish(small_engine(seed=4), {}, topic)
    assert restarted.version == "v000001" and restarted.lineage != old_lineage
    ready = wait_until(lambda: swapper.take_ready({}), 10, "the new lineage's first version")
    assert (ready.version, ready.lineage) == ("v000001", restarted.lineage)
    assert lineages == [(old_lineage, restarted.lineage)] and not refused
    assert "the models store was restarted" in caplog.text
    # Its later versions are newer versions of the lineage now served.
    store.publish(small_engine(seed=5), {}, topic, parent="v000001")
    assert wait_until(lambda: swapper.take_ready({}), 10).version == "v000002"
    assert len(lineages) == 1


def test_a_number_below_the_served_one_is_a_restart_when_the_served_lineage_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr("tgnstream.runtime.hot_swap.BatchReader", NoNewEvents)
    stream = StreamConfig()
    served = small_engine(seed=1)
    lineages = []
    # Served "v000007" (restored from a snapshot of a store that no longer exists).
    swapper = HotSwapper(
        HotSwapConfig(dir=tmp_path / "models", watch_interval_s=0.05),
        stream,
        LiveEngine(served, "v000007", {}),
        "v000007",
        on_lineage_change=lambda old, new: lineages.append((old, new)),
    )
    assert swapper.lineage is None
    swapper.start()
    try:
        ModelStore(tmp_path / "models").publish(small_engine(seed=2), {}, stream.kafka.topic)
        assert wait_until(lambda: swapper.take_ready({}), 10).version == "v000001"
        assert len(lineages) == 1
    finally:
        swapper.stop()
