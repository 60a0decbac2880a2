"""Hot swap of published model versions into a serving process (docs/architecture.md §5).

A watcher thread looks at the published versions (``tgnstream.runtime.models``) every
``watch_interval_s``. For a version newer than the served one it loads the weights and state
into a *shadow* engine (verifying checksums and that the architecture matches the served one),
then replays the topic from the version's offsets up to the live position, on the shared stream
path (``BatchReader``: the same batches the live ingest applied), with the serving apply. It
never takes the live engine's lock for long: queries and ingest go on. Once the shadow stands
exactly at the live position it is *parked*; the ingest loop, between two batches, takes it
(``take_ready``) and swaps it in under the write lock (``IngestLoop.swap_in``). If the live
position moved on meanwhile, the catch-up simply continues.

Every candidate passes a pre-flight on its private copy before it serves
(``tgnstream.runtime.preflight``): finite weights and state right after loading, the served
architecture and weight shapes, and, once caught up, a canary probe set scored by both models.
A version that fails to load or verify, whose manifest cannot be trusted (edited, damaged,
naming another version), that fails the pre-flight, whose topic differs, or whose offsets are
not on the server's batch boundaries, is refused: one ERROR line with the reason,
``tgnstream_model_swaps_total{result="refused",reason=...}`` (an alert fires on it), and the
old model keeps serving; a refused version is not tried again.

Lineage (``tgnstream.runtime.models``): the server follows the lineage of the version it serves.
When the newest version belongs to another lineage, or (for a served version whose lineage is
unknown: a snapshot or an older manifest) its number is below the served one, the store was
restarted (wiped, or another trainer publishes into it). The stated rule: one WARNING line
naming both, ``tgnstream_model_lineage_changes_total`` counts it, and the server follows the new
lineage: its newest version is a candidate whatever its number, and passes the same pre-flight
(same architecture and topic incarnation, batch boundaries, canary) before it serves; until one
does, the old version keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from tgnstream.core.engine import MemoryEngine
from tgnstream.core.step import TemporalStep
from tgnstream.runtime.live import LiveEngine
from tgnstream.runtime.models import ModelStore, ModelUnavailable, PublishedModel
from tgnstream.runtime.preflight import (
    CanaryConfig,
    Refused,
    answers,
    check_shapes,
    check_weights,
    judge,
    probe_set,
)
from tgnstream.runtime.store_location import StoreLocation
from tgnstream.stream.assemble import known_in
from tgnstream.stream.config import StreamConfig
from tgnstream.stream.reader import BatchReader

__all__ = ["HotSwapConfig", "HotSwapper", "ReadyModel", "open_store", "version_number"]

log = logging.getLogger(__name__)


class HotSwapConfig(BaseModel):
    """Where published versions appear, and how the server follows them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dir: StoreLocation | None = Field(
        None,
        description="the trainer's publish.dir (a directory, or an object-store URL such as "
        "s3://bucket/models: needs tgnstream[s3]); the server starts from its newest version when it has "
        "no snapshot, and hot-swaps every newer one (None: off)",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="with a URL: options of its fsspec filesystem, e.g. {endpoint_url = "
        '"http://minio:9000"} for s3:// (credentials: better from the environment, AWS_ACCESS_KEY_ID ...)',
    )
    cache_dir: Path | None = Field(
        None,
        description="with a URL: where versions are downloaded and verified before they are loaded "
        "(default: a directory under the system's temporary directory)",
    )
    watch_interval_s: float = Field(5.0, gt=0, description="how often the directory is looked at")
    canary: CanaryConfig = Field(
        default_factory=CanaryConfig,
        description="the probe set every candidate answers, next to the serving model, before it serves",
    )
    wait_for_first: bool = Field(
        True,
        description="with no snapshot and no published version yet, wait for the first one (the trainer "
        "publishes its start model when it starts) instead of serving [model]",
    )


