"""Why continual training lost to the frozen model in ``benchmarks/continual.py``: PRES's
prediction-correction at serving time.

Takes the run's ``v000002`` (published by the continual trainer, with learned PRES statistics)
and scores the 6,000 events after its offsets three ways, on the evaluation protocol: as
published (PRES fusion in every serving apply), with its PRES statistics zeroed (no fusion:
``pres_fuse`` returns the updater's output for nodes without statistics), and the frozen start
model ``v000001`` replayed to the same offset.

    python benchmarks/continual.py --datasets wikipedia --rate 1000 --pres-gamma 0.9 \
        --work runs/continual_gamma09
    python benchmarks/continual_pres_check.py --run runs/continual_gamma09/wikipedia
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _harness import dataset_path

from tgnstream.core.loaders import load_dataset
from tgnstream.core.stream_eval import EvalSettings, evaluate_stream, summarise
from tgnstream.runtime.models import ModelStore
from tgnstream.trainer.bootstrap import featureless, replay_as_served


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run", type=Path, default=Path("runs/continual_gamma09/wikipedia"), help="a continual.py work dir"
    )
    p.add_argument(
        "--data", type=dataset_path, default="wikipedia", help="the run's dataset: a name or a path"
    )
    args = p.parse_args()
    torch.set_num_threads(2)
    data = featureless(load_dataset(args.data))
    store = ModelStore(args.run / "models")
    settings = EvalSettings(batch_size=200, rank=True)
    version = store.get("v000002")
    start = version.next_offsets[0]
    print(f"{version.version} (offsets {version.next_offsets}), events [{start}, {start + 6000}):")
    for label, zero in (("as published (PRES fusion on)", False), ("PRES statistics zeroed", True)):
        engine = version.load()
        if zero:
            engine.pres.count.zero_()
            engine.pres.mean.zero_()
        r = summarise(evaluate_stream(engine, data, start, start + 6000, settings))
        print(f"  {label:<32} AP {r['ap']:.4f}  MRR {r['mrr']:.4f}")
    frozen = replay_as_served(
        store.get("v000001").load(), data, store.get("v000001").next_offsets[0], start, 200
    )
    r = summarise(evaluate_stream(frozen, data, start, start + 6000, settings))
    print(f"  {'v000001 (frozen start model)':<32} AP {r['ap']:.4f}  MRR {r['mrr']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
