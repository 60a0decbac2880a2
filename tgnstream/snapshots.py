"""Durable snapshots of the live state together with the Kafka offsets it reflects.

Layout: ``DIR/snap-<events:012d>-<unix_ms>/`` holding ``state.pt`` (a checkpoint: config,
weights, full node state and id map) and ``manifest.json`` (model version, per-partition next
offsets, event count, SHA-256 of ``state.pt``). The manifest is written last, by temp file +
fsync + rename, and the directory is fsynced: a snapshot without a manifest, or whose checksum
does not match, is incomplete and never loaded. Restoring the newest complete snapshot and
seeking to its offsets gives exactly-once state (the Flink model): every event is either in the
snapshot or after its offsets, never both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from tgnstream.core.checkpoint import load_checkpoint, save_checkpoint
from tgnstream.core.engine import MemoryEngine

__all__ = ["Snapshot", "SnapshotConfig", "SnapshotStore", "SNAPSHOT_FORMAT"]

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
_MANIFEST = "manifest.json"
_STATE = "state.pt"


class SnapshotConfig(BaseModel):
    """When and where the serving state is snapshotted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dir: Path = Field(Path("runs/serve/snapshots"), description="snapshot directory")
    every_events: int = Field(50_000, ge=1, description="snapshot after this many applied records")
    every_seconds: float = Field(
        60.0, gt=0, description="... or this long after the last one (if anything changed)"
    )
    keep: int = Field(3, ge=1, description="complete snapshots kept on disk")


@dataclass(frozen=True)
class Snapshot:
    """A complete snapshot on disk (its manifest exists and was validated)."""

    path: Path
    model_version: str
    next_offsets: dict[int, int]
    events_applied: int
    created_at: float
    topic: str

    def load(self, device: torch.device | str = "cpu") -> MemoryEngine:
        """Rebuild the engine; raises ``ValueError`` when ``state.pt`` fails its checksum."""
        manifest = json.loads((self.path / _MANIFEST).read_text())
        if _sha256(self.path / _STATE) != manifest["state_sha256"]:
            raise ValueError(f"{self.path}: state.pt does not match the manifest checksum")
        engine, _ = load_checkpoint(self.path / _STATE, device)
        return engine


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore:
    """Writes, lists, restores and prunes snapshots in one directory.

    Args:
        root: the snapshot directory (created if missing).
        keep: how many complete snapshots to keep (older ones are deleted after a new one is
            durable; incomplete leftovers of a crash are deleted too).
    """

    def __init__(self, root: str | Path, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    def write(
        self, engine: MemoryEngine, model_version: str, next_offsets: dict[int, int], topic: str
    ) -> Snapshot:
        """Persist ``engine``'s state and the offsets it reflects. The caller must make sure the
        engine is not being written meanwhile (the ingest loop snapshots between batches)."""
        events = int(engine.events_applied)
        created = time.time()
        path = self.root / f"snap-{events:012d}-{int(created * 1000)}"
        path.mkdir()
        save_checkpoint(path / _STATE, engine, {"model_version": model_version})
        manifest = {
            "format": SNAPSHOT_FORMAT,
            "model_version": model_version,
            "topic": topic,
            "next_offsets": {str(p): int(o) for p, o in sorted(next_offsets.items())},
            "events_applied": events,
            "created_at": created,
            "state_sha256": _sha256(path / _STATE),
        }
        tmp = path / (_MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / _MANIFEST)
        _fsync_dir(path)
        _fsync_dir(self.root)
        snap = Snapshot(path, model_version, dict(next_offsets), events, created, topic)
        self.prune()
        return snap

    def complete(self) -> list[Snapshot]:
        """Complete snapshots, oldest first (by event count, then creation time)."""
        found = []
        for path in self.root.glob("snap-*"):
            manifest_path = path / _MANIFEST
            if not manifest_path.is_file():
                continue
            try:
                m = json.loads(manifest_path.read_text())
                if m.get("format") != SNAPSHOT_FORMAT:
                    log.warning("%s: unsupported snapshot format %r, ignored", path, m.get("format"))
                    continue
                found.append(
                    Snapshot(
                        path,
                        m["model_version"],
                        {int(p): int(o) for p, o in m["next_offsets"].items()},
                        int(m["events_applied"]),
                        float(m["created_at"]),
                        m.get("topic", ""),
                    )
                )
            except (ValueError, KeyError, TypeError) as e:
                log.warning("%s: unreadable manifest (%s), ignored", path, e)
        return sorted(found, key=lambda s: (s.events_applied, s.created_at))

    def restore_latest(self, device: torch.device | str = "cpu") -> tuple[Snapshot, MemoryEngine] | None:
        """The newest snapshot that loads and verifies (falling back to older ones), or None."""
        for snap in reversed(self.complete()):
            try:
                return snap, snap.load(device)
            except (ValueError, OSError, RuntimeError) as e:
                log.error("snapshot %s is damaged (%s); trying an older one", snap.path, e)
        return None

    def prune(self) -> None:
        """Delete all but the newest ``keep`` complete snapshots, and incomplete leftovers (one
        store has one writer, so an incomplete directory is always a crashed write)."""
        keep = {s.path for s in self.complete()[-self.keep :]}
        for path in self.root.glob("snap-*"):
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