def open_store(config: HotSwapConfig) -> ModelStore:
    """The store of ``config.dir`` (a directory or an object-store URL) with its options."""
    if config.dir is None:
        raise ValueError("no models.dir configured")
    return ModelStore(config.dir, storage_options=config.storage_options, cache_dir=config.cache_dir)


def version_number(version: str) -> int:
    """The number of a published version's name (``v000012`` -> 12); 0 for any other name
    (a checkpoint or fresh weights: every published version is newer)."""
    if len(version) > 1 and version[0] == "v" and version[1:].isdigit():
        return int(version[1:])
    return 0


@dataclass(frozen=True)
class ReadyModel:
    """A shadow engine parked at ``offsets`` (the live position when it got there)."""

    engine: MemoryEngine
    version: str
    offsets: dict[int, int]
    started: float  # time.monotonic() when the version was picked up
    replayed_events: int
    lineage: str | None = None


class HotSwapper:
    """The watcher and catch-up thread (see the module docstring).

    Args:
        config: the models directory and the watch interval.
        stream: the server's ingest settings (the catch-up reads the topic the same way).
        live: the live engine (read for its position and architecture only).
        served_version: the version served now.
        on_refused(version, reason, message): called for each refused version (``reason``: one
            of ``preflight.REFUSAL_REASONS``; metrics).
        served_lineage: the lineage of the served version when known (else looked up in the store).
        on_lineage_change(old, new): called when the store starts a new lineage (metrics).
    """

    def __init__(
        self,
        config: HotSwapConfig,
        stream: StreamConfig,
        live: LiveEngine,
        served_version: str,
        on_refused=None,
        topic_id: str | None = None,
        served_lineage: str | None = None,
        on_lineage_change=None,
    ):
        if config.dir is None:
            raise ValueError("HotSwapper needs models.dir")
        self.config = config
        self.stream = stream
        self.live = live
        self.store = open_store(config)
        self.served = version_number(served_version)
        self.lineage = served_lineage if served_lineage is not None else self._lineage_of(served_version)
        self.refused: set[tuple] = set()
        self.topic_id = topic_id
        self._on_refused = on_refused
        self._on_lineage_change = on_lineage_change
        self._announced: set[str | None] = set()
        self.last_canary = None
        self._lock = threading.Lock()
        self._ready: ReadyModel | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hot-swap", daemon=True)
        self.error: BaseException | None = None

    # ------------------------------------------------------------------------------ control
    def set_topic_id(self, topic_id: str) -> None:
        """The topic's incarnation the live state now follows (after a ``reset`` log gap the server
        reads a recreated topic): versions trained on it are accepted, those of the old one refused,
        and a shadow parked for the old incarnation is dropped."""
        with self._lock:
            if topic_id == self.topic_id:
                return
            self.topic_id = topic_id
            self._ready = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop watching; a candidate being prepared is abandoned (its thread is a daemon)."""
        self._stop.set()
        self._thread.join(timeout=timeout)

    def take_ready(self, at: dict[int, int]) -> ReadyModel | None:
        """The parked shadow if it stands exactly at ``at`` (the live position now; called by
        the ingest loop between two batches), else None."""
        with self._lock:
            ready = self._ready
            if ready is None or not _same_position(ready.offsets, at):
                return None
            self._ready = None
            self.served = version_number(ready.version)
            self.lineage = ready.lineage
            return ready

    # ------------------------------------------------------------------------------- watcher
    def _lineage_of(self, version: str) -> str | None:
        try:
            return self.store.get(version).lineage
        except (KeyError, ValueError, OSError):
            return None  # not published here (a checkpoint), pruned, or unreadable

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                latest = self.store.latest()
                self._refuse_untrusted()
                if latest is not None and self._is_candidate(latest):
                    self._prepare(latest)
            except Exception as e:  # the old model keeps serving; try again at the next look
                self.error = e
                log.exception("hot swap: unexpected error; the current model keeps serving")
            self._stop.wait(self.config.watch_interval_s)

    def _is_candidate(self, latest: PublishedModel) -> bool:
        """Whether ``latest`` (the store's newest trusted version) should be tried (module
        docstring: a newer number of the served lineage, or the newest of a new lineage)."""
        if (latest.lineage, latest.version) in self.refused:
            return False
        if self.lineage is not None and latest.lineage is not None and latest.lineage != self.lineage:
            self._announce(latest, f"its lineage {latest.lineage} is not the served one's ({self.lineage})")
            return True
        if 0 < latest.number < self.served:
            self._announce(latest, f"its number is below the served {self.live.model_version}'s")
            return True
        return latest.number > self.served

    def _announce(self, latest: PublishedModel, why: str) -> None:
        if latest.lineage in self._announced:
            return
        self._announced.add(latest.lineage)
        log.warning(
            "hot swap: the models store was restarted (newest version %s: %s); following its new "
            "lineage: %s is a candidate and passes the same pre-flight, %s serves until then",
            latest.version,
            why,
            latest.version,
            self.live.model_version,
        )
        if self._on_lineage_change is not None:
            self._on_lineage_change(self.lineage, latest.lineage)

    def _refuse_untrusted(self) -> None:
        """Each manifest the store could not trust is a refusal, once (its name and reason)."""
        for name, message in dict(self.store.untrusted).items():
            key = ("untrusted", name, message)
            if key not in self.refused:
                self.refused.add(key)
                self._report(name, "manifest", message)

    def _refuse(self, published: PublishedModel, refusal: Refused) -> None:
        self.refused.add((published.lineage, published.version))
        self._report(published.version, refusal.reason, str(refusal))

    def _report(self, version: str, reason: str, message: str) -> None:
        log.error(
            "hot swap: version %s refused [%s]: %s; %s keeps serving",
            version,
            reason,
            message,
            self.live.model_version,
        )
        if self._on_refused is not None:
            self._on_refused(version, reason, message)

    def _park(self, ready: ReadyModel) -> bool:
        """Offer ``ready`` to the ingest loop until it takes it (True), or the live position
        moves past it (False: the catch-up continues), or the swapper stops (True)."""
        with self._lock:
            self._ready = ready
        while not self._stop.is_set():
            live = self._live_position()  # never under self._lock: the ingest loop takes both
            with self._lock:
                if self._ready is None:
                    return True
                if not _at_or_after(ready.offsets, live):
                    self._ready = None
                    return False
            time.sleep(0.002)
        return True

    def _live_position(self) -> dict[int, int]:
        with self.live.read():
            return dict(self.live.next_offsets)

    def _prepare(self, published: PublishedModel) -> None:
        started = time.monotonic()
        live_engine = self.live.engine
        try:
            shadow = published.load(live_engine.device)
        except ModelUnavailable as e:  # the object store cannot be read now: not the version's fault
            log.warning(
                "hot swap: version %s cannot be fetched now (%s); trying again later", published.version, e
            )
            return
        except (ValueError, OSError, RuntimeError, KeyError) as e:
            self._refuse(published, Refused("unloadable", f"it does not load or verify: {e}"))
            return
        try:
            position = self._check(published, shadow, live_engine)
        except Refused as refusal:
            self._refuse(published, refusal)
            return
        shadow.eval()
        shadow.fold_pending()
        log.info(
            "hot swap: %s loaded (offsets %s); catching up with the live position %s",
            published.version,
            published.next_offsets,
            position,
        )
        self._catch_up(published, shadow, started)

    def _check(self, published: PublishedModel, shadow: MemoryEngine, live_engine: MemoryEngine) -> dict:
        """The checks before any replay (raise ``Refused``); returns the live position now."""
        check_weights(shadow)
        check_shapes(shadow, live_engine)
        if published.topic and published.topic != self.stream.kafka.topic:
            raise Refused(
                "topic", f"it was trained on topic {published.topic!r}, not {self.stream.kafka.topic!r}"
            )
        if published.topic_id and self.topic_id and published.topic_id != self.topic_id:
            raise Refused(
                "topic", f"it was trained on another incarnation of the topic (id {published.topic_id})"
            )
        position = self._live_position()
        behind = sum(position.values()) - sum(published.next_offsets.values())
        if behind % self.stream.batch_max_events:
            raise Refused(
                "offsets",
                f"its offsets {published.next_offsets} are not on this server's batch boundaries "
                f"(ingest.batch_max_events = {self.stream.batch_max_events} must equal the trainer's "
                "stream.batch_max_events)",
            )
        return position

    def _canary(
        self, published: PublishedModel, shadow: MemoryEngine, position: dict[int, int]
    ) -> bool | None:
        """Run the canary with the shadow at ``position``: True (passed), False (refused), None
        (the live position moved on meanwhile: catch up, then try again)."""
        try:
            with self.live.read() as live_engine:  # the probe and the served answers: one log prefix
                if not _same_position(position, self.live.next_offsets):
                    return None
                probe = probe_set(live_engine, self.config.canary)
                theirs = answers(live_engine, probe, self.config.canary.k) if probe is not None else None
            # The shadow is private and stands at the same position: no lock for its answers.
            report = None
            if probe is not None:
                report = judge(answers(shadow, probe, self.config.canary.k), theirs, self.config.canary)
        except Refused as refusal:
            self._refuse(published, refusal)
            return False
        self.last_canary = report
        if report is None:
            log.info("hot swap: %s: no canary (no active node in the state yet)", published.version)
        else:
            log.info(
                "hot swap: %s passed its %s%s",
                published.version,
                report.describe(),
                "" if report.compared else " (too few pairs to compare)",
            )
        return True

    def _catch_up(self, published: PublishedModel, shadow: MemoryEngine, started: float) -> None:
        ids = shadow.ids

        def register(names: list[str]) -> torch.Tensor:
            dense, _ = ids.lookup(names, create=True)
            ids.flush()
            return dense

        reader = BatchReader(
            self.stream,
            published.next_offsets,
            shadow.config.edge_dim,
            float(shadow.watermark),
            register,
            device=shadow.device,
            topic_id=self.topic_id,
            known=known_in(lambda: ids),
        )
        position = dict(reader.next_offsets)
        replayed, looked_at, checked = 0, time.monotonic(), False
        try:
            while not self._stop.is_set():
                target = self._live_position()
                if _at_or_after(position, target):
                    if not checked:
                        passed = self._canary(published, shadow, position)
                        if passed is False:
                            return
                        checked = passed is True
                        if not checked:
                            continue
                    ready = ReadyModel(
                        shadow, published.version, dict(position), started, replayed, published.lineage
                    )
                    if self._park(ready):
                        return  # swapped in (or stopping)
                    continue  # the live position moved past it: catch up again
                if time.monotonic() - looked_at >= 1.0:
                    looked_at = time.monotonic()
                    newer = self.store.latest()
                    if newer is not None and (
                        newer.number > published.number or newer.lineage != published.lineage
                    ):
                        log.info(
                            "hot swap: %s superseded by %s during its catch-up",
                            published.version,
                            newer.version,
                        )
                        return
                for batch in reader.poll(until=target):
                    if len(batch.events):
                        ev = batch.events
                        shadow.ensure_capacity(int(torch.maximum(ev.src.max(), ev.dst.max())) + 1)
                        step = TemporalStep(shadow)
                        prepared = step.prepare_live(ev)
                        if prepared.nonfinite_nodes().numel():
                            self._refuse(
                                published, Refused("replay", "replaying the topic gives it non-finite memory")
                            )
                            return
                        step.commit_live(prepared)
                    replayed += len(batch.events)
                    position.update(batch.next_offsets)
        finally:
            reader.close()


def _at_or_after(a: dict[int, int], b: dict[int, int]) -> bool:
    """Position ``a`` is at or after ``b`` in every partition (absent = 0)."""
    return all(a.get(p, 0) >= b.get(p, 0) for p in set(a) | set(b))


def _same_position(a: dict[int, int], b: dict[int, int]) -> bool:
    return all(a.get(p, 0) == b.get(p, 0) for p in set(a) | set(b))
