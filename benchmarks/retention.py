"""What pair-history retention costs in quality and saves in state (``history_max_age``,
``history_max_pairs``): a trained checkpoint replays its dataset up to the test span with each
retention rule (the same weights: the model was trained keeping every pair, as a served model
whose operator turns retention on would be), then the test span is evaluated with the training
protocol (``evaluate_stream``: AP against one uniform negative, MRR against every destination
or the sampled candidates). Ages are fractions of the dataset's time span, counts fractions of
the pairs a full history holds when the test span begins, so the rules mean the same on any
stream. Also the pairs held at the end and the pairs forgotten.

    python benchmarks/retention.py --run wikipedia=runs/wikipedia/checkpoint.pt \
        --run bitcoinotc=runs/bitcoinotc/checkpoint.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from _checkpoint_eval import checkpoint_runs_parser, replay_then_evaluate, test_start
from _harness import RESULTS, dataset_path, write_results

from tgnstream.core.checkpoint import load_checkpoint
from tgnstream.core.edge_history import pair_keys
from tgnstream.core.engine import MemoryEngine
from tgnstream.core.loaders import load_dataset

#: (label, age as a fraction of the span, count as a fraction of the pairs at the test span's start)
RULES = (
    ("none", None, None),
    ("age span/16", 1 / 16, None),
    ("age span/64", 1 / 64, None),
    ("count pairs/4", None, 1 / 4),
)


def evaluate(checkpoint: Path, data_name: str, rules, batch: int) -> dict:
    data = load_dataset(dataset_path(data_name))
    trained, _ = load_checkpoint(checkpoint)
    test0 = test_start(data)
    ev = data.events
    span = float(ev.t[-1] - ev.t[0])
    pairs_at_test = int(torch.unique(pair_keys(ev.src[:test0], ev.dst[:test0])).numel())
    out = {"span": span, "pairs_at_test_start": pairs_at_test, "rules": {}}
    for label, age_frac, count_frac in rules:
        age = None if age_frac is None else age_frac * span
        count = None if count_frac is None else max(1, int(count_frac * pairs_at_test))
        config = trained.config.model_copy(update={"history_max_age": age, "history_max_pairs": count})
        engine = MemoryEngine(config).eval()
        engine.model.load_state_dict(trained.model.state_dict())
        held_at_test: list[int] = []  # the pairs held when the test span begins (before it is evaluated)

        def note_held(held=held_at_test, history=engine.history) -> None:
            held.append(len(history))

        metrics, replay_s = replay_then_evaluate(engine, data, batch, f"{data_name} {label}", note_held)
        h = engine.history
        out["rules"][label] = {
            "max_age": age,
            "max_pairs": count,
            **metrics,
            "pairs_held_at_test_start": held_at_test[0],
            "pairs_held_at_end": len(h),
            "forgotten_by_age": int(h.evicted[0]),
            "forgotten_by_count": int(h.evicted[1]),
            "sweeps": int(h.evicted[2]),
            "replay_s": replay_s,
        }
    return out


def main() -> int:
    p = checkpoint_runs_parser(__doc__, RESULTS / "retention.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for run in args.run:
        name, _, ckpt = run.partition("=")
        r = results[name] = evaluate(Path(ckpt), name, RULES, args.batch_size)
        base = r["rules"]["none"]
        print(f"\n{name}: {ckpt} (time span {r['span']:.4g}, {r['pairs_at_test_start']} pairs at test start)")
        print(
            f"{'retention':<16}{'test AP':>9}{'test MRR':>10}{'Δ MRR':>9}"
            f"{'pairs held':>12}{'forgotten':>11}{'vs none':>9}"
        )
        for label, row in r["rules"].items():
            forgotten = row["forgotten_by_age"] + row["forgotten_by_count"]
            print(
                f"{label:<16}{row['ap']:>9.4f}{row['mrr']:>10.4f}{row['mrr'] - base['mrr']:>+9.4f}"
                f"{row['pairs_held_at_end']:>12}{forgotten:>11}"
                f"{row['pairs_held_at_end'] / max(1, base['pairs_held_at_end']):>9.2f}"
            )
    write_results(args.out, {"benchmark": "retention", "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
