"""``tgnstream trainer`` under torchrun with two CPU ranks (gloo) on a real broker: both ranks read
the topic, split every training batch, agree on rounds and gate decisions, and rank 0 publishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tgnstream.apps.broker import free_port
from tgnstream.apps.replay import replay_events
from tgnstream.core.loaders import load_dataset
from tgnstream.runtime.models import ModelStore

from .test_trainer_service import WIKI, _config

pytestmark = pytest.mark.kafka


def test_two_ranks_train_and_rank_zero_publishes(tmp_path, kafka_bootstrap, kafka_topic):
    replay_events(kafka_bootstrap, kafka_topic, load_dataset(WIKI, limit=2_000), progress=False)
    config = _config(tmp_path, kafka_bootstrap, kafka_topic)
    log = tmp_path / "torchrun.log"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen(
        [
            str(torchrun),
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "tgnstream",
            "trainer",
            "--config",
            str(config),
        ],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    store = ModelStore(tmp_path / "models")
    try:
        deadline = time.monotonic() + 180
        while len(store.versions()) < 3:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = log.read_text()
    assert "rank 0 of 2 (torch.distributed, gloo)" in text and "rank 1 of 2 (torch.distributed, gloo)" in text
    start, *versions = store.versions()
    assert start.version == "v000001" and start.next_offsets == {}  # the start model, at once
    assert versions[0].parent == "v000001" and versions[1].parent == versions[0].version
    assert [v.next_offsets[0] for v in versions[:2]] == [800, 1600]
