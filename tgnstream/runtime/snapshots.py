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

Delta chains (``docs/snapshots.md``): a snapshot is a **full base** (the above, format 2) or a
**delta** (format 3, ``DIR/snap-<events>-<unix_ms>-delta/``) whose ``state.pt`` holds only what
changed since its parent (the base or the previous delta; ``tgnstream.runtime.snapshot_delta``)
and whose manifest names the parent and the parent manifest's checksum. A delta is complete
only when every snapshot up to its base is; restoring loads the base and applies the deltas in
order, and a delta that does not verify ends the chain at its parent. The writer passes the
nodes it wrote since the last snapshot (``Changes``); without them, after a model change, after
``full_every`` deltas, or when a delta would be large, it writes a full base.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from tgnstream.core.checkpoint import load_checkpoint, save_checkpoint
from tgnstream.core.engine import MemoryEngine
from tgnstream.runtime.durable import (
    DIGEST_FIELD,
    MANIFEST,
    UntrustedManifest,
    discard,
    file_sha256,
    fsync_dir,
    read_manifest,
    write_manifest,
)
from tgnstream.runtime.snapshot_delta import (
    Changes,
    DeltaLayout,
    DeltaTally,
    apply_deltas,
    check_delta,
    delta_payload,
    id_extent,
    pairs_forgotten,
    weights_stamp,
)

__all__ = [
    "Changes",
    "Snapshot",
    "SnapshotConfig",
    "SnapshotStore",
    "SNAPSHOT_FORMAT",
    "DELTA_SNAPSHOT_FORMAT",
]

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 2
# A format of its own: a version that knows only full snapshots ignores deltas (unsupported
# format) instead of looking for a full state in them; bases stay readable by it.
DELTA_SNAPSHOT_FORMAT = 3
_FORMAT_UNPROTECTED = 1  # still readable: its manifest has no checksum of its own
_STATE = "state.pt"  # the full state (a base) or the changes since the parent (a delta)
FULL, DELTA = "full", "delta"


class SnapshotConfig(BaseModel):
    """When and where the serving state is snapshotted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dir: Path = Field(Path("runs/serve/snapshots"), description="snapshot directory")
    every_events: int = Field(50_000, ge=1, description="snapshot after this many applied records")
    every_seconds: float = Field(
        60.0, gt=0, description="... or this long after the last one (if anything changed)"
    )
    keep: int = Field(
        3, ge=1, description="complete snapshot chains kept on disk (a full base and the deltas on it)"
    )
    full_every: int = Field(
        8, ge=0, description="a full base after this many deltas (0: every snapshot is a full one)"
    )
    delta_max_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="a full base instead of a delta larger than this fraction of a full snapshot",
    )
    retry_initial_s: float = Field(1.0, gt=0, description="wait after a failed snapshot before the next try")
    retry_max_s: float = Field(60.0, gt=0, description="longest wait between tries (the wait doubles)")


@dataclass(frozen=True)
class Snapshot:
    """A complete snapshot on disk (its manifest exists and was validated; for a delta, so were
    those of every snapshot up to its base).

    ``kind`` is ``"full"`` (a base) or ``"delta"``; ``chain`` the directories a delta needs,
    base first, parent last (empty for a base)."""

    path: Path
    model_version: str
    next_offsets: dict[int, int]
    events_applied: int
    created_at: float
    topic: str
    topic_id: str | None = None  # the Kafka topic's unique id when known (a recreated topic differs)
    kind: str = FULL
    chain: tuple[Path, ...] = ()

    @property
    def base(self) -> Path:
        return self.chain[0] if self.chain else self.path

    def load(self, device: torch.device | str = "cpu") -> MemoryEngine:
        """Rebuild the engine (a delta: its base plus every delta up to it); raises
        ``ValueError`` when a manifest or ``state.pt`` fails its checksum."""
        engine, _, error = _load_chain((*self.chain, self.path), device)
        if error is not None:
            raise error
        return engine


def _read_manifest(path: Path) -> dict:
    return read_manifest(path, {SNAPSHOT_FORMAT, DELTA_SNAPSHOT_FORMAT}, frozenset({_FORMAT_UNPROTECTED}))


def _verified_state(path: Path) -> dict:
    """``path``'s manifest, after checking its ``state.pt`` against it (``ValueError`` if not)."""
    manifest = _read_manifest(path)
    if file_sha256(path / _STATE) != manifest["state_sha256"]:
        raise ValueError(f"{path}: state.pt does not match the manifest checksum")
    return manifest


