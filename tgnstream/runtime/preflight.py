"""Pre-flight of a hot-swap candidate: what a published version must pass before it serves.

Checksums only say that the files are the ones the trainer wrote; they do not say the model in
them can answer. A version is therefore checked, on a private copy, in three steps
(``HotSwapper`` runs them; any failure is a refusal with one of ``REFUSAL_REASONS``):

1. **Weights** (right after loading, before any replay): every tensor of the checkpoint finite:
   each weight, and each state buffer (memory, mailbox, neighbour table, pair history, PRES
   statistics); only the two time bounds of an empty state (``watermark`` = -inf,
   ``first_event_time`` = +inf) may be infinite, never NaN.
2. **Shapes**: the candidate's architecture (config) is the served one's, and every weight has
   the shape the served model has (the readers' shared state and the decoder's buffers are sized
   for it).
3. **Canary** (once the candidate has caught up with the live position, so both models answer
   from the same log prefix): a probe set drawn deterministically from the served state, scored
   by both models. The probe: the ``canary.pairs`` most recently active nodes (latest
   neighbour-table time first, ties by dense id), each with its most recent neighbour (a pair
   that did interact) and with a destination drawn by a generator seeded from the number of
   events applied (a pair that mostly did not); plus a TopK for the first ``canary.topk_sources``
   of them over the probe's destinations. Every probability must be finite and in [0, 1]; and
   the candidate's average precision on the probe pairs may be at most ``canary.max_ap_drop``
   below the served model's (the promotion gate's comparison, here on the live state; skipped,
   with a log line, when the state has fewer than ``canary.min_pairs`` active nodes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from tgnstream.core.engine import MemoryEngine
from tgnstream.core.evaluation import average_precision

__all__ = [
    "CanaryConfig",
    "CanaryReport",
    "Answers",
    "ProbeSet",
    "REFUSAL_REASONS",
    "Refused",
    "answers",
    "canary",
    "judge",
    "check_shapes",
    "check_weights",
    "probe_set",
]

#: Every value of ``tgnstream_model_swaps_total{result="refused", reason=...}``.
REFUSAL_REASONS = (
    "unloadable",  # a file is missing, damaged or does not match the manifest's checksum
    "manifest",  # the manifest was edited or damaged, names another version, or cannot be read
    "nonfinite_weights",  # a NaN or inf in a weight or a state buffer
    "architecture",  # config or weight shapes differ from the served model's
    "topic",  # trained on another topic, or another incarnation of it
    "offsets",  # not on this server's batch boundaries
    "replay",  # replaying the topic gives it non-finite memory
    "canary",  # the probe set's answers are not finite, out of range, or much worse than serving
)

# State buffers whose empty value is an infinity by design (time bounds of a state with no event).
_INFINITE_WHEN_EMPTY = frozenset({"watermark", "first_event_time"})


class Refused(Exception):
    """A candidate that must not serve: ``reason`` (one of ``REFUSAL_REASONS``) and a message."""

    def __init__(self, reason: str, message: str):
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        super().__init__(message)
        self.reason = reason


class CanaryConfig(BaseModel):
    """The probe set a hot-swap candidate answers before it serves (module docstring, step 3)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pairs: int = Field(256, ge=0, description="probe pairs (most recently active nodes); 0: no canary")
    topk_sources: int = Field(8, ge=0, description="TopK queries among the probe pairs' sources")
    k: int = Field(10, ge=1, description="k of the canary's TopK queries")
    max_ap_drop: float = Field(
        0.1,
        ge=0,
        le=1,
        description="refuse a candidate whose average precision on the probe pairs is more than this "
        "below the serving model's",
    )
    min_pairs: int = Field(
        32, ge=1, description="with fewer active nodes than this, only finiteness and range are checked"
    )


