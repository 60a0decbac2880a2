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


def test_step_matches_the_pre_refactor_record(wikipedia_csv):
    mod = _golden_module()
    if not mod.DATA.exists():
        pytest.skip(f"{mod.DATA} not present")
    golden = json.loads(mod.GOLDEN.read_text())
    threads = torch.get_num_threads()
    try:
        now = mod.record()
    finally:
        torch.set_num_threads(threads)
    same_build = golden["torch"] == torch.__version__ and golden["machine"] == platform.machine()
    for model, old in golden["runs"].items():
        new = now["runs"][model]
        if same_build:
            # Same torch build and CPU architecture: bit for bit.
            assert new == old, f"{model}: the step no longer reproduces the recorded run"
            continue
        # Another torch build reorders float reductions: close, not identical.
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
