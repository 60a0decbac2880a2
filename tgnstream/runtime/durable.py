"""Directories that are complete only once their manifest exists: the protocol shared by
snapshots (``snapshots.py``) and published model versions (``models.py``).

A writer creates the directory, writes its files, then the manifest (which carries the SHA-256
of every file and ``manifest_sha256``, the SHA-256 of the canonical JSON of its other fields) by
temp file + fsync + rename, and fsyncs the directory and its parent. A directory without a
manifest is an interrupted write. A reader trusts a directory only when the manifest's own
checksum and every listed file's checksum match. The checksums detect accidents (hand edits,
bit rot, truncation), not tampering.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

__all__ = [
    "MANIFEST",
    "DIGEST_FIELD",
    "UntrustedManifest",
    "discard",
    "file_sha256",
    "fsync_dir",
    "manifest_digest",
    "parse_manifest",
    "read_manifest",
    "seal_manifest",
    "write_manifest",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DIGEST_FIELD = "manifest_sha256"


class UntrustedManifest(ValueError):
    """A manifest that is readable but must not be trusted (edited, damaged, unsupported)."""


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the canonical JSON (sorted keys, compact separators, ASCII) of every field
    but ``manifest_sha256`` itself."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_manifest(manifest: dict) -> dict:
    """``manifest`` with its ``manifest_sha256`` added."""
    return {**manifest, DIGEST_FIELD: manifest_digest(manifest)}


def write_manifest(path: Path, manifest: dict) -> dict:
    """Seal the directory ``path``: add ``manifest_sha256`` to ``manifest``, write it atomically
    as ``path/manifest.json`` and make the directory entry durable. Returns the sealed manifest."""
    manifest = seal_manifest(manifest)
    tmp = path / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)
    fsync_dir(path)
    fsync_dir(path.parent)
    return manifest


def read_manifest(path: Path, formats: set[int], unprotected_formats: frozenset[int] = frozenset()) -> dict:
    """The manifest of the directory ``path``, verified: its ``format`` must be in ``formats``
    (or in ``unprotected_formats``: older ones without a manifest checksum), its checksum must
    match. Raises ``UntrustedManifest``, or ``ValueError`` for one that is not JSON."""
    return parse_manifest((path / MANIFEST).read_text(), path, formats, unprotected_formats)


def parse_manifest(
    text: str | bytes, where: object, formats: set[int], unprotected_formats: frozenset[int] = frozenset()
) -> dict:
    """``read_manifest`` of a manifest's text (read from anywhere: an object store); ``where``
    names the directory in the error messages."""
    m = json.loads(text)
    if not isinstance(m, dict):
        raise UntrustedManifest(f"{where}: manifest is not a JSON object, ignored")
    fmt = m.get("format")
    if fmt in formats:
        if m.get(DIGEST_FIELD) != manifest_digest(m):
            raise UntrustedManifest(
                f"{where}: manifest checksum does not match: the manifest was edited or damaged; ignored"
            )
    elif fmt not in unprotected_formats:
        raise UntrustedManifest(f"{where}: unsupported format {fmt!r}, ignored")
    return m


def discard(path: Path) -> None:
    """Best-effort removal of a failed write's directory; never raises (the write's own error
    is the one to report). The manifest goes first: whatever else fails to go, what remains is
    incomplete (never loaded, deleted by the next prune)."""
    try:
        try:
            (path / MANIFEST).unlink(missing_ok=True)
        finally:
            shutil.rmtree(path, ignore_errors=True)
        left = path.exists()
    except Exception as e:
        left, why = True, f" ({e})"
    else:
        why = ""
    if left:
        log.warning("could not remove the failed write %s%s", path, why)