def check_weights(engine: MemoryEngine) -> None:
    """Raise ``Refused("nonfinite_weights")`` naming the first tensor of ``engine``'s checkpoint
    (weights and state) that holds a NaN or an infinity."""
    for name, tensor in engine.state_dict().items():
        if not torch.is_tensor(tensor) or not tensor.is_floating_point():
            continue
        bad = torch.isnan(tensor) if name in _INFINITE_WHEN_EMPTY else ~torch.isfinite(tensor)
        count = int(bad.sum())
        if count:
            raise Refused(
                "nonfinite_weights",
                f"{name} {tuple(tensor.shape)} holds {count} non-finite value{'s' if count > 1 else ''}",
            )


def check_shapes(candidate: MemoryEngine, serving: MemoryEngine) -> None:
    """Raise ``Refused("architecture")`` when the candidate's config or any weight's shape
    differs from the served model's."""
    if candidate.config != serving.config:
        theirs, ours = candidate.config.model_dump(), serving.config.model_dump()
        diff = sorted(k for k in ours if theirs.get(k) != ours.get(k))
        raise Refused(
            "architecture",
            f"its architecture differs from the served model's in {', '.join(diff)} (restart the server "
            "to change it)",
        )
    want = {k: tuple(v.shape) for k, v in serving.model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in candidate.model.state_dict().items()}
    if want != have:
        wrong = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise Refused(
            "architecture",
            f"weights {', '.join(wrong[:3])} have shapes {[have.get(k) for k in wrong[:3]]}, the served "
            f"model {[want.get(k) for k in wrong[:3]]}",
        )


@dataclass(frozen=True)
class ProbeSet:
    """External ids (so that each engine maps them with its own id map) and one query time.

    sources, positives, negatives: ``P`` names each; topk: the first sources that get a TopK
    over ``candidates`` (the distinct destinations of the probe)."""

    sources: list[str]
    positives: list[str]
    negatives: list[str]
    time: float
    topk: list[str]
    candidates: list[str]


def probe_set(engine: MemoryEngine, config: CanaryConfig) -> ProbeSet | None:
    """The canary's probe set drawn from ``engine``'s state (module docstring), or None for a
    state without any neighbour yet. A pure function of the state."""
    n = len(engine.ids)
    if config.pairs == 0 or n == 0:
        return None
    nb = engine.neighbors
    ids, ts = nb.ids[:n], nb.ts[:n]
    valid = ids >= 0
    latest_t = torch.where(valid, ts, torch.full_like(ts, float("-inf")))
    last, slot = latest_t.max(dim=1)
    active = torch.nonzero(valid.any(dim=1)).flatten()
    if active.numel() == 0:
        return None
    # Most recent first; a stable sort keeps ties in ascending dense id.
    order = torch.sort(last[active], descending=True, stable=True).indices
    src = active[order[: config.pairs]]
    pos = ids[src, slot[src]]
    destinations = engine.destinations()
    g = torch.Generator().manual_seed(int(engine.events_applied))
    neg = destinations.cpu()[torch.randint(destinations.numel(), (src.numel(),), generator=g)]
    names = engine.ids.names(torch.cat([src.cpu(), pos.cpu(), neg]).tolist())
    p = src.numel()
    sources, positives, negatives = names[:p], names[p : 2 * p], names[2 * p :]
    candidates = list(dict.fromkeys(positives + negatives))
    return ProbeSet(
        sources, positives, negatives, float(engine.watermark), sources[: config.topk_sources], candidates
    )


@dataclass(frozen=True)
class CanaryReport:
    """What the probe set gave: AP on the probe pairs for each model, the number of pairs, and
    how many of the candidate's TopK answers the serving model's TopK shares (a drift measure,
    reported, not gated)."""

    pairs: int
    candidate_ap: float
    serving_ap: float
    topk_overlap: float
    compared: bool

    def describe(self) -> str:
        return (
            f"canary over {self.pairs} probe pairs: AP {self.candidate_ap:.3f} "
            f"(serving {self.serving_ap:.3f}), TopK overlap {self.topk_overlap:.2f}"
        )


