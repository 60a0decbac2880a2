"""The shared step reproduces the pre-refactor behaviour: training losses, evaluation scores and
the states after training, evaluation and the serving apply on 20k wikipedia events, as recorded
by ``scripts/golden_step.py`` from the code before the step became one module."""

from __future__ import annotations

import importlib.util
import json
import math
import platform
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]


def _golden_module():
    spec = importlib.util.spec_from_file_location("golden_step", ROOT / "scripts" / "golden_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def golden_and_now(wikipedia_csv):
    mod = _golden_module()
    if not mod.DATA.exists():
        pytest.skip(f"{mod.DATA} not present")
    golden = json.loads(mod.GOLDEN.read_text())
    threads = torch.get_num_threads()
    try:
        now = mod.record()
    finally:
        torch.set_num_threads(threads)
    return golden, now


def _same_build(golden: dict) -> bool:
    """Same torch build, architecture, CPU capability and CPU model: the same float kernels run."""
    return _fingerprint(golden) == _fingerprint(
        {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": _golden_module().cpu_model(),
        }
    )


def _fingerprint(record: dict) -> tuple:
    return tuple(record.get(k) for k in ("torch", "machine", "cpu_capability", "cpu_model"))


def test_step_matches_the_pre_refactor_record_bit_for_bit(golden_and_now):
    golden, now = golden_and_now
    if not _same_build(golden):
        pytest.skip(
            f"recorded on {_fingerprint(golden)}; bits are compared only on the same torch build, "
            "architecture, CPU capability and CPU model (the tolerance test runs everywhere)"
        )
    for model, old in golden["runs"].items():
        assert now["runs"][model] == old, f"{model}: the step no longer reproduces the recorded run"


def test_step_matches_the_pre_refactor_record_within_tolerance(golden_and_now):
    """Holds on any build and CPU: another torch build or CPU capability (AVX2 vs AVX512 kernels)
    rounds float reductions differently, so losses agree within 1e-3 relative and the state's
    absolute sums within 1e-2 (the drift of 20k events), not bit for bit."""
    golden, now = golden_and_now
    for model, old in golden["runs"].items():
        new = now["runs"][model]
        assert len(new["losses"]) == len(old["losses"])
        for a, b in zip(new["losses"], old["losses"]):
            assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4)
        for key in ("train_state", "eval_state", "ingest_state"):
            for name, total in old[key]["abs_sums"].items():
                assert math.isclose(new[key]["abs_sums"][name], total, rel_tol=1e-2, abs_tol=1e-3), (
                    model,
                    key,
                    name,
                )
