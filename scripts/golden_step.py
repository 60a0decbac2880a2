"""Record (or check) the golden outputs of the training/evaluation/ingest step on 20k wikipedia
events: per-batch training losses, evaluation scores and SHA-256 digests of the final state.

The record in ``tests/data/golden_step.json`` was written by the code *before* the step became
one module (issue 9), so ``tests/unit/core/test_step_golden.py`` checks that the refactor, and
every later change to the step, keeps today's behaviour bit for bit (on the same torch build
and CPU; elsewhere to a tolerance).

    python scripts/golden_step.py --write     # re-record (only when a change is meant to move it)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden_step.json"
DATA = ROOT.parent / "shared" / "datasets" / "wikipedia.csv"


# State added after the record was made (new behaviour, not part of what it pins down).
ADDED_AFTER_RECORD = frozenset({"first_event_time", "history.size"})


def state_digest(engine) -> dict:
    """SHA-256 over every recorded state tensor (weights and node state) plus per-tensor sums."""
    h = hashlib.sha256()
    sums = {}
    for k, v in sorted(engine.state_dict().items()):
        if k in ADDED_AFTER_RECORD:
            continue
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(t.numpy().tobytes())
        if t.is_floating_point():
            sums[k] = float(t.double().abs().sum())
    return {"sha256": h.hexdigest(), "abs_sums": sums}


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def run(pair: bool) -> dict:
    from tgnstream.core.config import ModelConfig
    from tgnstream.core.engine import MemoryEngine
    from tgnstream.core.loaders import load_dataset
    from tgnstream.core.negatives import NegativeSampler
    from tgnstream.core.stream_eval import EvalSettings, evaluate_stream
    from tgnstream.trainer.offline import make_optimizer, train_epoch

    torch.manual_seed(0)
    data = load_dataset(DATA, limit=20_000)
    val_start = 14_000
    engine = MemoryEngine(ModelConfig.preset("tgn", pair_features=pair), capacity=data.num_nodes)
    opt = make_optimizer(engine.model.parameters(), 1e-3)
    sampler = NegativeSampler(data.dst_nodes, seed=0)
    losses = []
    orig_backward = torch.Tensor.backward

    def recording_backward(self, *a, **kw):  # the loss of every batch, without changing the loop
        losses.append(float(self.detach()))
        return orig_backward(self, *a, **kw)

    torch.Tensor.backward = recording_backward
    try:
        train_epoch(engine, data, val_start, opt, sampler, 200, 0.5 if pair else 0.0)
    finally:
        torch.Tensor.backward = orig_backward
    after_train = state_digest(engine)
    scores = evaluate_stream(engine, data, val_start, len(data), EvalSettings(batch_size=200, rank=True))
    after_eval = state_digest(engine)
    # The serving apply path: prepare + commit (apply, then fold every pending message).
    engine.reset_state()
    engine.eval()
    for i in range(0, len(data), 500):
        prepared = engine.prepare_events(data.events.slice(i, i + 500))
        engine.commit_events(prepared)
    after_ingest = state_digest(engine)
    return {
        "losses": losses,
        "train_state": after_train,
        "eval_scores": {
            k: {"sha256": tensor_digest(v), "sum": float(v.double().sum())} for k, v in scores.items()
        },
        "eval_state": after_eval,
        "ingest_state": after_ingest,
    }


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def record() -> dict:
    torch.set_num_threads(1)  # bitwise reproducible reductions
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        # Float kernels are chosen per CPU capability (AVX2, AVX512, ...): bits match only within one.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(),  # and per vendor: MKL/oneDNN dispatch differs on Intel and AMD
        "runs": {"tgn": run(False), "tgn+pair": run(True)},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="overwrite tests/data/golden_step.json")
    args = p.parse_args()
    rec = record()
    if args.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(rec))
        print(f"wrote {GOLDEN}")
        return 0
    old = json.loads(GOLDEN.read_text())
    same = all(old["runs"][m][k] == rec["runs"][m][k] for m in rec["runs"] for k in rec["runs"][m])
    print("identical" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