@dataclass(frozen=True)
class Answers:
    """One model's answers to a probe set: ``scores [2P]`` (positive pairs, then negative), each
    TopK's names, and every TopK probability (concatenated)."""

    scores: torch.Tensor
    tops: list[list[str]]
    top_probs: torch.Tensor


@torch.no_grad()
def answers(engine: MemoryEngine, probe: ProbeSet, k: int) -> Answers:
    """``engine``'s answers to ``probe`` (read only: the serving model answers under its read lock).
    Raises ``Refused("canary")`` when the engine does not know a probe id (its state is elsewhere)."""
    dev = engine.device
    dense, _ = engine.ids.lookup(probe.sources + probe.positives + probe.negatives, create=False)
    unknown = int((dense < 0).sum())
    if unknown:
        raise Refused(
            "canary", f"{unknown} probe ids are unknown to it: its state is not at the live position"
        )
    p = len(probe.sources)
    dense = dense.to(dev)
    src, pos, neg = dense[:p], dense[p : 2 * p], dense[2 * p :]
    t = torch.full((2 * p,), probe.time, dtype=torch.float64, device=dev)
    scores = engine.score(torch.cat([src, src]), torch.cat([pos, neg]), t).float().cpu()
    tops, top_probs = [], torch.zeros(0)
    s = len(probe.topk)
    if s:
        cand, _ = engine.ids.lookup(probe.candidates, create=False)
        cand = cand.to(dev)
        ts = torch.full((s,), probe.time, dtype=torch.float64, device=dev)
        # One ranking call for every TopK source: the candidates are embedded once.
        logits = engine.rank_logits(src[:s], ts, cand, probe.time)
        logits = logits.masked_fill(cand.unsqueeze(0) == src[:s].unsqueeze(1), float("-inf"))
        top = torch.topk(logits, min(k, cand.numel()), dim=1)
        top_probs = torch.sigmoid(top.values[torch.isfinite(top.values)]).float().cpu()
        tops = [engine.ids.names(cand[row].cpu().tolist()) for row in top.indices]
    return Answers(scores, tops, top_probs)


def judge(ours: Answers, theirs: Answers, config: CanaryConfig) -> CanaryReport:
    """Raise ``Refused("canary")`` when the candidate's answers (``ours``) are not finite, not in
    [0, 1], or their AP on the probe pairs is more than ``max_ap_drop`` below the serving
    model's (``theirs``); else the report."""
    for what, values in (("Score", ours.scores), ("TopK", ours.top_probs)):
        bad = int((~torch.isfinite(values) | (values < 0) | (values > 1)).sum())
        if bad:
            raise Refused(
                "canary",
                f"{bad} of its {values.numel()} canary {what} probabilities are not finite or not in [0, 1]",
            )
    p = ours.scores.numel() // 2
    labels = torch.cat([torch.ones(p), torch.zeros(p)])
    compared = p >= config.min_pairs
    cand_ap = average_precision(ours.scores, labels)
    serve_ap = average_precision(theirs.scores, labels) if bool(torch.isfinite(theirs.scores).all()) else 0.0
    shared = [len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(ours.tops, theirs.tops)]
    report = CanaryReport(p, cand_ap, serve_ap, sum(shared) / len(shared) if shared else 1.0, compared)
    if compared and cand_ap < serve_ap - config.max_ap_drop:
        raise Refused(
            "canary",
            f"its {report.describe()}: AP more than canary.max_ap_drop = {config.max_ap_drop} below the "
            "serving model's",
        )
    return report


def canary(
    candidate: MemoryEngine, serving: MemoryEngine, probe: ProbeSet, config: CanaryConfig
) -> CanaryReport:
    """``judge`` of both models' ``answers`` to ``probe`` (both at the same log position)."""
    return judge(answers(candidate, probe, config.k), answers(serving, probe, config.k), config)