def _load_chain(
    paths: tuple[Path, ...], device: torch.device | str
) -> tuple[MemoryEngine, int, ValueError | None]:
    """Load ``paths`` (a base, then deltas each on the previous) as far as they verify:
    ``(engine, index of the last one applied, why the next one was not)``. Raises when the base
    itself does not load. Every delta is checked before any is applied, so a bad one ends the
    chain at its parent, never half-applied."""
    _verified_state(paths[0])
    engine, _ = load_checkpoint(paths[0] / _STATE, "cpu")
    tally = DeltaTally(engine)
    deltas: list[dict] = []
    error = None
    for i, path in enumerate(paths[1:], 1):
        try:
            manifest = _verified_state(path)
            parent = _read_manifest(paths[i - 1])
            if manifest.get("parent") != paths[i - 1].name or manifest.get(
                "parent_manifest_sha256"
            ) != parent.get(DIGEST_FIELD):
                raise ValueError(f"{path}: its parent is not {paths[i - 1].name} as written")
            delta = torch.load(path / _STATE, map_location="cpu", weights_only=True)
            check_delta(delta, tally)
        except Exception as e:  # noqa: BLE001 - anything wrong with a delta ends the chain there
            error = ValueError(e if str(path) in str(e) else f"{path}: {type(e).__name__}: {e}")
            break
        deltas.append(delta)
    apply_deltas(engine, deltas)
    engine.to(device)
    return engine, len(deltas), error


@dataclass
class _Head:
    """The newest snapshot this store wrote, and what a delta on it must agree with."""

    snap: Snapshot
    digest: str  # its manifest_sha256 (a delta's manifest names it)
    sizes: dict[Path, int]  # state.pt size of every snapshot of the chain (base first)
    digests: dict[Path, str]  # manifest_sha256 of every snapshot of the chain
    engine: int  # MemoryEngine.instance it was taken of
    weights: tuple  # weights_stamp at the time
    capacity: int
    ids: int
    id_bytes: int
    depth: int  # deltas since the base
    forgotten: int = 0  # pairs_forgotten at the time


