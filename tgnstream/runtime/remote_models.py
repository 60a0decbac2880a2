"""Published model versions on an object store (``s3://``, ``gs://``, any fsspec filesystem).

The layout and the manifest are those of ``tgnstream.runtime.models`` (``URL/v<NNNNNN>/state.pt``,
``config.json``, ``manifest.json``); only the publication protocol differs, since an object
store has no atomic rename:

* the writer (the trainer) writes the version into a local staging directory, uploads its
  payload files, and uploads the sealed manifest (the SHA-256 of every file) *last*: a single
  PUT, so readers see either no manifest or the whole one;
* a version exists only when its manifest does; prefixes without one are interrupted (or
  in-progress) writes, never loaded, and pruned once a newer version is complete;
* a reader (a server) downloads a version into its local cache directory (a temporary
  directory first, renamed into place) and verifies every checksum against the manifest
  before anything is loaded; a cached copy is verified again before each use, and a copy that
  does not match is fetched again;
* pruning deletes a version's manifest first, then its files, so a half-deleted version is
  only ever an incomplete one.

A version that cannot be downloaded for now (network, permissions) raises ``ModelUnavailable``
(an ``OSError``): the hot swapper tries it again later instead of refusing it. fsspec and the
backend (``s3fs`` for ``s3://``) are needed only here: ``pip install 'tgnstream[s3]'``.
Credentials and the endpoint come from the backend's usual environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...) or from ``storage_options``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tgnstream.core.checkpoint import save_checkpoint
from tgnstream.core.engine import MemoryEngine
from tgnstream.runtime.durable import (
    MANIFEST,
    UntrustedManifest,
    file_sha256,
    parse_manifest,
    seal_manifest,
    write_manifest,
)
from tgnstream.runtime.models import (
    _CONFIG,
    _NAME,
    _STATE,
    MODEL_FORMAT,
    ModelStore,
    ModelUnavailable,
    PublishedModel,
    _from_manifest,
    _manifest,
    new_lineage,
    verify_files,
    version_name,
)
from tgnstream.runtime.store_location import check_url

__all__ = ["RemoteModelStore", "default_cache_dir"]

log = logging.getLogger(__name__)

# Leftover download / staging directories (a process killed mid-way) older than this are removed.
_STALE_PART_S = 3600.0
# Versions kept in the local cache (the newest, and one to fall back to): once loaded, a version
# lives in memory, so more copies would only fill the disk.
_CACHED = 2


def default_cache_dir(url: str) -> Path:
    """Where versions of ``url`` are downloaded when no cache directory is configured: one
    directory per URL (and user) under the system's temporary directory."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tgnstream-models-{user}" / digest


