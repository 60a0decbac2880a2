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

import sys
from pathlib import Path

import torch
from _checkpoint_eval import checkpoint_runs_parser, replay_then_evaluate
from _harness import RESULTS, dataset_path, write_results

from tgnstream.core.checkpoint import load_checkpoint
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.loaders import load_dataset

DTYPES = ("float32", "bfloat16", "float16")


def evaluate(checkpoint: Path, data_name: str, dtype: str, batch: int) -> dict:
    data = load_dataset(dataset_path(data_name))
    trained, _ = load_checkpoint(checkpoint)
    engine = MemoryEngine(trained.config.model_copy(update={"state_dtype": dtype})).eval()
    engine.model.load_state_dict(trained.model.state_dict())
    metrics, _ = replay_then_evaluate(engine, data, batch, f"{data_name} {dtype}")
    mem = engine.memory
    per_node = (mem.memory[0].numel() * mem.memory.element_size()) + (
        mem.mail[0].numel() * mem.mail.element_size()
    )
    return {**metrics, "memory_and_mail_bytes_per_node": per_node}


def main() -> int:
    p = checkpoint_runs_parser(__doc__, RESULTS / "state_precision.json")
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