class SnapshotStore:
    """Writes, lists, restores and prunes snapshots (full bases and delta chains) in one directory.

    Args:
        root: the snapshot directory (created if missing).
        keep: how many complete chains (a base and its deltas) to keep per topic (older chains
            are deleted after a new snapshot is durable; incomplete leftovers of a crash too).
        full_every: default for ``write``: a full base after this many deltas.
        delta_max_fraction: default for ``write``: a full base instead of a delta larger than
            this fraction of a full snapshot.
    """

    def __init__(self, root: str | Path, keep: int = 3, full_every: int = 8, delta_max_fraction: float = 0.5):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.full_every = full_every
        self.delta_max_fraction = delta_max_fraction
        self.root.mkdir(parents=True, exist_ok=True)
        self._warned: set[tuple[Path, str]] = set()
        self._head: _Head | None = None

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
        changes: Changes | None = None,
        full_every: int | None = None,
        delta_max_fraction: float | None = None,
    ) -> Snapshot:
        """Persist ``engine``'s state and the offsets it reflects. The caller must make sure the
        engine is not being written meanwhile (the ingest loop snapshots between batches).

        ``changes``: every node and pair written since the last snapshot this store wrote (the
        caller's promise); with it the snapshot may be a delta on that one. Without it, or when
        the engine, model, topic or weights changed since, after ``full_every`` deltas, or when
        the delta would exceed ``delta_max_fraction`` of a full snapshot, it is a full base.

        If anything fails (disk full, fsync), the half-written directory is removed (best
        effort) and the exception propagates."""
        full_every = self.full_every if full_every is None else full_every
        max_fraction = self.delta_max_fraction if delta_max_fraction is None else delta_max_fraction
        layout = DeltaLayout(engine)
        why_full = self._why_full(engine, layout, model_version, topic, topic_id, changes, full_every)
        if why_full is None:
            size = len(changes.nodes()) * layout.row_bytes() + 24 * len(changes.pairs())
            full = layout.full_bytes(engine)
            if size > max_fraction * full:
                why_full = f"a delta of ~{size} bytes is over {max_fraction:g} of a full one (~{full})"
        if why_full is not None:
            log.debug("full snapshot: %s", why_full)
        events = int(engine.events_applied)
        created = time.time()
        kind = FULL if why_full is not None else DELTA
        name = f"snap-{events:012d}-{int(created * 1000)}" + ("-delta" if kind == DELTA else "")
        path = self.root / name
        path.mkdir()  # before the try: a directory that already exists is not ours to remove
        try:
            manifest = {
                "format": SNAPSHOT_FORMAT,
                "model_version": model_version,
                "topic": topic,
                "topic_id": topic_id,
                "next_offsets": {str(p): int(o) for p, o in sorted(next_offsets.items())},
                "events_applied": events,
                "created_at": created,
            }
            head = self._head
            if kind == FULL:
                save_checkpoint(path / _STATE, engine, {"model_version": model_version})
            else:
                payload = delta_payload(engine, layout, changes, head.ids, head.id_bytes)
                _save_bytes(path / _STATE, payload)
                manifest.update(
                    format=DELTA_SNAPSHOT_FORMAT,
                    kind=DELTA,
                    parent=head.snap.path.name,
                    parent_manifest_sha256=head.digest,
                    base=head.snap.base.name,
                    depth=head.depth + 1,
                    nodes=int(payload["nodes"].numel()),
                    pairs=int(payload["pairs"]["keys"].numel()),
                    new_ids=int(payload["ids"]["offsets"].numel()),
                )
            manifest["state_sha256"] = file_sha256(path / _STATE)
            sealed = write_manifest(path, manifest)
        except BaseException:
            discard(path)
            raise
        chain = () if kind == FULL else (*head.snap.chain, head.snap.path)
        snap = Snapshot(
            path, model_version, dict(next_offsets), events, created, topic, topic_id, kind, chain
        )
        n_ids, id_bytes = id_extent(engine)
        size = (path / _STATE).stat().st_size
        digest = sealed[DIGEST_FIELD]
        sizes = {path: size} if kind == FULL else {**head.sizes, path: size}
        digests = {path: digest} if kind == FULL else {**head.digests, path: digest}
        depth = 0 if kind == FULL else head.depth + 1
        self._head = _Head(
            snap,
            digest,
            sizes,
            digests,
            engine.instance,
            weights_stamp(engine),
            engine.capacity,
            n_ids,
            id_bytes,
            depth,
            pairs_forgotten(engine),
        )
        self.prune()
        return snap

    def _why_full(
        self,
        engine: MemoryEngine,
        layout: DeltaLayout,
        model_version: str,
        topic: str,
        topic_id: str | None,
        changes: Changes | None,
        full_every: int,
    ) -> str | None:
        """Why this snapshot cannot be a delta on the head (None: it can)."""
        head = self._head
        if changes is None:
            return "the writer does not know what changed since the last snapshot"
        if head is None:
            return "no earlier snapshot of this store to build on"
        if head.depth >= full_every:
            return f"{head.depth} deltas since the base (full_every = {full_every})"
        if layout.unknown:
            return f"state tensors a delta does not carry: {layout.unknown}"
        s = head.snap
        if (engine.instance, model_version, topic, topic_id) != (
            head.engine,
            s.model_version,
            s.topic,
            s.topic_id,
        ):
            return "the engine, model version or topic changed"
        if weights_stamp(engine) != head.weights:
            return "the weights were written"
        if int(engine.events_applied) < s.events_applied or engine.capacity < head.capacity:
            return "the state went back"
        if pairs_forgotten(engine) != head.forgotten:
            return "the pair history's retention forgot pairs since the last snapshot"
        for path in (*s.chain, s.path):
            # The chain must still be there as written, or the delta could never be restored.
            try:
                intact = (path / _STATE).stat().st_size == head.sizes[path] and _read_manifest(path).get(
                    DIGEST_FIELD
                ) == head.digests[path]
            except (OSError, ValueError):
                intact = False
            if not intact:
                return f"{path.name} is no longer on disk as written"
        return None

    def complete(self) -> list[Snapshot]:
        """Complete snapshots, oldest first (by event count, then creation time). Manifests that
        fail their checksum, are unreadable or of an unsupported format are ignored (one warning
        each), and so are deltas whose chain down to a base is not complete; format-1 manifests
        are read, with a warning that their offsets are unprotected."""
        found: dict[str, tuple[Snapshot, dict]] = {}
        for path in self.root.glob("snap-*"):
            if not (path / MANIFEST).is_file():
                continue
            try:
                m = _read_manifest(path)
                kind = DELTA if m["format"] == DELTA_SNAPSHOT_FORMAT else FULL
                if kind == DELTA and (m.get("kind") != DELTA or not isinstance(m.get("parent"), str)):
                    raise ValueError("a delta manifest without its parent")
                snap = Snapshot(
                    path,
                    m["model_version"],
                    {int(p): int(o) for p, o in m["next_offsets"].items()},
                    int(m["events_applied"]),
                    float(m["created_at"]),
                    m.get("topic") or "",
                    m.get("topic_id"),
                    kind,
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
            found[path.name] = (snap, m)
        out = []
        for name, (snap, _) in found.items():
            if snap.kind == FULL:
                out.append(snap)
                continue
            chain, why = _chain_of(name, found)
            if why is not None:
                self._warn_once(snap.path, f"{snap.path}: {why}: this delta is never loaded")
                continue
            out.append(replace(snap, chain=tuple(found[n][0].path for n in chain)))
        return sorted(out, key=lambda s: (s.events_applied, s.created_at))

    def restore_latest(
        self, device: torch.device | str = "cpu", topic: str | None = None
    ) -> tuple[Snapshot, MemoryEngine] | None:
        """The newest snapshot that loads and verifies (falling back to older ones), or None.
        A delta that does not verify ends its chain: the snapshot before it is restored.

        With ``topic``, snapshots of another topic are skipped (with a warning); snapshots that
        record no topic count as matching."""
        snaps = self.complete()
        by_path = {s.path: s for s in snaps}
        bad_bases: set[Path] = set()
        for snap in reversed(snaps):
            if topic is not None and snap.topic and snap.topic != topic:
                log.warning(
                    "snapshot %s is of topic %r, not %r; skipped, trying an older one",
                    snap.path,
                    snap.topic,
                    topic,
                )
                continue
            if snap.base in bad_bases:
                continue
            paths = (*snap.chain, snap.path)
            try:
                engine, reached, error = _load_chain(paths, device)
            except (ValueError, OSError, RuntimeError) as e:
                log.error("snapshot %s is damaged (%s); trying an older one", snap.base, e)
                bad_bases.add(snap.base)
                continue
            if error is not None:
                got = by_path[paths[reached]]
                log.warning(
                    "snapshot %s is damaged (%s); restored its chain up to %s (%d events) instead",
                    paths[reached + 1],
                    error,
                    got.path.name,
                    got.events_applied,
                )
                return got, engine
            return snap, engine
        return None

    def set_aside(self) -> Path:
        """Move every snapshot into ``superseded-<unix ms>/`` (never loaded again, never pruned:
        the operator deletes it); returns that directory."""
        aside = self.root / f"superseded-{int(time.time() * 1000)}"
        aside.mkdir()
        for path in self.root.glob("snap-*"):
            path.rename(aside / path.name)
        self._head = None
        return aside

    def prune(self) -> None:
        """Delete all but the newest ``keep`` complete chains (a base and the deltas on it) of
        each topic, and incomplete leftovers (directories without a manifest: one store has one
        writer, so such a directory is always a crashed write). A base goes only with every
        delta on it, and the chain this store writes on is always kept. Directories whose
        manifest is ignored (edited, damaged, of an unsupported format, e.g. written by a newer
        version) are left alone: they are not this writer's leftovers, and ``complete()`` warns
        about them; so are deltas whose chain is broken (the warning names them)."""
        snaps = self.complete()  # oldest first
        members: dict[Path, list[Path]] = {}
        bases: dict[str, list[Snapshot]] = {}
        for snap in snaps:
            members.setdefault(snap.base, []).append(snap.path)
            if snap.kind == FULL:
                bases.setdefault(snap.topic, []).append(snap)
        kept = {self._head.snap.base} if self._head is not None else set()
        doomed = []
        for chains in bases.values():
            for base in chains[: -self.keep]:
                if base.path not in kept:
                    doomed += members[base.path]
        doomed += [p for p in self.root.glob("snap-*") if not (p / MANIFEST).exists()]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)


def _chain_of(name: str, found: dict[str, tuple[Snapshot, dict]]) -> tuple[list[str], str | None]:
    """The names from the base to the parent of the delta ``name``, or why there is none."""
    chain: list[str] = []
    snap, m = found[name]
    seen = {name}
    while True:
        parent = m["parent"]
        if parent not in found:
            return chain, f"its parent {parent} is missing or does not verify"
        p_snap, p_m = found[parent]
        if p_m.get(DIGEST_FIELD) != m.get("parent_manifest_sha256"):
            return chain, f"its parent {parent} is not the snapshot it was written on"
        if p_snap.topic != snap.topic or parent in seen:
            return chain, f"its parent {parent} is of another topic or a cycle"
        chain.insert(0, parent)
        seen.add(parent)
        if p_snap.kind == FULL:
            return chain, None
        snap, m = p_snap, p_m


def _save_bytes(path: Path, payload: dict) -> None:
    """``torch.save`` to ``path`` durably (serialised in memory first, as ``save_checkpoint``:
    a failing write then raises the OSError that says why)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
