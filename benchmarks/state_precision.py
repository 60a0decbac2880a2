"""What storing node memories and pending messages in 16 bits costs (``ModelSpec.state_dtype``):
a trained checkpoint replays its dataset with float32, bfloat16 and float16 storage (the same
weights; computation stays float32, values are rounded when stored), then the test span is
evaluated with the training protocol (``evaluate_stream``: AP against one uniform negative,
MRR against every destination or the sampled candidates). Also the bytes per node the two
buffers take with each type.

    python benchmarks/state_precision.py --run wikipedia=runs/wikipedia/checkpoint.pt \
        --run bitcoinotc=runs/bitcoinotc/checkpoint.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _harness import RESULTS, dataset_path, write_results
from tqdm.auto import tqdm

from tgnstream.core.checkpoint import load_checkpoint
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.loaders import load_dataset
from tgnstream.core.step import TemporalStep
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream, summarise
from tgnstream.trainer.config import OfflineTrainConfig

DTYPES = ("float32", "bfloat16", "float16")


def evaluate(checkpoint: Path, data_name: str, dtype: str, batch: int) -> dict:
    data = load_dataset(dataset_path(data_name))
    trained, _ = load_checkpoint(checkpoint)
    engine = MemoryEngine(trained.config.model_copy(update={"state_dtype": dtype})).eval()
    engine.model.load_state_dict(trained.model.state_dict())
    defaults = OfflineTrainConfig.model_fields
    _, test0 = data.chronological_split(defaults["val_frac"].default, defaults["test_frac"].default)
    with torch.no_grad():
        for i in tqdm(range(0, test0, batch), desc=f"{data_name} {dtype} history", leave=False):
            TemporalStep(engine).apply(data.events.slice(i, min(i + batch, test0)))
    metrics = summarise(evaluate_stream(engine, data, test0, len(data), EvalSettings(batch_size=batch)))
    mem = engine.memory
    per_node = (mem.memory[0].numel() * mem.memory.element_size()) + (
        mem.mail[0].numel() * mem.mail.element_size()
    )
    return {**{k: float(v) for k, v in metrics.items()}, "memory_and_mail_bytes_per_node": per_node}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="DATASET=CHECKPOINT",
        help="dataset and its checkpoint",
    )
    p.add_argument("--batch-size", type=int, default=200, help="evaluation batch (the training protocol's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "state_precision.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for run in args.run:
        name, _, ckpt = run.partition("=")
        results[name] = {dtype: evaluate(Path(ckpt), name, dtype, args.batch_size) for dtype in DTYPES}
        base = results[name]["float32"]
        print(f"\n{name}: {ckpt}")
        print(f"{'storage':<10}{'test AP':>10}{'test MRR':>10}{'Δ MRR':>10}{'B/node (memory+mail)':>24}")
        for dtype, r in results[name].items():
            print(
                f"{dtype:<10}{r['ap']:>10.4f}{r['mrr']:>10.4f}{r['mrr'] - base['mrr']:>+10.4f}"
                f"{r['memory_and_mail_bytes_per_node']:>24.0f}"
            )
    write_results(args.out, {"benchmark": "state_precision", "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
