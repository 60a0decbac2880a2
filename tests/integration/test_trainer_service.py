"""``tgnstream trainer`` as a process on a real broker: it reads the topic, fine-tunes, publishes
versions, and after a SIGKILL mid-window resumes from its checkpointed offsets: the window's
bookkeeping then holds every record once (contiguous spans, none twice, none skipped)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tgnstream.apps.replay import replay_events
from tgnstream.core.loaders import load_dataset
from tgnstream.runtime.models import ModelStore

pytestmark = pytest.mark.kafka

WIKI = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "wikipedia.csv"
TOTAL, BATCH = 4_000, 200


def _config(tmp: Path, bootstrap: str, topic: str) -> Path:
    cfg = {
        "stream": {
            "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "group_id": None},
            "batch_max_events": BATCH,
            "batch_max_wait_ms": 100,
            "poll_timeout_ms": 100,
            "max_future_s": 1e9,
        },
        "start": {"memory_dim": 16, "seed": 1},  # replay sends no edge features
        "training": {
            "window_events": 1_600,
            "every_events": 800,
            "min_new_events": 400,
            "holdout_events": 400,
            "batch_size": 400,
            "lr": 1e-3,
        },
        "gate": {
            "max_ap_drop": 1.0,
            "max_mrr_drop": 1.0,
        },  # publish every round: the test is about bookkeeping
        "publish": {"dir": str(tmp / "models"), "keep": 10},
        "checkpoints": {"dir": str(tmp / "trainer"), "every_events": 400, "every_seconds": 1.0},
        "metrics_port": 0,
        "torch_threads": 1,
        "progress": False,
        "status_every_s": 2.0,
        "ready_file": str(tmp / "ready.json"),
    }
    path = tmp / "trainer.json"
    path.write_text(json.dumps(cfg))
    return path


def _start(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tgnstream", "trainer", "--config", str(config)],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _checkpoint(tmp: Path) -> dict | None:
    path = tmp / "trainer" / "trainer.pt"
    if not path.is_file():
        return None
    return torch.load(path, weights_only=False, map_location="cpu")["meta"]


def _wait(what, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")


def _run_until_checkpointed(proc: subprocess.Popen, tmp: Path, offset: int, log: Path) -> None:
    """Wait until the trainer's checkpoint reaches ``offset``, then stop it with SIGTERM (exit 0)."""
    try:
        _wait(lambda: (m := _checkpoint(tmp)) and int(m["next_offsets"]["0"]) == offset, 300, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def _spans(meta: dict) -> list[tuple[int, int, int]]:
    return [
        (w["first_offsets"][0], w["next_offsets"][0], int(w["src"].numel()))
        for w in meta["trainer"]["window"]
    ]


def test_trainer_publishes_and_resumes_exactly_after_sigkill(tmp_path, kafka_bootstrap, kafka_topic):
    data = load_dataset(WIKI, limit=TOTAL)
    replay_events(kafka_bootstrap, kafka_topic, data, progress=False)
    config = _config(tmp_path, kafka_bootstrap, kafka_topic)
    log = tmp_path / "trainer.log"
    proc = _start(config, log)
    try:
        store = ModelStore(tmp_path / "models")
        _wait(lambda: len(store.versions()) >= 2, 180, proc, log)  # the start model, then a round's
        # Mid-window: a checkpoint exists that has not reached the end of the topic.
        meta = _wait(
            lambda: (m := _checkpoint(tmp_path)) and m["next_offsets"]["0"] < TOTAL and m, 120, proc, log
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = int(_checkpoint(tmp_path)["next_offsets"]["0"])
    assert killed_at >= int(meta["next_offsets"]["0"])
    _run_until_checkpointed(_start(config, log), tmp_path, TOTAL, log)
    text = log.read_text()
    assert f"resuming from {tmp_path / 'trainer' / 'trainer.pt'}" in text
    final = _checkpoint(tmp_path)
    spans = _spans(final)
    # Every record once: each batch spans BATCH records with one event each (no bad records
    # here), the spans are contiguous and end at the log end.
    assert all(b - a == BATCH and n == BATCH for a, b, n in spans), spans
    assert all(x[1] == y[0] for x, y in zip(spans, spans[1:])), spans
    assert spans[-1][1] == TOTAL
    # The window's events are the topic's, in order (the dataset's rows, same dense ids).
    window = final["trainer"]["window"]
    t = torch.cat([w["t"] for w in window])
    start = spans[0][0]
    assert torch.equal(t, data.events.t[start:TOTAL])
    start, *versions = store.versions()
    assert start.gate["decision"] == "start model" and start.next_offsets == {}
    assert len(versions) >= 2
    offsets = [v.next_offsets[0] for v in versions]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert versions[-1].parent == versions[-2].version
    assert versions[-1].gate["decision"] == "published"


def test_trainer_waits_for_a_missing_topic_then_reads_it(tmp_path, kafka_bootstrap):
    """A trainer started before its topic exists says so (log and readiness), retries, and
    trains once the topic is there: no crash, no traceback."""
    import urllib.error
    import urllib.request
    import uuid

    from tgnstream.stream.kafka_admin import create_topic

    topic = f"later-{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, kafka_bootstrap, topic)
    log = tmp_path / "trainer.log"
    proc = _start(config, log)
    try:
        _wait(lambda: "cannot read the topic" in log.read_text(), 60, proc, log)
        port = json.loads((tmp_path / "ready.json").read_text())["metrics_port"]
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert not_ready.value.code == 503
        assert "topic_unavailable" in not_ready.value.read().decode()
        create_topic(kafka_bootstrap, topic, 1)
        replay_events(kafka_bootstrap, topic, load_dataset(WIKI, limit=1_000), progress=False)
    except BaseException:
        proc.kill()
        raise
    _run_until_checkpointed(proc, tmp_path, 1_000, log)
    text = log.read_text()
    assert f"topic {topic!r} does not exist" in text
    assert "Traceback" not in text
