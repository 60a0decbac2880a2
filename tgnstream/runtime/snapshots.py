"""Durable snapshots of the live state together with the Kafka offsets it reflects.

Layout: ``DIR/snap-<events:012d>-<unix_ms>/`` holding ``state.pt`` (a checkpoint: config,
weights, full node state and id map) and ``manifest.json`` (model version, topic and its id, per-partition
next offsets, event count, SHA-256 of ``state.pt``, and ``manifest_sha256``: the SHA-256 of the
canonical JSON of all the other manifest fields). The manifest is written last, by temp file +
fsync + rename, and the directory is fsynced: a snapshot without a manifest, whose manifest
checksum does not match (an edited or damaged manifest would re-apply or skip events), or whose
``state.pt`` checksum does not match, is never loaded. A write that fails part-way removes its
directory. Restoring the newest complete snapshot and seeking to its offsets gives exactly-once
state (the Flink model): every event is either in the snapshot or after its offsets, never both.

The checksums detect accidents (hand edits, bit rot, truncation), not tampering: whoever can
write the directory can recompute them.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from tgnstream.core.checkpoint import load_checkpoint, save_checkpoint
from tgnstream.core.engine import MemoryEngine
from tgnstream.runtime.durable import (
    MANIFEST,
    UntrustedManifest,
    discard,
    file_sha256,
    read_manifest,
    write_manifest,
)

__all__ = ["Snapshot", "SnapshotConfig", "SnapshotStore", "SNAPSHOT_FORMAT"]

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 2
_FORMAT_UNPROTECTED = 1  # still readable: its manifest has no checksum of its own
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
    retry_initial_s: float = Field(1.0, gt=0, description="wait after a failed snapshot before the next try")
    retry_max_s: float = Field(60.0, gt=0, description="longest wait between tries (the wait doubles)")


@dataclass(frozen=True)
class Snapshot:
    """A complete snapshot on disk (its manifest exists and was validated)."""

    path: Path
    model_version: str
    next_offsets: dict[int, int]
    events_applied: int
    created_at: float
    topic: str
    topic_id: str | None = None  # the Kafka topic's unique id when known (a recreated topic differs)

    def load(self, device: torch.device | str = "cpu") -> MemoryEngine:
        """Rebuild the engine; raises ``ValueError`` when the manifest or ``state.pt`` fails its
        checksum."""
        manifest = _read_manifest(self.path)
        if file_sha256(self.path / _STATE) != manifest["state_sha256"]:
            raise ValueError(f"{self.path}: state.pt does not match the manifest checksum")
        engine, _ = load_checkpoint(self.path / _STATE, device)
        return engine


def _read_manifest(path: Path) -> dict:
    return read_manifest(path, {SNAPSHOT_FORMAT}, frozenset({_FORMAT_UNPROTECTED}))


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
        self._warned: set[tuple[Path, str]] = set()

    def _warn_once(self, path: Path, message: str) -> None:
        # complete() runs after every write (prune); an ignored manifest stays on disk, so each
        # complaint is logged once per store, not once per snapshot interval.
        if (path, message) not in self._warned:
            self._warned.add((path, message))
            log.warning("%s", message)

    def write(
        self,
        engine: MemoryEngine,
        model_version: str,
        next_offsets: dict[int, int],
        topic: str,
        topic_id: str | None = None,
    ) -> Snapshot:
        """Persist ``engine``'s state and the offsets it reflects. The caller must make sure the
        engine is not being written meanwhile (the ingest loop snapshots between batches).

        If anything fails (disk full, fsync), the half-written directory is removed (best
        effort) and the exception propagates."""
        events = int(engine.events_applied)
        created = time.time()
        path = self.root / f"snap-{events:012d}-{int(created * 1000)}"
        path.mkdir()  # before the try: a directory that already exists is not ours to remove
        try:
            save_checkpoint(path / _STATE, engine, {"model_version": model_version})
            manifest = {
                "format": SNAPSHOT_FORMAT,
                "model_version": model_version,
                "topic": topic,
                "topic_id": topic_id,
                "next_offsets": {str(p): int(o) for p, o in sorted(next_offsets.items())},
                "events_applied": events,
                "created_at": created,
                "state_sha256": file_sha256(path / _STATE),
            }
            write_manifest(path, manifest)
        except BaseException:
            discard(path)
            raise
        snap = Snapshot(path, model_version, dict(next_offsets), events, created, topic, topic_id)
        self.prune()
        return snap

    def complete(self) -> list[Snapshot]:
        """Complete snapshots, oldest first (by event count, then creation time). Manifests that
        fail their checksum, are unreadable or of an unsupported format are ignored (one warning
        each); format-1 manifests are read, with a warning that their offsets are unprotected."""
        found = []
        for path in self.root.glob("snap-*"):
            if not (path / MANIFEST).is_file():
                continue
            try:
                m = _read_manifest(path)
                snap = Snapshot(
                    path,
                    m["model_version"],
                    {int(p): int(o) for p, o in m["next_offsets"].items()},
                    int(m["events_applied"]),
                    float(m["created_at"]),
                    m.get("topic") or "",
                    m.get("topic_id"),
                )
            except UntrustedManifest as e:
                self._warn_once(path, str(e))
                continue
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                self._warn_once(path, f"{path}: unreadable manifest ({e!r}), ignored")
                continue
            if m["format"] == _FORMAT_UNPROTECTED:
                self._warn_once(
                    path,
                    f"{path}: format-1 manifest without a manifest checksum: its offsets are not "
                    "protected against edits or damage (the next snapshot will be format "
                    f"{SNAPSHOT_FORMAT})",
                )
            found.append(snap)
        return sorted(found, key=lambda s: (s.events_applied, s.created_at))

    def restore_latest(
        self, device: torch.device | str = "cpu", topic: str | None = None
    ) -> tuple[Snapshot, MemoryEngine] | None:
        """The newest snapshot that loads and verifies (falling back to older ones), or None.

        With ``topic``, snapshots of another topic are skipped (with a warning); snapshots that
        record no topic count as matching."""
        for snap in reversed(self.complete()):
            if topic is not None and snap.topic and snap.topic != topic:
                log.warning(
                    "snapshot %s is of topic %r, not %r; skipped, trying an older one",
                    snap.path,
                    snap.topic,
                    topic,
                )
                continue
            try:
                return snap, snap.load(device)
            except (ValueError, OSError, RuntimeError) as e:
                log.error("snapshot %s is damaged (%s); trying an older one", snap.path, e)
        return None

    def set_aside(self) -> Path:
        """Move every snapshot into ``superseded-<unix ms>/`` (never loaded again, never pruned:
        the operator deletes it); returns that directory."""
        aside = self.root / f"superseded-{int(time.time() * 1000)}"
        aside.mkdir()
        for path in self.root.glob("snap-*"):
            path.rename(aside / path.name)
        return aside

    def prune(self) -> None:
        """Delete all but the newest ``keep`` complete snapshots of each topic, and incomplete
        leftovers (directories without a manifest: one store has one writer, so such a directory
        is always a crashed write). Directories whose manifest is ignored (edited, damaged, of
        an unsupported format, e.g. written by a newer version) are left alone: they are not
        this writer's leftovers, and ``complete()`` warns about them."""
        by_topic: dict[str, list[Snapshot]] = {}
        for snap in self.complete():  # oldest first
            by_topic.setdefault(snap.topic, []).append(snap)
        doomed = [s.path for snaps in by_topic.values() for s in snaps[: -self.keep]]
        doomed += [p for p in self.root.glob("snap-*") if not (p / MANIFEST).exists()]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
