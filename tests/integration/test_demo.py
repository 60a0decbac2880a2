"""``tgnstream demo`` end to end on the embedded broker with a short trained start: it runs, a
SIGINT stops it cleanly (exit 0) with a summary (events applied, online AP, gate decisions) and
the plots, and no process it started is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka

WIKI = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "wikipedia.csv"


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                        found.add(int(entry.name))
                        todo.append(int(entry.name))
                except (OSError, IndexError, ValueError):
                    continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(400)
def test_demo_runs_and_stops_cleanly_on_sigint(tmp_path):
    cmd = [
        sys.executable, "-m", "tgnstream", "demo", "--data", str(WIKI), "--duration-s", "300",
        "--rate", "800", "--epochs", "2", "--every-events", "4000", "--out", str(tmp_path), "--no-live-view",
    ]  # fmt: skip
    log = tmp_path / "demo.log"
    proc = subprocess.Popen(
        cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        deadline = time.monotonic() + 200
        while "[4/4]" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        time.sleep(60)  # the loop runs: replay, swaps, queries
        tree = _descendants(proc.pid)
        assert len(tree) >= 3, "broker, server and trainer should be running"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in tree if _alive(p)], "processes left behind"
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["events_applied"] > 0
    assert summary["online_ap"] > 0.8, summary
    assert sum(summary["gate_decisions"].values()) >= 1, summary
    assert summary["failed_queries"] == 0
    assert len(summary["plots"]) == 2 and all(Path(p).stat().st_size > 10_000 for p in summary["plots"])
    text = log.read_text()
    assert "summary:" in text and "Traceback" not in text
