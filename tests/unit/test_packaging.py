"""The wheel a user installs holds every package that git holds.

An editable install (what ``make`` and the rest of the suite use) imports straight from the tree,
so a package missing from the wheel is invisible there; here the wheel is built and read.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Root folders that install as ``tgnstream.<folder>`` (setup.py's SERVICE_FOLDERS).
SERVICE_FOLDERS = ("ingest", "model_server", "trainer")
NOT_SHIPPED = ("tests", "benchmarks", "scripts")


def _git_packages() -> set[str]:
    """Import names of the packages that git tracks an ``__init__.py`` for."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked packages are unknown")
    out = subprocess.run(
        ["git", "ls-files", "*__init__.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    names = set()
    for path in out:
        parts = Path(path).parent.parts
        if parts[0] in NOT_SHIPPED:
            continue
        if parts[0] in SERVICE_FOLDERS:
            parts = ("tgnstream", *parts)
        names.add(".".join(parts))
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # From a copy of what git would hand a user (tracked and not-ignored files): a build/ folder
    # left by an earlier build in the checkout could otherwise put a missing package back.
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    # No build isolation: the suite runs offline, with the setuptools already installed.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("tgnstream-*.whl")
    return zipfile.ZipFile(path)


def test_every_tracked_package_is_in_the_wheel(wheel):
    _git_packages()  # skips outside a git checkout
    shipped = {n.rsplit("/", 1)[0].replace("/", ".") for n in wheel.namelist() if n.endswith("/__init__.py")}
    tracked = _git_packages()
    assert {"tgnstream", "tgnstream.stream", "tgnstream.ingest", "tgnstream.trainer"} <= tracked
    missing = tracked - shipped
    assert not missing, f"packages in git but not in the wheel: {sorted(missing)}"
    assert not shipped - tracked, f"the wheel ships packages git does not track: {sorted(shipped - tracked)}"


def test_the_wheel_carries_the_generated_stubs_and_the_entry_point(wheel):
    names = set(wheel.namelist())
    assert "tgnstream/rpc/v1/link_prediction_pb2.py" in names
    assert "tgnstream/rpc/v1/link_prediction_pb2.pyi" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "tgnstream = tgnstream.apps.cli:main" in wheel.read(entry_points).decode()
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = wheel.read(metadata).decode()
    assert "Requires-Python: >=3.11" in text
    # The broker binary and plotting are the demo's, not the server's.
    requires = [line for line in text.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if "calfkit" in r and "extra ==" not in r]
    assert not [r for r in requires if "matplotlib" in r and "extra ==" not in r]
