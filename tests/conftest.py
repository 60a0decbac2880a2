"""Shared pytest fixtures: location of the on-disk datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def data_dir() -> Path:
    """``$TGNSTREAM_DATA_DIR`` if set, else ``<repo>/../shared/datasets``."""
    env = os.environ.get("TGNSTREAM_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def wikipedia_csv() -> Path:
    path = data_dir() / "wikipedia.csv"
    if not path.is_file():
        pytest.skip(f"wikipedia.csv not found at {path} (set TGNSTREAM_DATA_DIR to its folder)")
    return path
