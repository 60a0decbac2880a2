"""Published versions on an object store (an fsspec URL): a ``file://`` URL and an in-process
S3-compatible server (moto; skipped when moto or s3fs is not installed). The same results as a
local directory; the manifest is uploaded last, so a version is invisible until then; a payload
that does not match its manifest is refused after download; pruning; the trainer publishing to a
URL; a server's hot swap from an ``s3://`` URL; the URL-or-directory config type."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tgnstream.apps.testing import NoNewEvents, small_engine, wait_until
from tgnstream.core.engine import MemoryEngine
from tgnstream.runtime.hot_swap import HotSwapConfig, HotSwapper
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.models import ModelStore, ModelUnavailable, parse_location
from tgnstream.stream.config import StreamConfig

pytest.importorskip("fsspec", reason="published models on an object store need fsspec (tgnstream[s3])")


_engine = small_engine


def _same_engine(a: MemoryEngine, b: MemoryEngine) -> None:
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k


# ------------------------------------------------------------------------------ the stores
@pytest.fixture(scope="module")
def s3_endpoint():
    """An in-process S3-compatible server (moto) on 127.0.0.1 and a free port."""
    server_mod = pytest.importorskip(
        "moto.server", reason="the S3 tests need moto[server] (pip install 'moto[server]')"
    )
    pytest.importorskip("s3fs", reason="the S3 tests need s3fs (pip install 'tgnstream[s3]')")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _s3_options(endpoint: str) -> dict:
    return {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": "eu-west-1"},
    }


class Remote:
    """One test's remote store location: its URL, fsspec options, and a raw filesystem to play
    the part of a crashed writer or of bit rot."""

    def __init__(self, url: str, options: dict, tmp_path):
        import fsspec

        self.url, self.options, self.tmp = url, options, tmp_path
        self.fs, self.base = fsspec.core.url_to_fs(url, **options)
        self.readers = 0

    def store(self, keep: int = 5, cache: str = "writer-cache") -> ModelStore:
        return ModelStore(self.url, keep, storage_options=self.options, cache_dir=self.tmp / cache)

    def reader(self, keep: int = 5) -> ModelStore:
        """A store with its own, empty cache (as a server on another machine)."""
        self.readers += 1
        return self.store(keep, cache=f"reader-cache-{self.readers}")

    def prefixes(self) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.base, detail=False))

    def object(self, *parts: str) -> str:
        return "/".join((self.base, *parts))

    def put(self, path: str, data: bytes) -> None:
        """Write one object (a directory store needs its parent first)."""
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe(path, data)


@pytest.fixture(params=["file", "s3"])
def remote(request, tmp_path) -> Remote:
    if request.param == "file":
        return Remote((tmp_path / "bucket" / "models").as_uri(), {}, tmp_path)
    endpoint = request.getfixturevalue("s3_endpoint")
    import fsspec

    options = _s3_options(endpoint)
    bucket = f"models-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", **options).mkdir(bucket)
    return Remote(f"s3://{bucket}/published", options, tmp_path)


# --------------------------------------------------------------------------------- the tests
def test_publish_list_latest_and_load_equal_the_local_store(remote, tmp_path):
    local, store = ModelStore(tmp_path / "local"), remote.store()
    assert type(store).__name__ == "RemoteModelStore" and store.root == remote.url
    gate = {"decision": "published", "candidate": {"ap": 0.9}, "published": {"ap": 0.8}}
    engines = [_engine(40, seed=1), _engine(50, seed=2)]
    for s in (local, store):
        first = s.publish(engines[0], {0: 40, 1: 2}, "events", "tid", parent=None, gate=gate)
        s.publish(engines[1], {0: 50, 1: 2}, "events", "tid", parent=first.version)

    def fields(v):
        return (v.version, v.number, v.next_offsets, v.events_applied, v.topic, v.topic_id, v.parent, v.gate)

    reader = remote.reader()  # another process: nothing cached
    assert [fields(v) for v in reader.versions()] == [fields(v) for v in local.versions()]
    assert fields(reader.latest()) == fields(local.latest()) and reader.latest().version == "v000002"
    got = reader.get("v000001")
    assert got.url == f"{remote.url}/v000001" and not got.path.exists()  # not downloaded yet
    loaded, expected = got.load(), local.get("v000001").load()
    _same_engine(loaded, expected)
    _same_engine(loaded, engines[0])
    assert (got.path / "state.pt").is_file()  # the verified local copy it was loaded from
    t = torch.full((4,), 60.0, dtype=torch.float64)
    assert torch.equal(
        loaded.score(torch.arange(4), torch.arange(4, 8), t),
        engines[0].score(torch.arange(4), torch.arange(4, 8), t),
    )
    published, engine = reader.load_latest()
    assert published.version == "v000002"
    _same_engine(engine, local.load_latest()[1])
    with pytest.raises(KeyError):
        reader.get("v000009")
    with pytest.raises(KeyError):
        reader.get("not-a-version")


def test_a_version_is_invisible_until_its_manifest_is_written(remote, monkeypatch):
    store, reader = remote.store(), remote.reader()
    store.publish(_engine(10), {0: 10}, "events")
    seen: list[list[str]] = []
    uploads: list[str] = []
    put_file, pipe_file = store.fs.put_file, store.fs.pipe_file

    def watched_put(lpath, rpath, *args, **kwargs):
        put_file(lpath, rpath, *args, **kwargs)
        uploads.append(rpath.rsplit("/", 1)[-1])
        seen.append([v.version for v in reader.versions()])  # a server looking meanwhile
        assert reader.latest().version == "v000001"
        with pytest.raises(KeyError):
            reader.get("v000002")

    def watched_pipe(path, value, *args, **kwargs):
        uploads.append(path.rsplit("/", 1)[-1])
        return pipe_file(path, value, *args, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", watched_put)
    monkeypatch.setattr(store.fs, "pipe_file", watched_pipe)
    second = store.publish(_engine(20), {0: 20}, "events")
    monkeypatch.undo()
    assert sorted(uploads[:2]) == ["config.json", "state.pt"]  # the payload first ...
    if remote.url.startswith("s3://"):
        assert uploads[2:] == ["manifest.json"]  # ... the manifest last, in one PUT
    assert seen == [["v000001"], ["v000001"]]
    assert reader.latest().version == second.version == "v000002"

    # A crashed writer's payload without a manifest: never listed, its name never reused, pruned
    # once a newer version is complete; a prefix above the newest complete one may be a write in
    # progress and is left alone.
    remote.put(remote.object("v000003", "state.pt"), b"half a checkpoint")
    assert [v.version for v in reader.versions()] == ["v000001", "v000002"]
    with pytest.raises(KeyError):
        reader.get("v000003")
    assert store.publish(_engine(30), {0: 30}, "events").version == "v000004"
    remote.put(remote.object("v000005", "state.pt"), b"being uploaded")
    store.prune()
    assert remote.prefixes() == ["v000001", "v000002", "v000004", "v000005"]


def test_a_corrupted_payload_is_refused_after_download(remote, caplog):
    store = remote.store()
    good = store.publish(_engine(20), {0: 20}, "events")
    bad = store.publish(_engine(30), {0: 30}, "events")
    state = remote.object(bad.version, "state.pt")
    data = bytearray(remote.fs.cat_file(state))
    data[len(data) // 2] ^= 0xFF
    remote.fs.pipe(state, bytes(data))

    reader = remote.reader()
    with pytest.raises(ValueError, match="checksum"):
        reader.get(bad.version).load()
    assert not (reader.cache_dir / bad.version).exists()  # nothing unverified is left in the cache
    assert [p.name for p in reader.cache_dir.iterdir()] == []
    with caplog.at_level(logging.ERROR, logger="tgnstream.runtime.models"):
        published, engine = reader.load_latest()
    assert published.version == good.version and int(engine.events_applied) == 20
    assert any("damaged" in r.getMessage() and bad.version in r.getMessage() for r in caplog.records)

    # A missing payload file is refused the same way.
    remote.fs.rm_file(state)
    with pytest.raises(ValueError, match="missing"):
        remote.reader().get(bad.version).verify()

    # A cached copy that rotted is fetched again, not loaded.
    cached = reader.get(good.version)
    cached.verify()
    (cached.path / "state.pt").write_bytes(b"rotten")
    assert int(reader.get(good.version).load().events_applied) == 20


def test_an_unreachable_store_is_not_a_damaged_version(remote, monkeypatch):
    store = remote.store()
    store.publish(_engine(20), {0: 20}, "events")
    reader = remote.reader()
    published = reader.latest()

    def offline(*args, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(reader.fs, "get_file", offline)
    with pytest.raises(ModelUnavailable, match="could not download"):
        published.load()
    monkeypatch.undo()
    assert int(published.load().events_applied) == 20


def test_pruning_keeps_the_newest_versions(remote):
    store = remote.store(keep=2)
    for i in range(4):
        store.publish(_engine(10), {0: 10 * (i + 1)}, "events")
    assert [v.version for v in remote.reader().versions()] == ["v000003", "v000004"]
    assert remote.prefixes() == ["v000003", "v000004"]
    # The writer's staged copies became its cache, which is pruned the same way.
    assert sorted(p.name for p in store.cache_dir.iterdir()) == ["v000003", "v000004"]


def test_a_failed_write_leaves_no_version(remote, monkeypatch):
    store = remote.store()
    kept = store.publish(_engine(10), {0: 10}, "events")

    def manifest_upload_fails(*args, **kwargs):
        raise OSError("connection reset while uploading the manifest")

    if remote.url.startswith("s3://"):
        monkeypatch.setattr(store.fs, "pipe_file", manifest_upload_fails)
    else:
        monkeypatch.setattr("tgnstream.runtime.remote_models.write_manifest", manifest_upload_fails)
    with pytest.raises(OSError, match="manifest"):
        store.publish(_engine(20), {0: 20}, "events")
    monkeypatch.undo()
    assert remote.prefixes() == [kept.version]
    assert store.latest().version == kept.version
    assert [p.name for p in store.cache_dir.iterdir()] == [kept.version]  # no staging left behind


def test_credentials_and_endpoint_from_the_environment(s3_endpoint, tmp_path, monkeypatch):
    import fsspec

    bucket = f"env-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", **_s3_options(s3_endpoint)).mkdir(bucket)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    url = f"s3://{bucket}/models"
    store = ModelStore(url, storage_options={"skip_instance_cache": True}, cache_dir=tmp_path / "c")
    store.publish(_engine(10), {0: 10}, "events")
    assert ModelStore(url, cache_dir=tmp_path / "d").latest().version == "v000001"


def test_the_trainer_publishes_to_a_url(remote):
    from tgnstream.trainer.continual_config import TrainerConfig
    from tgnstream.trainer.service import TrainerService

    cfg = TrainerConfig(
        start={"memory_dim": 8, "seed": 3},
        publish={"dir": remote.url, "storage_options": remote.options, "cache_dir": remote.tmp / "tc"},
        checkpoints={"dir": remote.tmp / "trainer"},
        device="cpu",
    )
    assert cfg.publish.dir == remote.url
    svc = TrainerService(cfg)
    (v,) = remote.reader().versions()
    assert (v.version, v.next_offsets, v.gate["decision"]) == ("v000001", {}, "start model")
    assert svc.published_version == "v000001" and int(v.load().events_applied) == 0


# ------------------------------------------------------------------------- the hot swapper
def test_a_server_hot_swaps_versions_from_an_object_store(remote, monkeypatch):
    monkeypatch.setattr("tgnstream.runtime.hot_swap.BatchReader", NoNewEvents)
    writer = remote.store()
    stream = StreamConfig()
    served = _engine(40, seed=1)
    writer.publish(served, {0: 40}, stream.kafka.topic)
    live = LiveEngine(served, "v000001", {0: 40})
    refused: list[tuple[str, str]] = []
    config = HotSwapConfig(
        dir=remote.url,
        storage_options=remote.options,
        cache_dir=remote.tmp / "server-cache",
        watch_interval_s=0.05,
    )
    swapper = HotSwapper(
        config, stream, live, "v000001", on_refused=lambda v, r, m: refused.append((v, r, m))
    )
    assert swapper.store.url == remote.url

    # A version the store cannot deliver for now is retried, not refused.
    get_file = swapper.store.fs.get_file
    failures = []

    def flaky(*args, **kwargs):
        if len(failures) < 2:
            failures.append(1)
            raise ConnectionError("connection refused")
        return get_file(*args, **kwargs)

    monkeypatch.setattr(swapper.store.fs, "get_file", flaky)
    newer = _engine(40, seed=2)
    writer.publish(newer, {0: 40}, stream.kafka.topic, parent="v000001")
    swapper.start()
    try:
        ready = wait_until(lambda: swapper.take_ready({0: 40}))
        assert (ready.version, ready.offsets) == ("v000002", {0: 40}) and len(failures) == 2
        newer.fold_pending()  # as the swapper does before its catch-up
        _same_engine(ready.engine, newer)
        assert (config.cache_dir / "v000002" / "state.pt").is_file()

        # A version whose state.pt is damaged on its way up is refused after its download; the
        # served version stays.
        put_file = writer.fs.put_file

        def corrupting_put(lpath, rpath, *args, **kwargs):
            if not rpath.endswith("state.pt"):
                return put_file(lpath, rpath, *args, **kwargs)
            with open(lpath, "rb") as f:
                data = bytearray(f.read())
            data[len(data) // 2] ^= 0xFF
            remote.fs.pipe(rpath, bytes(data))

        monkeypatch.setattr(writer.fs, "put_file", corrupting_put)
        writer.publish(_engine(40, seed=3), {0: 40}, stream.kafka.topic, parent="v000002")
        wait_until(lambda: refused)
        assert refused[0][:2] == ("v000003", "unloadable") and "checksum" in refused[0][2]
        assert swapper.take_ready({0: 40}) is None and swapper.error is None
    finally:
        swapper.stop()


# --------------------------------------------------------------------------- configuration
def test_models_dir_is_a_directory_or_a_url(tmp_path, monkeypatch):
    from tgnstream.apps.serve_config import load_serve_config
    from tgnstream.trainer.continual_config import TrainerConfig

    assert parse_location(str(tmp_path)) == tmp_path
    assert parse_location("runs/models") == Path("runs/models")
    assert HotSwapConfig(dir="file:///srv/models").dir == "file:///srv/models"
    assert HotSwapConfig(dir=str(tmp_path)).dir == tmp_path
    assert HotSwapConfig().dir is None
    assert TrainerConfig(publish={"dir": "memory://models"}).publish.dir == "memory://models"
    with pytest.raises(ValidationError, match="unknown storage scheme 'nosuch'"):
        HotSwapConfig(dir="nosuch://bucket/models")
    with pytest.raises(ValidationError, match="unknown storage scheme"):
        TrainerConfig(publish={"dir": "nosuch://bucket/models"})
    monkeypatch.setenv("TGNSTREAM_SERVE_MODELS__DIR", "memory://bucket/models")
    monkeypatch.setenv("TGNSTREAM_SERVE_MODELS__STORAGE_OPTIONS", '{"endpoint_url": "http://minio:9000"}')
    served = load_serve_config(None).models
    assert (served.dir, served.storage_options) == (
        "memory://bucket/models",
        {"endpoint_url": "http://minio:9000"},
    )

    import fsspec

    def backend_missing(protocol):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec, "get_filesystem_class", backend_missing)
    with pytest.raises(ValidationError, match=r"backend for s3://.*tgnstream\[s3\]"):
        HotSwapConfig(dir="s3://bucket/models")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "fsspec", None)  # fsspec not installed
    with pytest.raises(ValidationError, match=r"needs fsspec: pip install 'tgnstream\[s3\]'"):
        HotSwapConfig(dir="s3://bucket/models")
    with pytest.raises(ValueError, match="needs fsspec"):
        ModelStore("s3://bucket/models")


def test_a_local_directory_needs_no_fsspec(tmp_path):
    code = (
        "import sys; sys.modules['fsspec'] = None\n"
        "from tgnstream.runtime.hot_swap import HotSwapConfig\n"
        "from tgnstream.runtime.models import ModelStore\n"
        f"cfg = HotSwapConfig(dir={str(tmp_path)!r})\n"
        "assert ModelStore(cfg.dir).versions() == []\n"
        "assert 'tgnstream.runtime.remote_models' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, timeout=120
    )
    assert done.returncode == 0, done.stderr
