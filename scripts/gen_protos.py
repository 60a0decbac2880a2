#!/usr/bin/env python
"""Regenerate (or check) the checked-in gRPC/protobuf stubs of ``tgnstream.rpc.v1``.

The stubs under ``tgnstream/rpc/v1/`` are generated from ``protos/`` and checked in, never edited
by hand. This script is the only way they change:

    python scripts/gen_protos.py            # regenerate tgnstream/rpc/v1/*_pb2*.py(i)
    python scripts/gen_protos.py --check    # exit 1 if the checked-in stubs are out of date

Why the generator version is pinned: generated code embeds a runtime version check (grpc's
``GRPC_GENERATED_VERSION`` and protobuf's ``ValidateProtobufRuntimeVersion``), so stubs made by a
newer grpcio-tools would demand that newer grpcio/protobuf at run time. Pinning grpcio-tools to
the grpcio floor of ``pyproject.toml`` keeps the stubs loadable by every supported runtime, and
makes the output byte-for-byte reproducible, which is what ``--check`` relies on.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import importlib.resources
import shutil
import sys
import tempfile
from pathlib import Path

#: The one grpcio-tools version allowed to generate the stubs. Keep equal to the grpcio floor
#: (``grpcio>=``) and to the ``grpcio-tools==`` pin in pyproject.toml; a unit test checks both.
PINNED_GRPCIO_TOOLS = "1.68.1"

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROTOS_DIR = REPO_ROOT / "protos"
#: Stubs land at ``<out_root>/<proto path>``; with include path ``protos`` that is
#: ``tgnstream/rpc/v1/``, so generated imports read ``from tgnstream.rpc.v1 import ...``.
DEFAULT_OUT_ROOT = REPO_ROOT
#: Suffixes protoc produces for one ``x.proto``: x_pb2.py, x_pb2.pyi, x_pb2_grpc.py.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class GeneratorVersionError(RuntimeError):
    """The installed grpcio-tools is missing or is not the pinned version."""


def installed_grpcio_tools() -> str | None:
    """Version of the installed grpcio-tools distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        return None


def require_pinned_grpcio_tools() -> None:
    """Refuse to generate with any grpcio-tools but the pinned one (see the module docstring)."""
    found = installed_grpcio_tools()
    if found != PINNED_GRPCIO_TOOLS:
        have = "not installed" if found is None else f"{found} is installed"
        raise GeneratorVersionError(
            f"grpcio-tools=={PINNED_GRPCIO_TOOLS} is required to generate the stubs, but {have}. "
            f"Install it with: pip install --no-deps grpcio-tools=={PINNED_GRPCIO_TOOLS} "
            "(it is also in the 'test' extra of pyproject.toml)."
        )


def proto_files(protos_dir: Path) -> list[Path]:
    """All .proto files under ``protos_dir``, relative to it, in a stable order."""
    files = sorted(p.relative_to(protos_dir) for p in protos_dir.rglob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files under {protos_dir}")
    return files


def expected_outputs(protos: list[Path]) -> list[Path]:
    """Relative paths of the files protoc writes for ``protos``."""
    return [p.with_name(p.stem + suffix) for p in protos for suffix in GENERATED_SUFFIXES]


def generate(protos_dir: Path, out_root: Path) -> list[Path]:
    """Run protoc (python, grpc_python and pyi outputs) over every proto; return the outputs.

    Returned paths are relative to ``out_root``. Raises RuntimeError if protoc fails.
    """
    require_pinned_grpcio_tools()
    # Imported here so that --help works without grpcio-tools installed.
    from grpc_tools import protoc

    protos = proto_files(protos_dir)
    # The well-known types (google/protobuf/*.proto) ship inside grpc_tools.
    wkt_include = str(importlib.resources.files("grpc_tools") / "_proto")
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{protos_dir}",
        f"-I{wkt_include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        *(str(protos_dir / p) for p in protos),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} (its errors are printed above)")
    outputs = expected_outputs(protos)
    missing = [str(p) for p in outputs if not (out_root / p).is_file()]
    if missing:
        raise RuntimeError(f"protoc did not write {missing}")
    return outputs


def checked_in_stubs(out_root: Path, protos: list[Path]) -> set[Path]:
    """Generated-looking files currently present in the stub folders of ``protos``."""
    found: set[Path] = set()
    for folder in {p.parent for p in protos}:
        directory = out_root / folder
        if directory.is_dir():
            for f in directory.iterdir():
                if f.is_file() and f.name.endswith(GENERATED_SUFFIXES):
                    found.add(f.relative_to(out_root))
    return found


def check(protos_dir: Path = DEFAULT_PROTOS_DIR, out_root: Path = DEFAULT_OUT_ROOT) -> list[str]:
    """Compare freshly generated stubs with those under ``out_root``; return the problems.

    An empty list means the checked-in stubs are exactly what the pinned generator produces.
    Each problem is one line: ``differs: PATH``, ``missing: PATH`` (should exist, does not) or
    ``extra: PATH`` (a generated-looking file with no .proto behind it).
    """
    with tempfile.TemporaryDirectory(prefix="gen_protos_") as tmp:
        fresh_root = Path(tmp)
        outputs = generate(protos_dir, fresh_root)
        problems: list[str] = []
        for rel in outputs:
            current = out_root / rel
            if not current.is_file():
                problems.append(f"missing: {rel}")
            elif not filecmp.cmp(fresh_root / rel, current, shallow=False):
                problems.append(f"differs: {rel}")
        extra = checked_in_stubs(out_root, proto_files(protos_dir)) - set(outputs)
        problems.extend(f"extra: {rel}" for rel in sorted(extra))
    return problems


def write(protos_dir: Path = DEFAULT_PROTOS_DIR, out_root: Path = DEFAULT_OUT_ROOT) -> list[Path]:
    """Regenerate the stubs in place, deleting stale ones; return the files written.

    Generation goes to a temporary folder first, so a protoc error leaves the tree untouched.
    """
    with tempfile.TemporaryDirectory(prefix="gen_protos_") as tmp:
        fresh_root = Path(tmp)
        outputs = generate(protos_dir, fresh_root)
        stale = checked_in_stubs(out_root, proto_files(protos_dir)) - set(outputs)
        for rel in stale:
            (out_root / rel).unlink()
        for rel in outputs:
            (out_root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fresh_root / rel, out_root / rel)
    return outputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Regenerate the gRPC/protobuf stubs of tgnstream.rpc.v1 from protos/ with the pinned "
            f"grpcio-tools ({PINNED_GRPCIO_TOOLS}), or check that the checked-in ones are current."
        )
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary folder and compare byte for byte with the checked-in stubs; "
        "exit 1 listing differing, missing and extra files",
    )
    parser.add_argument(
        "--protos-dir",
        type=Path,
        default=DEFAULT_PROTOS_DIR,
        help="root of the .proto tree, used as the include path (default: %(default)s)",
    )
    parser.add_argument(
        "--out-root",
        type=Path,
        default=DEFAULT_OUT_ROOT,
        help="where generated files go, mirroring the proto paths (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.check:
            problems = check(args.protos_dir, args.out_root)
            if problems:
                print("generated stubs are out of date:", file=sys.stderr)
                for line in problems:
                    print(f"  {line}", file=sys.stderr)
                print("regenerate with: python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print("generated stubs are up to date")
            return 0
        for rel in write(args.protos_dir, args.out_root):
            print(f"wrote {args.out_root / rel}")
        return 0
    except GeneratorVersionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
