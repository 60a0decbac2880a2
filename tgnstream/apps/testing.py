"""Small helpers for tests and benchmarks that talk to Kafka (the embedded broker or a real one)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tgnstream.apps.broker import free_port

__all__ = [
    "small_engine",
    "NoNewEvents",
    "wait_until",
    "child_pids",
    "consume_records",
    "free_port",
    "serve_config_dict",
    "StubFetcher",
    "feed_in_chunks",
    "prefix_answer",
]


def consume_records(
    bootstrap: str,
    topic: str,
    count: int,
    *,
    partition: int = 0,
    offset: int = 0,
    timeout: float = 10.0,
    **consumer_config: Any,
) -> list:  # list[kafka.consumer.fetcher.ConsumerRecord]
    """Read exactly ``count`` records of one partition starting at ``offset``.

    Uses ``assign`` + ``seek`` (no consumer-group join: slow on Tansu, see tgnstream.apps.broker).
    Raises ``TimeoutError`` naming how many arrived if fewer than ``count`` do within
    ``timeout`` seconds; records past ``count`` are not returned.
    """
    from kafka import KafkaConsumer, TopicPartition

    tp = TopicPartition(topic, partition)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **consumer_config)
    try:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        records: list = []
        deadline = time.monotonic() + timeout
        while len(records) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{len(records)} of {count} records from {topic}[{partition}]@{offset} in {timeout:g} s"
                )
            for batch in consumer.poll(timeout_ms=int(min(left, 1.0) * 1000)).values():
                records.extend(batch)
        return records[:count]
    finally:
        consumer.close()


def serve_config_dict(
    tmp: Path, bootstrap: str, topic: str, model: dict, batch_max_wait_ms: float = 200, **overrides
) -> dict:
    """A ``tgnstream serve`` config for tests: ports picked by the OS, snapshots and the ready
    file under ``tmp``, one torch thread. ``overrides``: per section, merged one level deep
    (nested dicts such as ``ingest.kafka`` are merged too); other values replace."""
    cfg: dict[str, Any] = {
        "model": dict(model),
        "ingest": {
            "kafka": {"bootstrap_servers": bootstrap, "topic": topic},
            "batch_max_events": 500,
            "batch_max_wait_ms": batch_max_wait_ms,
        },
        "grpc": {"port": 0, "readers": 0},  # in-process answers unless a test asks for readers
        "snapshots": {"dir": str(tmp / "snapshots"), "every_events": 5000, "every_seconds": 3600, "keep": 3},
        "metrics_port": 0,
        "torch_threads": 1,
        "ready_file": str(tmp / "ready.json"),
    }
    for section, values in overrides.items():
        if not isinstance(values, dict):
            cfg[section] = values
            continue
        target = cfg.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key] = {**target[key], **value}
            else:
                target[key] = value
    return cfg


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux ``/proc``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


class StubFetcher:
    """Stands in for the Kafka fetch process when a test feeds ``IngestLoop._handle`` directly:
    one partition whose log ends at ``log_end``."""

    partitions, connected, topic_id = [0], True, None

    def __init__(self, log_end: int):
        self.highwater, self.resets = {0: log_end}, []

    def request_commit(self, offsets) -> None:
        pass


def feed_in_chunks(
    loop, values: list[bytes], seed: int = 9, max_chunk: int = 70, max_pause_s: float = 0.0
) -> None:
    """Hand the records ``values`` (one partition, offsets 0..) to ``loop._handle`` as the fetch
    process would, in chunks of random sizes (1..``max_chunk``), with a random pause of up to
    ``max_pause_s`` after each: arrival timing that must never show in the state."""
    import random

    import numpy as np

    from tgnstream.stream.prefetch import FetchedBatch

    rng, total, at = random.Random(seed), len(values), 0
    while at < total:
        k = min(rng.randint(1, max_chunk), total - at)
        loop._handle(
            FetchedBatch(
                values[at : at + k], [None] * k, np.zeros(k, np.int32), np.arange(at, at + k),
                np.full(k, -1), {0: at + k}, {0: total},
            )
        )  # fmt: skip
        at += k
        if max_pause_s:
            time.sleep(rng.random() * max_pause_s)


def prefix_answer(engine, events, n: int, batch: int, pairs, t: float, start: int = 0) -> list[float]:
    """The Score of ``pairs`` at ``t`` after the log prefix ``events[:n]`` of ``(src, dst, ts)``,
    computed the naive way on ``engine``, whose state reflects ``events[:start]`` (a fresh one:
    0; a published version: its offset): the full batches of ``batch`` events after ``start``
    applied one by one, the rest shown as batch context (what a server's reply with that stamp
    must equal). Unknown ids score as the cold-start slot."""
    import torch

    from tgnstream.core.events import EventBatch
    from tgnstream.core.step import TemporalStep

    device = engine.device
    full = start + (n - start) // batch * batch
    for first in range(start, full, batch):
        chunk = events[first : first + batch]
        dense, _ = engine.ids.lookup([x for s, d, _ in chunk for x in (s, d)])
        t_b = torch.tensor([e[2] for e in chunk], dtype=torch.float64)
        step = EventBatch(dense[0::2].contiguous(), dense[1::2].contiguous(), t_b, torch.zeros(len(chunk), 0))
        TemporalStep(engine).apply(step.to(device))
        engine.fold_pending()
    rest = events[full:n]
    context = None
    if rest:
        dense, _ = engine.ids.lookup([x for s, d, _ in rest for x in (s, d)])
        t_rest = torch.tensor([e[2] for e in rest], dtype=torch.float64)
        context = EventBatch(dense[0::2], dense[1::2], t_rest, torch.zeros(len(rest), 0)).to(device)
    src, _ = engine.ids.lookup([p[0] for p in pairs], create=False)
    dst, _ = engine.ids.lookup([p[1] for p in pairs], create=False)
    cold = len(engine.ids)
    engine.ensure_capacity(cold + 1)
    src, dst = src.masked_fill(src < 0, cold).to(device), dst.masked_fill(dst < 0, cold).to(device)
    t_q = torch.full((len(pairs),), t, dtype=torch.float64, device=device)
    return engine.score(src, dst, t_q, context).float().cpu().tolist()


def wait_until(cond, timeout: float = 30.0, what: str = "the condition", every: float = 0.05):
    """Poll ``cond()`` until it returns something truthy (returned); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class NoNewEvents:
    """A stand-in for the hot swap's catch-up ``BatchReader`` on a topic with nothing past the
    published offsets (unit tests of the swapper without a broker)."""

    def __init__(self, stream, offsets, *args, **kwargs):
        self.next_offsets = dict(offsets)

    def poll(self, until=None):
        return []

    def close(self):
        pass


