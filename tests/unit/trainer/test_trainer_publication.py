"""A crash around publication: the adopted candidate is checkpointed first, then published; a
restart finishes a publication the crash interrupted, and does not repeat one that happened."""

from __future__ import annotations

from tgnstream.runtime.models import ModelStore
from tgnstream.trainer.continual_config import TrainerConfig
from tgnstream.trainer.service import TrainerService


def _config(tmp_path) -> TrainerConfig:
    return TrainerConfig(
        start={"memory_dim": 8, "seed": 3},
        publish={"dir": tmp_path / "models"},
        checkpoints={"dir": tmp_path / "trainer"},
        device="cpu",
    )


def _adopted_and_checkpointed(tmp_path, offsets: dict[int, int]) -> TrainerService:
    """What a round that passed the gate leaves when the process dies right after its checkpoint
    (the first start published the start model as v000001)."""
    svc = TrainerService(_config(tmp_path))
    assert svc.published_version == "v000001"
    svc.positions = dict(offsets)
    svc.pending = {"parent": svc.published_version, "gate": {"decision": "published"}}
    assert svc.checkpoint()
    return svc


def test_a_fresh_trainer_publishes_its_start_model_at_once(tmp_path):
    svc = TrainerService(_config(tmp_path))
    (v,) = ModelStore(tmp_path / "models").versions()
    assert (v.version, v.next_offsets, v.parent, v.gate["decision"]) == ("v000001", {}, None, "start model")
    assert svc.published_version == "v000001" and int(v.load().events_applied) == 0


def test_a_publication_interrupted_by_a_crash_is_finished_at_restart(tmp_path):
    _adopted_and_checkpointed(tmp_path, {0: 10})
    store = ModelStore(tmp_path / "models")
    assert [v.version for v in store.versions()] == ["v000001"]
    restarted = TrainerService(_config(tmp_path))
    v = store.latest()
    assert (v.version, v.next_offsets, v.parent) == ("v000002", {0: 10}, "v000001")
    assert restarted.published_version == "v000002" and restarted.pending is None
    # ... and the checkpoint says so: another restart publishes nothing more.
    again = TrainerService(_config(tmp_path))
    assert len(store.versions()) == 2 and again.published_version == "v000002"


def test_a_publication_that_happened_before_the_crash_is_not_repeated(tmp_path):
    first = _adopted_and_checkpointed(tmp_path, {0: 10})
    store = ModelStore(tmp_path / "models")
    store.publish(first.trainer.head, {0: 10}, first.topic, parent="v000001")  # then the crash
    restarted = TrainerService(_config(tmp_path))
    assert [v.version for v in store.versions()] == ["v000001", "v000002"]
    assert restarted.published_version == "v000002"
