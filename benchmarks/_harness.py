"""What every benchmark script shares: finding a dataset by name, and writing a results file that
says where its numbers came from.

Scripts import it as a sibling module (``from _harness import dataset_path, write_results``).
Python puts a script's own folder first on ``sys.path``, so ``python benchmarks/<script>.py``
finds it (and the sibling modules ``pyg_baseline`` and ``grpc_latency``) without any path
manipulation; it is not part of the installed package, because its defaults (the repository's
``../shared/datasets``, its git commit) only mean something in a checkout.

Datasets: ``wikipedia`` and ``bitcoinotc`` name the files in ``$TGNSTREAM_DATASETS`` (the folder
``scripts/image_test.sh`` reads too; default ``<repo>/../shared/datasets``); anything else is a
path. Use it as an argparse ``type`` (``--data wikipedia``, ``--data runs/x.csv``).

Results: ``write_results(path, payload)`` writes the payload with a ``provenance`` block first:
the command line, the git commit and whether the tree was dirty, the UTC date, the hardware
(``tgnstream.runtime.sysinfo.hardware_info``) and the library versions.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "DATASETS_ENV",
    "DATASET_FILES",
    "RESULTS",
    "ROOT",
    "command_line",
    "dataset_path",
    "datasets_dir",
    "provenance",
    "write_results",
]

#: The repository checkout the scripts live in.
ROOT = Path(__file__).resolve().parents[1]
#: Where results files are committed (``benchmarks/README.md`` cites each one).
RESULTS = ROOT / "benchmarks" / "results"
#: The one override: the folder holding the named datasets.
DATASETS_ENV = "TGNSTREAM_DATASETS"
#: Dataset names and their files in that folder.
DATASET_FILES = {"wikipedia": "wikipedia.csv", "bitcoinotc": "bitcoinotc.txt"}
#: Distributions whose versions every results file records (``python`` is added).
LIBRARIES = ("tgnstream", "torch", "numpy", "grpcio", "protobuf", "confluent-kafka", "kafka-python")


def datasets_dir() -> Path:
    """``$TGNSTREAM_DATASETS`` if set, else ``<repo>/../shared/datasets``."""
    env = os.environ.get(DATASETS_ENV)
    return Path(env).expanduser() if env else ROOT.parent / "shared" / "datasets"


def dataset_path(name: str | Path) -> Path:
    """A dataset name (``wikipedia``, ``bitcoinotc``) -> its file in :func:`datasets_dir`; any
    other value is taken as a path. Suitable as an argparse ``type``."""
    key = str(name)
    if key in DATASET_FILES:
        return datasets_dir() / DATASET_FILES[key]
    return Path(key).expanduser()


def command_line() -> str:
    """How this script was run, as ``python benchmarks/<script>.py ARGS`` (shell-quoted)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return "python " + shlex.join([str(script), *sys.argv[1:]])


def _git() -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(device: Any = None) -> dict[str, Any]:
    """Where a result came from: command, commit (and dirty flag), UTC date, hardware, versions.
    ``device`` (a ``torch.device`` or its name) adds the GPU's name when it is CUDA."""
    from tgnstream.runtime.sysinfo import hardware_info  # imports torch: only when writing

    if isinstance(device, str):
        import torch

        device = torch.device(device)
    info: dict[str, Any] = {
        "command": command_line(),
        **_git(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware_info(device),
        "versions": _versions(),
    }
    if os.environ.get(DATASETS_ENV):
        info["datasets_dir"] = str(datasets_dir())
    return info


def write_results(
    path: Path | str, payload: dict[str, Any], *, device: Any = None, quiet: bool = False
) -> Path:
    """Write ``payload`` as JSON to ``path`` with its :func:`provenance` first; returns the path.
    Calling it again on the same path (a partial result, then the complete one) rewrites it."""
    path = Path(path)
    doc = {"provenance": provenance(device), **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if not quiet:
        print(f"wrote {path}")
    return path
