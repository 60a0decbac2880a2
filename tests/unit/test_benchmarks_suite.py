"""The benchmark scripts stay a suite: each answers ``--help``, finds datasets and writes results
through ``benchmarks/_harness.py`` (no ``sys.path`` edits, no hard-coded dataset folder), and
``benchmarks/README.md`` indexes every script and cites every results file.
"""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))
#: Sibling modules the scripts import by name (the script's folder is ``sys.path[0]``).
SIBLINGS = ("_harness", "_checkpoint_eval", "grpc_latency", "pyg_baseline")


@pytest.fixture
def bench_path(monkeypatch):
    """``benchmarks/`` first on ``sys.path``, as ``python benchmarks/<script>.py`` has it."""
    monkeypatch.syspath_prepend(str(BENCH))
    yield
    for name in SIBLINGS:
        sys.modules.pop(name, None)


def test_there_are_scripts():
    assert len(SCRIPTS) >= 15, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_answers_help(script, bench_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(script), run_name="__main__")
    assert stop.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_a_script_runs_as_a_plain_script():
    """No path set up by anyone: the script's folder alone makes ``_harness`` importable."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "decode.py"), "--help"],
        cwd=ROOT.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--data" in out.stdout


DATASET_FOLDER = re.compile(r"shared['\"]?\s*/\s*['\"]?datasets")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_uses_the_harness(script):
    text = script.read_text()
    assert not re.search(r"sys\.path\.(insert|append)|PYTHONPATH", text), "no sys.path edits"
    assert not DATASET_FOLDER.search(text), "datasets are found by _harness.dataset_path"
    assert not re.search(r"\bROOT\s*=", text), "the repository root comes from _harness"
    if "load_dataset(" in text:
        assert re.search(r"from _harness import .*\bdataset_path\b", text), "load datasets by name"
    if '"--out"' in text or "RESULTS" in text:
        assert re.search(r"from _harness import .*\bwrite_results\b", text), "write results via harness"
    assert not re.search(r"\b(args\.out|out)\.write_text\(", text), "results go through write_results"


def test_dataset_lookup_and_override(bench_path, monkeypatch, tmp_path):
    import _harness

    monkeypatch.delenv(_harness.DATASETS_ENV, raising=False)
    assert _harness.dataset_path("wikipedia") == ROOT.parent / "shared" / "datasets" / "wikipedia.csv"
    monkeypatch.setenv(_harness.DATASETS_ENV, str(tmp_path))
    assert _harness.dataset_path("bitcoinotc") == tmp_path / "bitcoinotc.txt"
    assert _harness.dataset_path("runs/x.csv") == Path("runs/x.csv")


def test_results_writer_records_provenance(bench_path, monkeypatch, tmp_path):
    import _harness

    monkeypatch.setattr(sys, "argv", [str(BENCH / "decode.py"), "--events", "10"])
    path = _harness.write_results(tmp_path / "r.json", {"benchmark": "x", "value": 1.5}, quiet=True)
    doc = json.loads(path.read_text())
    run = doc["provenance"]
    assert doc["value"] == 1.5 and list(doc)[0] == "provenance"
    assert run["command"] == "python benchmarks/decode.py --events 10"
    assert {"commit", "dirty", "date_utc", "hardware", "versions"} <= set(run)
    assert {"python", "torch", "numpy", "grpcio", "protobuf", "confluent-kafka"} <= set(run["versions"])
    assert run["hardware"]["cpu_cores"] >= 1


def test_readme_indexes_every_script_and_cites_every_result():
    readme = (BENCH / "README.md").read_text()
    missing_scripts = [p.name for p in SCRIPTS if f"benchmarks/{p.name}" not in readme]
    assert not missing_scripts, f"not indexed in benchmarks/README.md: {missing_scripts}"
    uncited = [p.name for p in sorted((BENCH / "results").iterdir()) if p.name not in readme]
    assert not uncited, f"results files cited nowhere in benchmarks/README.md: {uncited}"


def test_the_scale_benchmark_runs_at_small_sizes(tmp_path):
    """``benchmarks/scale.py`` end to end at two small sizes: every cost measured, each fitted."""
    out = tmp_path / "scale.json"
    run = subprocess.run(
        [sys.executable, str(BENCH / "scale.py"), "--nodes", "1500", "3000", "--events-per-node", "4",
         "--query-reps", "5", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    sizes = doc["sizes"]
    assert [s["events"] for s in sizes] == [6000, 12000]
    for s in sizes:
        assert s["ingest_events_per_s"] > 0 and s["snapshot"]["bytes"] > 0 and s["bytes_per_node_total"] > 0
        assert s["nodes"] == s["capacity"] or s["nodes"] < s["capacity"]
    assert all(f is not None for f in doc["fits"].values())
    assert out.with_suffix(".png").stat().st_size > 0