class RemoteModelStore(ModelStore):
    """``ModelStore`` over an fsspec URL (see the module docstring). ``ModelStore(url)`` builds
    one; the API is the same: ``publish``, ``versions``, ``latest``, ``get``, ``load_latest``,
    ``prune``. ``PublishedModel.path`` is the version's local copy in ``cache_dir`` (present
    once ``verify`` or ``load`` has fetched it); ``PublishedModel.url`` is where it lives."""

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
        url = check_url(str(root))
        self.url = url.rstrip("/") if url.rstrip("/").partition("://")[2] else url
        self.root = self.url
        self.keep = keep
        self.storage_options = dict(storage_options or {})
        self.fs, base = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self._base = base.rstrip("/") or base
        self._local = isinstance(self.fs, LocalFileSystem)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.url)
        self.untrusted: dict[str, str] = {}
        self._warned: set[tuple[Any, str]] = set()
        if self._local:  # an object store has no directories; a file:// one is created like a local store
            self.fs.makedirs(self._base, exist_ok=True)

    # ------------------------------------------------------------------------------ listing
    def _remote(self, *parts: str) -> str:
        return "/".join((self._base, *parts))

    def _url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _listing(self) -> tuple[set[int], set[int]]:
        """(numbers of every ``v*`` prefix present, numbers of those with a manifest), from one
        listing of the store (never from a cached one)."""
        self.fs.invalidate_cache()
        entries = self.fs.find(self._base, withdirs=True, detail=True)
        prefix = self._base + "/"
        present, complete = set(), set()
        for name, info in entries.items():
            name = name.rstrip("/")
            if not name.startswith(prefix):
                continue
            first, _, rest = name[len(prefix) :].partition("/")
            m = _NAME.match(first)
            if m is None or (not rest and info.get("type") != "directory"):
                continue
            number = int(m.group(1))
            present.add(number)
            if rest == MANIFEST and info.get("type") != "directory":
                complete.add(number)
        return present, complete

    def _numbers(self) -> list[int]:
        return sorted(self._listing()[0])

    def _manifest_text(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._remote(name, MANIFEST))
        except FileNotFoundError:
            return None

    def _read_remote(self, name: str, text: bytes) -> PublishedModel:
        where = self._url(name)
        m = parse_manifest(text, where, {MODEL_FORMAT})
        return _from_manifest(m, name, self.cache_dir / name, where, url=where, fetch=self._fetch)

    def versions(self) -> list[PublishedModel]:
        """Complete versions (a manifest exists), oldest first. Unreadable, edited or unsupported
        manifests are ignored with one warning each (files are checked by ``load``)."""
        found, untrusted = [], {}
        for number in sorted(self._listing()[1]):
            name = version_name(number)
            text = self._manifest_text(name)
            if text is None:  # pruned meanwhile
                continue
            try:
                found.append(self._read_remote(name, text))
            except UntrustedManifest as e:
                untrusted[name] = str(e)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                untrusted[name] = f"{self._url(name)}: unreadable manifest ({e!r}), ignored"
        self._record_untrusted(untrusted)
        return found

    def get(self, version: str) -> PublishedModel:
        """The complete version ``version``; ``KeyError`` when there is none by that name,
        ``ValueError`` when its manifest cannot be trusted."""
        text = self._manifest_text(version) if _NAME.match(version) else None
        if text is None:
            raise KeyError(f"no published version {version!r} in {self.url}")
        return self._read_remote(version, text)

    # ------------------------------------------------------------------------------ writing
    def publish(
        self,
        engine: MemoryEngine,
        next_offsets: dict[int, int],
        topic: str,
        topic_id: str | None = None,
        parent: str | None = None,
        gate: dict | None = None,
    ) -> PublishedModel:
        """Write ``engine`` as the next version: payload uploaded first, the sealed manifest
        last. A failed write removes what it uploaded (best effort: what remains has no
        manifest, so it is never loaded and the next prune deletes it) and raises. The local
        staging copy becomes this store's cached copy of the version."""
        number = max(self._numbers(), default=0) + 1
        version = version_name(number)
        lineage = self.lineage() or new_lineage()
        remote = self._remote(version)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.staging-", dir=self.cache_dir))
        created = time.time()
        try:
            save_checkpoint(staging / _STATE, engine, {"model_version": version, "parent": parent})
            (staging / _CONFIG).write_text(json.dumps(engine.config.model_dump(), indent=1, sort_keys=True))
            files = {name: file_sha256(staging / name) for name in (_STATE, _CONFIG)}
            manifest = _manifest(
                engine, version, next_offsets, topic, topic_id, parent, gate, created, files, lineage
            )
            if self._local:
                self.fs.makedirs(remote, exist_ok=True)
            for name in files:
                self.fs.put_file(str(staging / name), self._remote(version, name))
            if self._local:  # a file:// store: temp file + rename, as a local store
                write_manifest(Path(remote), manifest)
            else:  # one PUT: the object appears whole or not at all
                sealed = seal_manifest(manifest)
                self.fs.pipe_file(self._remote(version, MANIFEST), json.dumps(sealed, indent=1).encode())
        except BaseException:
            self._discard(version)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        url = self._url(version)
        published = PublishedModel(
            self.cache_dir / version,
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
            url,
            self._fetch,
            lineage,
        )
        self._into_cache(staging, published)
        self.prune()
        return published

    def _discard(self, version: str) -> None:
        """Best-effort removal of a version (manifest first); never raises."""
        try:
            try:
                self.fs.rm_file(self._remote(version, MANIFEST))
            except FileNotFoundError:
                pass
            try:
                self.fs.rm(self._remote(version), recursive=True)
            except FileNotFoundError:
                pass
        except Exception as e:
            log.warning(
                "could not remove %s (%s): it has no manifest, the next prune retries", self._url(version), e
            )
        finally:
            self.fs.invalidate_cache()

    def prune(self) -> None:
        """Delete all but the newest ``keep`` complete versions, and prefixes without a
        manifest below the newest complete one (a prefix above it may be a write in progress).
        Versions whose manifest is ignored are left alone."""
        complete = self.versions()
        doomed = [p.version for p in complete[: -self.keep]]
        if complete:
            newest = complete[-1].number
            present, with_manifest = self._listing()
            doomed += [version_name(n) for n in sorted(present - with_manifest) if n < newest]
        for version in doomed:
            self._discard(version)

    # ---------------------------------------------------------------------------- the cache
    def _fetch(self, published: PublishedModel) -> None:
        """Make ``published.path`` a verified local copy of ``published``: the cached copy if it
        matches the manifest, else a fresh download (into a temporary directory, verified, then
        renamed into place). ``ValueError`` for a missing or mismatching file (a damaged
        version), ``ModelUnavailable`` when the store cannot be read now."""
        dest = published.path
        if dest.is_dir():
            try:
                verify_files(dest, published.files, f"{dest} (cached copy of {published.url})")
                return
            except ValueError as e:
                log.warning("%s; fetching it again", e)
                shutil.rmtree(dest, ignore_errors=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(prefix=f".{published.version}.part-", dir=self.cache_dir))
        try:
            for name in published.files:
                source = self._remote(published.version, name)
                try:
                    self.fs.get_file(source, str(part / name))
                except FileNotFoundError:
                    raise ValueError(f"{published.url}: {name} is missing") from None
                except Exception as e:
                    raise ModelUnavailable(f"{published.url}: could not download {name}: {e!r}") from e
            verify_files(part, published.files, published.url)
            try:
                os.replace(part, dest)
            except OSError:
                if not dest.is_dir():  # not another process's copy landing first
                    raise
                shutil.rmtree(part, ignore_errors=True)
                verify_files(dest, published.files, f"{dest} (cached copy of {published.url})")
        except BaseException:
            shutil.rmtree(part, ignore_errors=True)
            raise
        log.info("fetched %s into %s", published.url, dest)
        self._prune_cache(published.number)

    def _into_cache(self, staging: Path, published: PublishedModel) -> None:
        """The writer's staged copy of a version it just published becomes the cached copy."""
        try:
            shutil.rmtree(published.path, ignore_errors=True)
            os.replace(staging, published.path)
        except OSError as e:
            log.warning("could not keep %s in the cache %s (%s)", published.version, self.cache_dir, e)
            shutil.rmtree(staging, ignore_errors=True)
        self._prune_cache(published.number)

    def _prune_cache(self, fetched: int) -> None:
        """Keep the newest cached versions (two, and the one just fetched); remove leftovers of
        downloads and uploads a killed process left behind."""
        try:
            entries = list(self.cache_dir.iterdir())
        except OSError:
            return
        cached = sorted((int(m.group(1)), p) for p in entries if (m := _NAME.match(p.name)) and p.is_dir())
        doomed = [p for n, p in cached[:-_CACHED] if n != fetched]
        now = time.time()
        for p in entries:
            if p.name.startswith(".") and (".part-" in p.name or ".staging-" in p.name):
                try:
                    if now - p.stat().st_mtime > _STALE_PART_S:
                        doomed.append(p)
                except OSError:
                    pass
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
