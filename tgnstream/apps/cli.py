"""``tgnstream`` command line: one entry point, one subcommand per job.

Only the chosen subcommand's parser is built (``tgnstream --help`` and ``tgnstream query ...``
import neither torch nor pydantic); :func:`build_parser` with ``full=True`` builds them all.
The global options (``-v``, ``--log-level``) are accepted before or after the subcommand.

Exit status, the same for every subcommand (:data:`EXIT_CODES`):

- 0 (``EXIT_OK``): success;
- 1 (``EXIT_FAILURE``): the command failed while running (an error reply from the server, a
  broker or a replay that failed, an ingest failure the server cannot recover from, ...);
- 2 (``EXIT_USAGE``): usage or configuration error: a wrong command line (argparse's own
  status), settings that fail validation, an input file that is missing or malformed;
- 3 (``EXIT_UNREACHABLE``): the server could not be reached (``tgnstream query``: UNAVAILABLE
  after the retries);
- 130: interrupted by Ctrl-C (commands that stop gracefully on SIGINT, such as ``serve``,
  ``trainer`` and ``broker``, return their own status instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tgnstream.apps.query_cli import HELP as QUERY_HELP

__all__ = [
    "main",
    "build_parser",
    "COMMANDS",
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "EXIT_UNREACHABLE",
    "EXIT_INTERRUPTED",
]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EXIT_CODES = """exit status (every command):
  0    success
  1    the command failed while running (an error reply, a failed broker, replay or ingest)
  2    usage or configuration error: a wrong command line, settings that fail validation,
       an input file that is missing or malformed
  3    the server could not be reached (query: UNAVAILABLE after the retries)
  130  interrupted (Ctrl-C), where the command does not stop gracefully by itself"""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _help(command: str) -> str:
    return COMMANDS[command][0]


#: ``--no-X`` of a setting whose default is a value and None turns it off (pipeline_mitigation).
_OFF = "__off__"


def _flag_type(annotation) -> tuple[object, bool]:
    """``annotation`` without ``None`` and ``Annotated`` metadata, and whether it allowed None."""
    import types
    import typing

    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        (annotation,) = args
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation, optional


def _add_setting_flag(group, name: str, info) -> None:
    """``--name`` for the pydantic field ``info``: a bool is ``--name/--no-name``, a Literal has
    choices; default None (unset: the config's default or environment variable applies)."""
    import typing

    tp, optional = _flag_type(info.annotation)
    flag = "--" + name.replace("_", "-")
    help_ = (info.description or "").replace("%", "%%")
    if info.is_required():
        group.add_argument(flag, required=True, help=help_)
        return
    if info.default is not None and name not in _spec_fields():
        help_ += f" (default {info.default})"
    if tp is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
    elif typing.get_origin(tp) is typing.Literal:
        group.add_argument(flag, choices=typing.get_args(tp), default=None, help=help_)
    else:
        group.add_argument(flag, type=tp if tp in (int, float) else str, default=None, help=help_)
    if optional and info.default is not None and tp is not bool:
        group.add_argument(
            "--no-" + flag[2:], dest=name, action="store_const", const=_OFF, help=f"turn {flag} off"
        )


def _spec_fields() -> set[str]:
    from tgnstream.core.spec import ModelSpec

    return {"preset", "model", *ModelSpec.model_fields}


def _train_parser(sub) -> None:
    """Every flag is generated from ``OfflineTrainConfig``'s fields: the model spec's (a preset and
    one override per ``ModelSpec`` field) and the training settings."""
    from tgnstream.trainer.config import OfflineTrainConfig

    p = sub.add_parser(
        "train",
        help=_help("train"),
        description="Train on the first 70% of a stream (chronological), early-stop on the next "
        "15%, report test AP/AUC/MRR/hits@10 (transductive and inductive) on the last 15%. "
        "Writes OUT/checkpoint.pt and OUT/results.json. With no flags it trains the recommended "
        "model with the recommended recipe (what `make train` runs). Every option can also be set "
        "with an environment variable TGNSTREAM_TRAIN_<OPTION>.",
    )
    fields = OfflineTrainConfig.model_fields
    spec = _spec_fields()
    model = p.add_argument_group(
        "model (a preset of tgnstream.core.spec.ModelSpec; each flag overrides one of its fields; "
        "edge_dim is the data's)"
    )
    training = p.add_argument_group("training")
    for name in ("data", "out"):
        _add_setting_flag(p, name, fields[name])
    first = ("data", "out", "preset", "model")
    for name in first[2:] + tuple(n for n in fields if n not in first):
        _add_setting_flag(model if name in spec else training, name, fields[name])
    p.set_defaults(func=_run_train)


def _train_config(args):
    """The ``OfflineTrainConfig`` of parsed ``train`` arguments: the flags given, then the
    environment, then the defaults (the recommended preset and recipe)."""
    from tgnstream.trainer.config import OfflineTrainConfig

    given = {
        k: None if v == _OFF else v
        for k, v in vars(args).items()
        if v is not None and k not in ("command", "func", "log_level", "verbose")
    }
    return OfflineTrainConfig(**given)


def _run_train(args) -> int:
    import torch

    from tgnstream.core.loaders import load_dataset
    from tgnstream.runtime.sysinfo import resolve_device
    from tgnstream.trainer.offline import train_offline, write_outputs

    cfg = _train_config(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data, limit=cfg.limit)
    model_cfg = cfg.model_spec(edge_dim=data.edge_dim)
    logging.info(
        "%s: %d events, %d nodes, %s, edge dim %d, device %s; model: preset %s (%s)",
        data.name,
        len(data),
        data.num_nodes,
        "bipartite" if data.bipartite else "general",
        data.edge_dim,
        device,
        cfg.preset,
        model_cfg.label,
    )
    result = train_offline(data, cfg, model_cfg, device)
    write_outputs(result, cfg.out)
    r = result.results
    print(
        json.dumps(
            {
                "train_events_per_s": round(r["train_events_per_s"]),
                "best_epoch": r["best_epoch"],
                "test": r["test"],
            },
            indent=2,
        )
    )
    print(f"wrote {cfg.out / 'checkpoint.pt'} and {cfg.out / 'results.json'}")
    return 0


def _baseline_parser(sub) -> None:
    from tgnstream.core.heuristics import DEFAULT_BASELINES, HEURISTICS

    p = sub.add_parser(
        "baseline",
        help=_help("baseline"),
        description="Score the validation and test spans of a dataset's chronological split with "
        "heuristic baselines (no learning), through the same evaluation code, negatives and "
        f"candidates as `tgnstream train`. Heuristics: {', '.join(HEURISTICS)}; 'a>b' breaks a's "
        "ties by b. Writes OUT/results.json (the best row by validation MRR under 'test', every row "
        "under 'baselines').",
    )
    p.add_argument("--data", required=True, help="JODIE CSV (wikipedia.csv) or edge list (bitcoinotc.txt)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--heuristics",
        default=",".join(DEFAULT_BASELINES),
        help="comma-separated heuristics (default: all, and their combinations with a global tie-breaker)",
    )
    p.add_argument(
        "--history",
        choices=["event", "batch", "both"],
        default="both",
        help="history seen by a query: every earlier event, or only earlier batches (default both)",
    )
    p.add_argument("--batch-size", type=int, default=200, help="evaluation batch (default 200, as train)")
    p.add_argument("--limit", type=int, help="use only the first N events")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    p.set_defaults(func=_run_baseline)


def _run_baseline(args) -> int:
    from pathlib import Path

    from tgnstream.core.baselines import evaluate_baselines
    from tgnstream.core.heuristics import parse_heuristic
    from tgnstream.core.loaders import load_dataset
    from tgnstream.core.stream_eval import EvalSettings
    from tgnstream.trainer.config import OfflineTrainConfig

    specs = tuple(s.strip() for s in args.heuristics.split(",") if s.strip())
    for spec in specs:
        parse_heuristic(spec)  # a typo fails before the dataset is loaded
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    histories = ("event", "batch") if args.history == "both" else (args.history,)
    data = load_dataset(args.data, limit=args.limit)
    split = OfflineTrainConfig.model_fields
    settings = EvalSettings(batch_size=args.batch_size, rank=True, progress=args.progress)
    results = evaluate_baselines(
        data, settings, specs, histories, split["val_frac"].default, split["test_frac"].default
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{'baseline':<42} {'val MRR':>8} {'test AP':>8} {'test MRR':>9} {'hits@10':>8}")
    for name, row in results["baselines"].items():
        val, test = row["val"], row["test"]["transductive"]
        cells = f"{val['mrr']:>8.4f} {test['ap']:>8.4f} {test['mrr']:>9.4f} {test['hits@10']:>8.4f}"
        print(f"{name:<42} {cells}")
    print(f"best by validation MRR: {results['best_by_val_mrr']}; wrote {out / 'results.json'}")
    return 0


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help=_help("serve"),
        description="Restore the newest snapshot (or start a model from scratch / a checkpoint), "
        "apply the topic's events from the snapshot's offsets, serve tgnstream.rpc.v1.LinkPrediction "
        "plus grpc.health.v1 and reflection, export Prometheus metrics, snapshot state + offsets "
        "periodically. Settings come from --config (TOML or JSON) and environment variables "
        "TGNSTREAM_SERVE_<SECTION>__<FIELD>, which win over the file. SIGTERM/SIGINT stop it "
        "gracefully (final snapshot).",
    )
    p.add_argument("--config", help="TOML or JSON settings file (docs/configuration.md lists every key)")
    p.add_argument("--print-config", action="store_true", help="print the effective settings and exit")
    p.set_defaults(func=_run_serve)


def _run_service(args, load_config, run) -> int:
    """``serve`` and ``trainer``: settings from --config and the environment, the command line's
    log level over the file's, then ``run(cfg)``."""
    cfg = load_config(args.config)
    if args.print_config:
        print(cfg.model_dump_json(indent=2))
        return 0
    level = args.log_level or cfg.log_level  # the command line wins over the file
    logging.getLogger().setLevel(level)
    if level != "DEBUG":
        # kafka-python logs every connection event at INFO; keep the log readable.
        logging.getLogger("kafka").setLevel(logging.WARNING)
    return run(cfg)


def _run_serve(args) -> int:
    from tgnstream.apps.serve import run_server
    from tgnstream.apps.serve_config import load_serve_config

    return _run_service(args, load_serve_config, run_server)


def _trainer_parser(sub) -> None:
    p = sub.add_parser(
        "trainer",
        help=_help("trainer"),
        description="Read the topic through the shared stream path from the trainer's own checkpointed "
        "offsets (or the newest published version's, or the start), keep a window of recent events, "
        "and every M events or T seconds fine-tune a candidate on it (large batches with PRES, "
        "pipelined memory), gate it against the published weights on the newest held-out events, "
        "and publish it to models/<version>/ when it is not worse. Settings come from --config (TOML "
        "or JSON) and environment variables TGNSTREAM_TRAINER_<SECTION>__<FIELD>, which win over the "
        "file. SIGTERM/SIGINT stop it after the current step, with a final checkpoint.",
    )
    p.add_argument("--config", help="TOML or JSON settings file (see deploy/trainer.toml)")
    p.add_argument("--print-config", action="store_true", help="print the effective settings and exit")
    p.set_defaults(func=_run_trainer)


def _run_trainer(args) -> int:
    from tgnstream.apps.trainer import run_trainer
    from tgnstream.trainer.continual_config import load_trainer_config

    return _run_service(args, load_trainer_config, run_trainer)


def _broker_parser(sub) -> None:
    from tgnstream.apps.broker import add_parser

    add_parser(sub)


def _replay_parser(sub) -> None:
    from tgnstream.apps.replay import add_parser

    add_parser(sub)


def _query_parser(sub) -> None:
    from tgnstream.apps.query_cli import add_parser

    add_parser(sub)


def _demo_parser(sub) -> None:
    from tgnstream.apps.demo import add_parser

    add_parser(sub)


#: name -> (one-line help shown by ``tgnstream --help``, the function that adds the full
#: parser). The help of a command whose parser lives in another module repeats that module's
#: (tests/unit/test_cli_parsing.py checks that they agree), so that listing the commands
#: imports none of them.
COMMANDS: dict[str, tuple[str, Callable[[argparse._SubParsersAction], None]]] = {
    "train": ("offline training + evaluation on a recorded stream", _train_parser),
    "baseline": (
        "evaluate memorization heuristics on a dataset with the models' evaluation protocol",
        _baseline_parser,
    ),
    "serve": ("ingest a Kafka topic into live memory and answer gRPC link-prediction queries", _serve_parser),
    "trainer": (
        "continual training on the topic: fine-tune, gate, publish versions for servers to hot-swap",
        _trainer_parser,
    ),
    "broker": ("run the embedded Kafka-compatible broker (Tansu, in-memory) until Ctrl-C", _broker_parser),
    "replay": ("publish a recorded stream to a Kafka topic, in time order", _replay_parser),
    "query": (QUERY_HELP, _query_parser),
    "demo": (
        "the whole loop on this machine: broker, server, trainer, replay, queries, live view",
        _demo_parser,
    ),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tgnstream")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(f"tgnstream {_version()}\n", sys.stdout)
        parser.exit()


def _global_options(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """``-v`` and ``--log-level``. The top-level parser holds the defaults; each subcommand's
    copy (``suppress``) sets only what is given after the subcommand, so that an option given
    before it is not reset."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    g = p.add_argument_group("global options (before or after the command)") if suppress else p
    g.add_argument("-v", "--verbose", action="store_true", default=default(False), help="debug logging")
    g.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        default=default(None),
        help=f"{', '.join(LOG_LEVELS)} (default INFO, or the settings file's for serve and trainer)",
    )


def _with_global_options(p: argparse.ArgumentParser) -> None:
    """Add the global options to ``p`` and to every parser below it (query's queries)."""
    _global_options(p, suppress=True)
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in {id(c): c for c in action.choices.values()}.values():
                _with_global_options(child)


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (its first command name before ``--``), or None."""
    for arg in argv:
        if arg == "--":
            return None
        if arg in COMMANDS:
            return arg
    return None


def build_parser(argv: Sequence[str] | None = None, *, full: bool = False) -> argparse.ArgumentParser:
    """The parser of ``tgnstream``. Only the subcommand named in ``argv`` gets its full parser
    (the others are listed with their help, and building theirs would import what they need);
    ``full``: every subcommand's."""
    parser = argparse.ArgumentParser(
        prog="tgnstream",
        description="Streaming temporal GNN service.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, suppress=False)
    parser.add_argument("--version", action=_VersionAction, help="show program's version number and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = None if full else _command_in(sys.argv[1:] if argv is None else argv)
    for name, (help_, add) in COMMANDS.items():
        if full or name == chosen:
            add(sub)
            _with_global_options(sub.choices[name])
        else:
            sub.add_parser(name, help=help_)  # listed only: never parsed
    return parser


_INPUT_FILES = ("data", "config")  # options naming a file a command reads first


def _check_inputs(args: argparse.Namespace) -> None:
    """A file named on the command line that does not exist is a usage error (status 2) for
    every command, before anything starts."""
    for name in _INPUT_FILES:
        value = getattr(args, name, None)
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"--{name} {value}: no such file")


def main(argv: list[str] | None = None) -> int:
    """Run ``tgnstream``; returns the exit status (the module docstring's convention; argparse
    itself exits with 2 on a wrong command line and 0 after ``--help``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    level = args.log_level or ("DEBUG" if args.verbose else None)
    logging.basicConfig(level=level or logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    del args.verbose
    args.log_level = level  # explicit on the command line, or None
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        _check_inputs(args)
        # Log lines go through tqdm.write while a command runs: a line logged under a progress
        # bar (ours or a library's) is printed above it instead of splitting it.
        with logging_redirect_tqdm():
            return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        logging.error("%s", e)
        return EXIT_USAGE
    except KeyboardInterrupt:
        logging.error("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