def small_engine(events: int = 0, seed: int = 0):
    """A tiny engine (width 8, 3 neighbours) after ``events`` deterministic events among 30 named
    nodes, applied through the step in batches of 10: weights from ``seed``, state from the events.
    For tests of what stores, snapshots and swaps do with an engine, not of the model."""
    import torch

    from tgnstream.core.config import ModelConfig
    from tgnstream.core.engine import MemoryEngine
    from tgnstream.core.events import EventBatch
    from tgnstream.core.step import TemporalStep

    torch.manual_seed(seed)
    engine = MemoryEngine(ModelConfig(memory_dim=8, time_dim=4, embedding_dim=8, num_neighbors=3), capacity=4)
    g = torch.Generator().manual_seed(3)
    names = [f"n{i}" for i in range(30)]
    for start in range(0, events, 10):
        idx = torch.randint(30, (20,), generator=g)
        dense, _ = engine.ids.lookup([names[i] for i in idx.tolist()])
        t = torch.arange(start, start + 10, dtype=torch.float64)
        TemporalStep(engine).apply(
            EventBatch(dense[0::2].contiguous(), dense[1::2].contiguous(), t, torch.zeros(10, 0))
        )
    return engine.eval()


def publish_tampered(root: Path, engine, topic: str, edit, reseal: bool, **kwargs: Any):
    """Publish ``engine`` as the next version of the store at ``root`` with its manifest changed by
    ``edit(manifest)`` (resealed or not) before any watcher can see it: the version is written in
    a staging store numbered alike, tampered there, then renamed into ``root`` (one atomic
    step). Returns its version name."""
    import json
    import os
    import shutil

    from tgnstream.runtime.durable import MANIFEST, seal_manifest
    from tgnstream.runtime.models import ModelStore

    staging = root.parent / f".{root.name}-staging"
    shutil.rmtree(staging, ignore_errors=True)
    store, target = ModelStore(staging, keep=1_000), ModelStore(root)
    want = max(target._numbers(), default=0) + 1
    published = None
    while published is None or published.number < want:
        published = store.publish(engine, {}, topic, **kwargs)
    path = published.path / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(seal_manifest(manifest) if reseal else manifest))
    os.rename(published.path, root / published.version)
    shutil.rmtree(staging, ignore_errors=True)
    return published.version
