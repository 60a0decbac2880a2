"""Published model versions: what the trainer hands to servers (docs/architecture.md §5 hot swap, §6).

Layout: ``DIR/v<NNNNNN>/`` holding ``state.pt`` (a checkpoint: model config, weights and the
trainer's full state: memory, mailbox, neighbours, pair history, id map, PRES statistics),
``config.json`` (the model config, for people and tools) and ``manifest.json``: the version,
its lineage, the topic (and its id) and the per-partition next offsets the state reflects, the
event count, the version it was trained from, the promotion gate's metrics, and the SHA-256 of
every file. The manifest is written last and sealed with its own checksum
(``tgnstream.runtime.durable``, the snapshot store's protocol): a version without a valid
manifest, or whose files do not match it, is never loaded.

The **lineage** is a random id drawn when a store's first version is published; every later
version inherits it from the newest complete version. A store that is wiped and started again
numbers from v000001 under a new lineage, so a server can tell "a newer version" from "another
history" (``tgnstream.runtime.hot_swap`` states what it then does). Manifests written before
lineages existed belong to lineage None.

Versions are numbered monotonically (the next number is one above every ``v*`` directory
present, complete or not, so a crashed write's name is never reused); the newest ``keep`` are
kept. One store has one writer (the trainer); any number of servers read it.

The directory may also be an object store: a URL with a scheme (``s3://bucket/models``,
``gs://...``, ``file:///...``; any fsspec filesystem, an optional dependency:
``pip install 'tgnstream[s3]'``). There is no atomic rename there, so a version's files are
uploaded first and its manifest last, and readers download a version into a local cache
directory, verifying every checksum, before it is loaded (``tgnstream.runtime.remote_models``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
from tgnstream.runtime.store_location import StoreLocation, is_url, parse_location

__all__ = [
    "MODEL_FORMAT",
    "ModelStore",
    "ModelUnavailable",
    "PublishedModel",
    "StoreLocation",
    "is_url",
    "parse_location",
]

log = logging.getLogger(__name__)

MODEL_FORMAT = 1
_STATE = "state.pt"
_CONFIG = "config.json"
_NAME = re.compile(r"^v(\d{6,})$")


def version_name(number: int) -> str:
    return f"v{number:06d}"


class ModelUnavailable(OSError):
    """A published version could not be fetched from its object store for now (network,
    permissions): not a damaged version, so it is worth trying again later."""


@dataclass(frozen=True)
class PublishedModel:
    """A complete published version (its manifest exists and verified).

    next_offsets: per partition, the first offset the state has not seen (replay from there);
    gate: the promotion gate's metrics and decision; parent: the version it was fine-tuned
    from (None for the first); lineage: the store history it belongs to (module docstring)."""

    path: Path
    version: str
    number: int
    next_offsets: dict[int, int]
    events_applied: int
    created_at: float
    topic: str
    topic_id: str | None
    parent: str | None
    gate: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    # On an object store: the version's URL; ``path`` is then its local copy (made by ``fetch``).
    url: str | None = None
    fetch: Callable[[PublishedModel], None] | None = field(default=None, repr=False, compare=False)
    lineage: str | None = None

    @property
    def where(self) -> str:
        """Where it was published: its URL, or its directory."""
        return self.url if self.url is not None else str(self.path)

    def verify(self) -> None:
        """Raise ``ValueError`` when a file is missing or does not match its checksum. A version
        on an object store is downloaded (or its cached copy reused) and verified; one that cannot
        be downloaded now raises ``ModelUnavailable`` (an ``OSError``)."""
        if self.fetch is not None:
            self.fetch(self)
        else:
            verify_files(self.path, self.files, self.path)

    def load(self, device: torch.device | str = "cpu") -> MemoryEngine:
        """The engine (weights and state) of this version, verified first, in eval mode."""
        self.verify()
        engine, _ = load_checkpoint(self.path / _STATE, device)
        return engine.eval()


def verify_files(directory: Path, files: dict[str, str], where: object) -> None:
    """Raise ``ValueError`` when a file of ``files`` (name -> SHA-256) is missing from
    ``directory`` or does not match; ``where`` names the version in the message."""
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{where}: {name} is missing")
        if file_sha256(path) != digest:
            raise ValueError(f"{where}: {name} does not match the manifest checksum")


class ModelStore:
    """Publishes, lists, loads and prunes versions in one directory (created if missing).

    ``root`` may instead be an object-store URL (``s3://bucket/models``): the store is then a
    ``tgnstream.runtime.remote_models.RemoteModelStore`` (same API), ``storage_options`` go to the fsspec
    filesystem (credentials otherwise come from the backend's usual environment) and versions are
    downloaded into ``cache_dir`` (default: a directory under the system's temp directory) before
    they are loaded. Both are ignored for a local directory."""

    def __new__(cls, root: str | Path | None = None, *args: Any, **kwargs: Any) -> ModelStore:
        if cls is ModelStore and is_url(root):
            from tgnstream.runtime.remote_models import RemoteModelStore

            return super().__new__(RemoteModelStore)
        return super().__new__(cls)

    def __init__(
        self,
        root: str | Path,
        keep: int = 5,
        *,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | Path | None = None,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        self._warned: set[tuple[Path, str]] = set()
        # Versions whose manifest cannot be trusted, as of the last listing: name -> why.
        self.untrusted: dict[str, str] = {}

    def _numbers(self) -> list[int]:
        return [int(m.group(1)) for p in self.root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]

    def publish(
        self,
        engine: MemoryEngine,
        next_offsets: dict[int, int],
        topic: str,
        topic_id: str | None = None,
        parent: str | None = None,
        gate: dict | None = None,
    ) -> PublishedModel:
        """Write ``engine`` (weights and state, reflecting ``next_offsets`` of ``topic``) as the
        next version. The caller must not modify the engine meanwhile. A failed write leaves no
        version behind and raises."""
        number = max(self._numbers(), default=0) + 1
        version = version_name(number)
        lineage = self.lineage() or new_lineage()
        path = self.root / version
        path.mkdir()
        created = time.time()
        try:
            save_checkpoint(path / _STATE, engine, {"model_version": version, "parent": parent})
            (path / _CONFIG).write_text(json.dumps(engine.config.model_dump(), indent=1, sort_keys=True))
            files = {name: file_sha256(path / name) for name in (_STATE, _CONFIG)}
            manifest = _manifest(
                engine, version, next_offsets, topic, topic_id, parent, gate, created, files, lineage
            )
            write_manifest(path, manifest)
        except BaseException:
            discard(path)
            raise
        published = PublishedModel(
            path,
            version,
            number,
            dict(next_offsets),
            int(engine.events_applied),
            created,
            topic,
            topic_id,
            parent,
            dict(gate or {}),
            files,
            lineage=lineage,
        )
        self.prune()
        return published

    def lineage(self) -> str | None:
        """The lineage of the newest complete version (None: an empty store, or older manifests)."""
        latest = self.latest()
        return latest.lineage if latest is not None else None

    def _warn_once(self, path: Path, message: str) -> None:
        if (path, message) not in self._warned:
            self._warned.add((path, message))
            log.warning("%s", message)

    def _read(self, path: Path) -> PublishedModel:
        return _from_manifest(read_manifest(path, {MODEL_FORMAT}), path.name, path, path)

    def versions(self) -> list[PublishedModel]:
        """Complete versions, oldest first. Unreadable, edited or unsupported manifests are
        ignored with one warning each (their files are not checked here: ``load`` does)."""
        found, untrusted = [], {}
        for number in sorted(self._numbers()):
            path = self.root / version_name(number)
            if not (path / MANIFEST).is_file():
                continue
            try:
                found.append(self._read(path))
            except UntrustedManifest as e:
                untrusted[path.name] = str(e)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                untrusted[path.name] = f"{path}: unreadable manifest ({e!r}), ignored"
        self._record_untrusted(untrusted)
        return found

    def _record_untrusted(self, untrusted: dict[str, str]) -> None:
        """Keep the listing's untrusted manifests (name -> why, for hot swap's refusals) and
        warn once about each."""
        self.untrusted = untrusted
        for name, message in untrusted.items():
            self._warn_once(name, message)

    def latest(self) -> PublishedModel | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def get(self, version: str) -> PublishedModel:
        """The complete version ``version``; ``KeyError`` when there is none by that name,
        ``ValueError`` when its manifest cannot be trusted."""
        path = self.root / version
        if not _NAME.match(version) or not (path / MANIFEST).is_file():
            raise KeyError(f"no published version {version!r} in {self.root}")
        return self._read(path)

    def load_latest(self, device: torch.device | str = "cpu") -> tuple[PublishedModel, MemoryEngine] | None:
        """The newest version that loads and verifies (falling back to older ones), or None."""
        for published in reversed(self.versions()):
            try:
                return published, published.load(device)
            except ModelUnavailable as e:
                log.error(
                    "published version %s cannot be fetched now (%s); trying an older one", published.where, e
                )
            except (ValueError, OSError, RuntimeError) as e:
                log.error("published version %s is damaged (%s); trying an older one", published.where, e)
        return None

    def prune(self) -> None:
        """Delete all but the newest ``keep`` complete versions, and directories without a
        manifest below the newest complete one (interrupted writes; a directory above it may be
        a write in progress). Versions whose manifest is ignored are left alone."""
        complete = self.versions()
        doomed = [p.path for p in complete[: -self.keep]]
        if complete:
            newest = complete[-1].number
            for number in self._numbers():
                path = self.root / version_name(number)
                if number < newest and not (path / MANIFEST).exists():
                    doomed.append(path)
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)


def _manifest(
    engine: MemoryEngine,
    version: str,
    next_offsets: dict[int, int],
    topic: str,
    topic_id: str | None,
    parent: str | None,
    gate: dict | None,
    created: float,
    files: dict[str, str],
    lineage: str,
) -> dict:
    """A version's manifest, before it is sealed."""
    return {
        "format": MODEL_FORMAT,
        "version": version,
        "lineage": lineage,
        "parent": parent,
        "topic": topic,
        "topic_id": topic_id,
        "next_offsets": {str(p): int(o) for p, o in sorted(next_offsets.items())},
        "events_applied": int(engine.events_applied),
        "created_at": created,
        "model": engine.config.label,
        "gate": gate or {},
        "files": files,
    }


def _from_manifest(
    m: dict,
    name: str,
    path: Path,
    where: object,
    url: str | None = None,
    fetch: Callable[[PublishedModel], None] | None = None,
) -> PublishedModel:
    """The version ``name`` described by its verified manifest ``m``."""
    if m["version"] != name:
        raise UntrustedManifest(f"{where}: the manifest names version {m['version']!r}, not {name!r}")
    return PublishedModel(
        path,
        m["version"],
        int(_NAME.match(name).group(1)),
        {int(p): int(o) for p, o in m["next_offsets"].items()},
        int(m["events_applied"]),
        float(m["created_at"]),
        m.get("topic") or "",
        m.get("topic_id"),
        m.get("parent"),
        dict(m.get("gate") or {}),
        {str(k): str(v) for k, v in m["files"].items()},
        url,
        fetch,
        m.get("lineage"),
    )


def new_lineage() -> str:
    """A fresh lineage id (a store's first version)."""
    return uuid.uuid4().hex
