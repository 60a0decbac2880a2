"""Decoding Kafka record values into validated events (docs/architecture.md §3), fast.

Contract of one JSON value: ``{"src": "user-17", "dst": "page-42", "ts": 1700000000.25,
"features": [...], "label": 0}``. ``src``/``dst`` are non-empty strings of at most
``MAX_ID_BYTES`` UTF-8 bytes (JSON integers are accepted and stringified; booleans, floats and
anything else are rejected); ``ts`` is a finite number of seconds with ``|ts| <= max_abs_ts_s``
(default 1e11: Unix time in milliseconds is refused); ``features`` has exactly
``edge_dim`` finite numbers (absent or ``null`` is allowed only when ``edge_dim == 0``; ``[]``
always means length 0); ``label`` is an optional integer in the int64 range (absent or
``null`` reads as 0). Unknown extra fields are ignored. The optional binary encoding is the
protobuf ``tgnstream.rpc.v1.Event`` (proto3: an absent ``ts`` reads as 0.0, an absent id as
``""`` and is rejected as ``empty_id``).

When a record breaks several rules, the reason reported is the first one in this order:
size/encoding/syntax, then ``src``, ``dst``, ``ts``, ``features``, ``label``, self loop.

Design (measured in ``benchmarks/decode.py``): every value is parsed *on its own* by
``pydantic_core.from_json`` (Rust, ~0.5 µs for a 50-byte event, no Python frame per record),
so one record can never leak into another: no joined JSON array, hence no "smuggling" of
extra records through values such as ``{..},{..}``. With ``edge_dim > 0`` the parse is a
pydantic ``TypeAdapter`` that also checks in Rust that features are numbers. Validation is then
column-wise: one C-level pass per field (``map``/``set``/numpy) screens the whole micro-batch.
Every record that fails or merely looks unusual in any screen (an int id, a missing field, a
long id, ...) is re-decoded by the per-record reference path (``_decode_json_one``,
``_decode_proto_one``), the authority on what is valid and why not. So the screens only have
to be conservative, and the per-record path costs nothing on clean batches. Protobuf features
are read as raw packed float32 bytes (see ``_proto_features``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter, eq
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from pydantic import StrictFloat, TypeAdapter
from pydantic_core import from_json
from typing_extensions import TypedDict

from tgnstream.core.events import MAX_ABS_EVENT_TIME_S
from tgnstream.core.idmap import MAX_ID_BYTES
from tgnstream.rpc.v1.event_pb2 import Event
from tgnstream.stream.config import StreamConfig

__all__ = ["DEFAULT_MAX_ABS_TS_S", "REASONS", "MAX_ID_BYTES", "Rejected", "DecodedBatch", "RecordDecoder"]

# Every reason code a rejection can carry. Stable, snake_case, bounded: used as a metric label.
REASONS: tuple[str, ...] = (
    "null_value",  # tombstone (value None)
    "oversized",  # value longer than max_record_bytes
    "invalid_utf8",  # JSON value is not UTF-8 text
    "invalid_json",  # not exactly one JSON value (syntax, trailing data, lone surrogate, depth)
    "not_an_object",  # valid JSON but not an object
    "missing_field",  # src, dst or ts absent (or features absent while edge_dim > 0)
    "bad_type",  # a field of the wrong JSON type (src is a list/bool/float, ts a string, ...)
    "empty_id",  # src or dst is ""
    "id_too_long",  # src or dst longer than MAX_ID_BYTES bytes of UTF-8
    "non_finite_ts",  # ts is NaN/Infinity (JSON literals included) or overflows a float64
    "ts_out_of_range",  # |ts| > max_abs_ts_s (milliseconds or microseconds sent as seconds, ...)
    "feature_length",  # len(features) != edge_dim
    "non_finite_feature",  # a feature is NaN/Infinity or overflows float32
    "bad_label",  # label is not an integer in the int64 range
    "self_loop",  # src == dst while self loops are not allowed
    "invalid_protobuf",  # protobuf encoding: the bytes are not an Event message
)
_MAX_DETAIL = 300
DEFAULT_MAX_ABS_TS_S = MAX_ABS_EVENT_TIME_S
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# A str id of at most this many characters cannot exceed MAX_ID_BYTES (<= 4 UTF-8 bytes/char),
# so the screen only re-checks longer ones precisely.
_SAFE_ID_CHARS = MAX_ID_BYTES // 4
_ENCODINGS = ("json", "protobuf")
_NoneType = type(None)


@dataclass(frozen=True)
class Rejected:
    """One input record that is not a valid event."""

    position: int  # index in the input list
    reason: str  # one of REASONS
    detail: str  # human-readable, at most 300 characters


@dataclass(frozen=True)
class DecodedBatch:
    """The valid events of one input list, in input order, plus the rejections."""

    src: list[str]
    dst: list[str]
    ts: np.ndarray  # float64 [n]
    features: np.ndarray  # float32 [n, edge_dim]
    labels: np.ndarray  # int64 [n], 0 when absent
    positions: np.ndarray  # int64 [n]: index of each valid event in the input list (increasing)
    rejected: list[Rejected]

    def __len__(self) -> int:
        return len(self.src)


class _Reject(Exception):
    """Internal: raised by the per-record path with the reason and a short detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail[:_MAX_DETAIL]


def _show(value: Any, limit: int = 60) -> str:
    """A short repr for details (bounded so a huge bad field cannot bloat a DLQ header)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for details."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# A decoded event as the per-record path returns it: (src, dst, ts, features, label).
_Decoded = tuple[str, str, float, np.ndarray, int]


class _FeaturesJson(TypedDict, total=False):
    """JSON parse-and-screen schema used when ``edge_dim > 0``: features must be numbers."""

    src: Any
    dst: Any
    ts: Any
    label: Any
    features: list[StrictFloat] | None


# Strict: a JSON bool or string among the features fails the parse (the record then goes to the
# reference path for its reason); ints are accepted as floats. Extra fields are dropped.
_FEATURES_JSON = TypeAdapter(_FeaturesJson)


def _raw_features_message() -> type:
    """A message reading field 4 of ``Event`` (packed ``repeated float features``) as bytes."""
    fdp = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="tgnstream/ingest/event_raw.proto", package="tgnstream.ingest.raw", syntax="proto3"
    )
    file.message_type.add(name="EventRaw").field.add(
        name="features", number=4, type=fdp.TYPE_BYTES, label=fdp.LABEL_OPTIONAL
    )
    pool = descriptor_pool.DescriptorPool()  # private pool: never clashes with generated code
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tgnstream.ingest.raw.EventRaw"))


_EventRaw = _raw_features_message()
_FEATURES_BYTES = attrgetter("features")


class RecordDecoder:
    """Turns a micro-batch of Kafka record values into columns of valid events + rejections.

    Args:
        edge_dim: edge feature width the engine expects (0: featureless).
        encoding: ``"json"`` (default) or ``"protobuf"`` (``tgnstream.rpc.v1.Event``).
        max_record_bytes: larger values are rejected unparsed (``oversized``).
        allow_self_loops: accept events with ``src == dst`` (compared after stringification).
        max_abs_ts_s: events with ``|ts|`` beyond this are rejected (``ts_out_of_range``): the
            default, 1e11 s (about year 5100), refuses Unix times sent in milliseconds or finer.
    """

    def __init__(
        self,
        edge_dim: int = 0,
        encoding: str = "json",
        max_record_bytes: int = 65536,
        allow_self_loops: bool = False,
        max_abs_ts_s: float = DEFAULT_MAX_ABS_TS_S,
    ):
        if edge_dim < 0:
            raise ValueError(f"edge_dim must be >= 0, got {edge_dim}")
        if encoding not in _ENCODINGS:
            raise ValueError(f"encoding must be one of {_ENCODINGS}, got {encoding!r}")
        if max_record_bytes <= 0:
            raise ValueError(f"max_record_bytes must be > 0, got {max_record_bytes}")
        self.edge_dim = int(edge_dim)
        self.encoding = encoding
        self.max_record_bytes = int(max_record_bytes)
        self.allow_self_loops = bool(allow_self_loops)
        if not (math.isfinite(max_abs_ts_s) and max_abs_ts_s > 0):
            raise ValueError(f"max_abs_ts_s must be a positive finite number, got {max_abs_ts_s}")
        self.max_abs_ts_s = float(max_abs_ts_s)
        self._zero_row = [0.0] * self.edge_dim  # placeholder for screened-out rows
        self._parse_json = from_json if self.edge_dim == 0 else _FEATURES_JSON.validate_json

    @classmethod
    def from_config(cls, config: StreamConfig, edge_dim: int) -> RecordDecoder:
        """The decoder every reader of a topic with these settings uses (same rejections)."""
        return cls(
            edge_dim=edge_dim,
            encoding=config.encoding,
            max_record_bytes=config.max_record_bytes,
            allow_self_loops=config.allow_self_loops,
            max_abs_ts_s=config.max_abs_ts_s,
        )

    # ------------------------------------------------------------------------ public API
    def decode(self, values: list[bytes | None]) -> DecodedBatch:
        """Decode ``values`` (one Kafka record value each, None for tombstones).

        Never raises for bad input: every record is either decoded or listed in ``rejected``
        with its position, a reason from ``REASONS`` and a short detail.
        """
        values = list(values)
        if not values:
            return self._empty()
        if self.encoding == "json":
            return self._decode_json(values)
        return self._decode_protobuf(values)

    def decode_one(self, value: bytes | None) -> _Decoded | Rejected:
        """Decode a single value with the per-record reference path (position 0 on rejection).

        Slow (a few µs); ``decode`` gives identical results in bulk. For tools and tests.
        """
        one = self._decode_json_one if self.encoding == "json" else self._decode_proto_one
        try:
            return one(value)
        except _Reject as r:
            return Rejected(0, r.reason, r.detail)

    # ------------------------------------------------------------------ JSON fast path
    def _decode_json(self, values: list[bytes | None]) -> DecodedBatch:
        suspects: set[int] = set()
        work = self._screen_raw(values, suspects)

        # With features, the parse also checks that they are arrays of numbers (in Rust, far
        # cheaper than a Python pass over every element); the other fields are checked below.
        objs = _parse_each(self._parse_json, work, suspects, None)
        if set(map(type, objs)) != {dict}:
            bad = [i for i, o in enumerate(objs) if type(o) is not dict]
            suspects.update(bad)
            for i in bad:
                objs[i] = {}
        get = dict.get
        src = self._screen_ids(list(map(get, objs, repeat("src"))), suspects)
        dst = self._screen_ids(list(map(get, objs, repeat("dst"))), suspects)
        ts = self._screen_ts(list(map(get, objs, repeat("ts"))), suspects)
        features = self._screen_features(list(map(get, objs, repeat("features"))), suspects)
        labels = self._screen_labels(list(map(get, objs, repeat("label"))), suspects)
        self._screen_self_loops(src, dst, suspects)
        return self._assemble(values, src, dst, ts, features, labels, suspects, self._decode_json_one)

    def _screen_raw(self, values: list[bytes | None], suspects: set[int]) -> list[bytes]:
        """Flag tombstones and oversized values; return values safe to hand to the parser."""
        work: list[Any] = values
        if values.count(None):
            bad = [i for i, v in enumerate(values) if v is None]
            suspects.update(bad)
            work = list(values)
            for i in bad:
                work[i] = b"null"
        if max(map(len, work)) > self.max_record_bytes:
            limit = self.max_record_bytes
            bad = [i for i, v in enumerate(work) if len(v) > limit]
            suspects.update(bad)
            work = list(work) if work is values else work
            for i in bad:
                work[i] = b"null"  # never parse a huge value: it is rejected unread
        return work

    def _screen_ids(self, col: list[Any], suspects: set[int]) -> list[Any]:
        """Flag ids that are not plain short non-empty strings; stringify valid int ids."""
        types = set(map(type, col))
        if types != {str}:
            if types - {str, int}:  # None (missing), bool, float, list, dict, ...
                bad = [i for i, x in enumerate(col) if type(x) is not str and type(x) is not int]
                suspects.update(bad)
                for i in bad:
                    col[i] = "?"
            if int in types:
                try:
                    col = [str(x) if type(x) is int else x for x in col]
                except ValueError:  # an int too long to print: the reference path decides
                    bad = [i for i, x in enumerate(col) if type(x) is int]
                    suspects.update(bad)
                    col = ["?" if type(x) is int else x for x in col]
        if "" in col:
            suspects.update(i for i, x in enumerate(col) if x == "")
        if max(map(len, col)) > _SAFE_ID_CHARS:
            suspects.update(i for i, x in enumerate(col) if len(x) > _SAFE_ID_CHARS)
        return col

    def _screen_ts(self, col: list[Any], suspects: set[int]) -> np.ndarray:
        """Flag non-numbers (bool and missing included) and non-finite times."""
        types = set(map(type, col))
        if not types <= {float, int}:
            bad = [i for i, x in enumerate(col) if type(x) is not float and type(x) is not int]
            suspects.update(bad)
            for i in bad:
                col[i] = 0.0
        try:
            ts = np.array(col, dtype=np.float64)
        except OverflowError:  # an int beyond float64: flag ints that do not convert
            for i, x in enumerate(col):
                if type(x) is int and not _float_ok(x):
                    suspects.add(i)
                    col[i] = 0.0
            ts = np.array(col, dtype=np.float64)
        self._screen_ts_range(ts, suspects)
        return ts

    def _screen_ts_range(self, ts: np.ndarray, suspects: set[int]) -> None:
        """Flag times that are not finite or beyond ``max_abs_ts_s`` (NaN compares False)."""
        ok = np.abs(ts) <= self.max_abs_ts_s
        if not ok.all():
            suspects.update(np.flatnonzero(~ok).tolist())

    def _screen_labels(self, col: list[Any], suspects: set[int]) -> np.ndarray:
        """Flag labels that are not ints in the int64 range; absent/null read as 0."""
        types = set(map(type, col))
        if types != {int}:
            if not types <= {int, _NoneType}:
                bad = [i for i, x in enumerate(col) if type(x) is not int and x is not None]
                suspects.update(bad)
                for i in bad:
                    col[i] = 0
            if _NoneType in types:
                col = [0 if x is None else x for x in col]
        try:
            return np.array(col, dtype=np.int64)
        except OverflowError:
            for i, x in enumerate(col):
                if not _INT64_MIN <= x <= _INT64_MAX:
                    suspects.add(i)
                    col[i] = 0
            return np.array(col, dtype=np.int64)

    def _screen_features(self, col: list[Any], suspects: set[int]) -> np.ndarray:
        """Flag feature lists that are absent, of the wrong length or not finite as float32.

        With ``edge_dim > 0`` the parser (``_FEATURES_JSON``) already guaranteed that every
        present ``features`` is a list of floats, so no element type check is needed here.
        """
        n, d = len(col), self.edge_dim
        if d == 0:
            if set(map(type, col)) != {_NoneType}:  # [] is fine; anything else is re-checked
                suspects.update(i for i, x in enumerate(col) if x is not None and x != [])
            return np.zeros((n, 0), dtype=np.float32)
        if set(map(type, col)) != {list}:
            bad = [i for i, x in enumerate(col) if type(x) is not list]
            suspects.update(bad)
            for i in bad:
                col[i] = self._zero_row
        if set(map(len, col)) != {d}:
            bad = [i for i, x in enumerate(col) if len(x) != d]
            suspects.update(bad)
            for i in bad:
                col[i] = self._zero_row
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is flagged below
            out = np.array(col, dtype=np.float32)
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            suspects.update(np.flatnonzero(~finite).tolist())
        return out

    def _screen_self_loops(self, src: list[str], dst: list[str], suspects: set[int]) -> None:
        if self.allow_self_loops:
            return
        same = list(map(eq, src, dst))
        if True in same:
            suspects.update(i for i, s in enumerate(same) if s)

    # ------------------------------------------------------------------ protobuf fast path
    def _decode_protobuf(self, values: list[bytes | None]) -> DecodedBatch:
        n, d = len(values), self.edge_dim
        suspects: set[int] = set()
        work = self._screen_raw(values, suspects)
        events = _parse_each(Event.FromString, work, suspects, Event())
        src = self._screen_ids(list(map(attrgetter("src"), events)), suspects)
        dst = self._screen_ids(list(map(attrgetter("dst"), events)), suspects)
        ts = np.fromiter(map(attrgetter("ts"), events), dtype=np.float64, count=n)
        self._screen_ts_range(ts, suspects)
        feats = list(map(attrgetter("features"), events))
        if set(map(len, feats)) != {d}:
            suspects.update(i for i, f in enumerate(feats) if len(f) != d)
            feats = [f if len(f) == d else self._zero_row for f in feats]
        if d:
            features = self._proto_features(work, feats, suspects)
            finite = np.isfinite(features).all(axis=1)
            if not finite.all():
                suspects.update(np.flatnonzero(~finite).tolist())
        else:
            features = np.zeros((n, 0), dtype=np.float32)
        # proto3 `optional int32 label`: reads as 0 when absent, always in range.
        labels = np.fromiter(map(attrgetter("label"), events), dtype=np.int64, count=n)
        self._screen_self_loops(src, dst, suspects)
        return self._assemble(values, src, dst, ts, features, labels, suspects, self._decode_proto_one)

    def _proto_features(self, work: list[bytes], feats: list[Any], suspects: set[int]) -> np.ndarray:
        """``[n, d]`` float32 features of protobuf events whose ``len(features) == d``.

        Reading a repeated float field element by element creates a Python float per value
        (~40 ns each: 7 µs for 172 features). Instead the values are re-parsed with
        ``_EventRaw``, which sees field 4 as ``bytes``: for the usual packed encoding that is
        the little-endian float32 array itself. Exact only when the last packed chunk holds all
        ``d`` values (its length is 4d and the real count is d); otherwise (unpacked or split
        encodings, legal but rare) the batch falls back to the element-wise read.
        """
        n, d = len(feats), self.edge_dim
        try:
            raw = [b"" if i in suspects else v for i, v in enumerate(work)] if suspects else work
            chunks = list(map(_FEATURES_BYTES, map(_EventRaw.FromString, raw)))
        except Exception:  # the real parse accepted it; be safe and read element-wise
            chunks = None
        if chunks is not None:
            size = 4 * d
            if suspects:
                zero = bytes(size)
                chunks = [zero if i in suspects else c for i, c in enumerate(chunks)]
            if set(map(len, chunks)) == {size}:
                return np.frombuffer(b"".join(chunks), dtype="<f4").reshape(n, d).astype(np.float32)
        flat = np.fromiter(chain.from_iterable(feats), dtype=np.float32, count=n * d)
        return flat.reshape(n, d)

    # ------------------------------------------------------------------ assembly
    def _assemble(self, values, src, dst, ts, features, labels, suspects, decode_one) -> DecodedBatch:
        """Re-decode the suspects with the reference path and keep every valid row in order."""
        n = len(values)
        if not suspects:
            return DecodedBatch(src, dst, ts, features, labels, np.arange(n, dtype=np.int64), [])
        rejected: list[Rejected] = []
        keep = np.ones(n, dtype=bool)
        for i in sorted(suspects):
            try:
                s, t_dst, t, f, label = decode_one(values[i])
            except _Reject as r:
                rejected.append(Rejected(i, r.reason, r.detail))
                keep[i] = False
                continue
            src[i], dst[i], ts[i], features[i], labels[i] = s, t_dst, t, f, label
        positions = np.flatnonzero(keep).astype(np.int64)
        if len(rejected):
            idx = positions.tolist()
            src = [src[i] for i in idx]
            dst = [dst[i] for i in idx]
            ts, features, labels = ts[positions], features[positions], labels[positions]
        return DecodedBatch(src, dst, ts, features, labels, positions, rejected)

    def _empty(self) -> DecodedBatch:
        return DecodedBatch(
            [],
            [],
            np.zeros(0, dtype=np.float64),
            np.zeros((0, self.edge_dim), dtype=np.float32),
            np.zeros(0, dtype=np.int64),
            np.zeros(0, dtype=np.int64),
            [],
        )

    # ------------------------------------------------------------------ reference path
    def _check_raw(self, value: bytes | None) -> bytes:
        if value is None:
            raise _Reject("null_value", "record value is null (tombstone)")
        if len(value) > self.max_record_bytes:
            limit = self.max_record_bytes
            raise _Reject("oversized", f"value is {len(value)} bytes, more than max_record_bytes={limit}")
        return value

    def _decode_json_one(self, value: bytes | None) -> _Decoded:
        """Reference decoder of one JSON value; raises ``_Reject``. Authority over the screens."""
        raw = self._check_raw(value)
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            bad = e.object[e.start]
            raise _Reject("invalid_utf8", f"byte {bad:#04x} at offset {e.start} is not valid UTF-8") from None
        try:
            obj = from_json(text)
        except ValueError as e:
            raise _Reject("invalid_json", str(e)) from None
        if type(obj) is not dict:
            raise _Reject("not_an_object", f"expected a JSON object, got {_json_type(obj)}")
        return self._validate(obj)

    def _decode_proto_one(self, value: bytes | None) -> _Decoded:
        """Reference decoder of one protobuf ``Event``; raises ``_Reject``."""
        raw = self._check_raw(value)
        try:
            ev = Event.FromString(raw)
        except Exception as e:  # google.protobuf.message.DecodeError, or whatever upb raises
            raise _Reject("invalid_protobuf", f"not a tgnstream.rpc.v1.Event: {e}") from None
        return self._validate(
            {"src": ev.src, "dst": ev.dst, "ts": ev.ts, "features": list(ev.features), "label": ev.label}
        )

    def _validate(self, obj: dict) -> _Decoded:
        """Check one parsed event object field by field, in the documented order."""
        src = _check_id(obj, "src")
        dst = _check_id(obj, "dst")
        ts = _check_ts(obj, self.max_abs_ts_s)
        features = self._check_features(obj)
        label = _check_label(obj)
        if src == dst and not self.allow_self_loops:
            raise _Reject("self_loop", f"src == dst == {_show(src)} and self loops are not allowed")
        return src, dst, ts, features, label

    def _check_features(self, obj: dict) -> np.ndarray:
        d = self.edge_dim
        feats = obj.get("features")
        if feats is None:
            if d == 0:
                return np.zeros(0, dtype=np.float32)
            raise _Reject("missing_field", f"features is required: edge_dim is {d}")
        if type(feats) is not list:
            raise _Reject("bad_type", f"features must be an array of numbers, got {_json_type(feats)}")
        if len(feats) != d:
            raise _Reject("feature_length", f"features has {len(feats)} values, expected edge_dim={d}")
        for k, x in enumerate(feats):
            if type(x) is not float and type(x) is not int:
                raise _Reject("bad_type", f"features[{k}] must be a number, got {_json_type(x)} {_show(x)}")
        for k, x in enumerate(feats):
            if not _float_ok(x):
                raise _Reject("non_finite_feature", f"features[{k}] is an integer too large for a float")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported below
            row = np.array(feats, dtype=np.float64).astype(np.float32)
        finite = np.isfinite(row)
        if not finite.all():
            k = int(np.flatnonzero(~finite)[0])
            raise _Reject("non_finite_feature", f"features[{k}] = {_show(feats[k])} is not finite as float32")
        return row


def _parse_each(
    parse: Callable[[bytes], Any], work: list[bytes], suspects: set[int], placeholder: Any
) -> list:
    """``[parse(v) for v in work]`` without a Python frame per value; failures become suspects.

    ``list.extend`` keeps what it appended before an exception, so ``len(out)`` is the index of
    the value that failed, and the ``map`` iterator resumes at the next one. Each value is
    parsed on its own, so no value can affect how another is read.
    """
    out: list[Any] = []
    parsed = map(parse, work)
    while True:
        try:
            out.extend(parsed)
            break
        except Exception:  # ValueError (JSON, ValidationError), DecodeError: classified later
            suspects.add(len(out))
            out.append(placeholder)
    if len(out) != len(work):  # would mean misaligned positions: never risk it silently
        raise RuntimeError(f"internal error: parsed {len(out)} values for {len(work)} records")
    return out


def _float_ok(x: float | int) -> bool:
    """True when ``x`` converts to a float64 (huge ints overflow)."""
    try:
        float(x)
    except OverflowError:
        return False
    return True


def _check_id(obj: dict, name: str) -> str:
    if name not in obj:
        raise _Reject("missing_field", f"{name} is required")
    x = obj[name]
    if type(x) is int:
        try:
            x = str(x)
        except ValueError:  # more digits than Python prints (sys.get_int_max_str_digits)
            raise _Reject("id_too_long", f"{name} is an integer with too many digits") from None
    elif type(x) is not str:
        raise _Reject("bad_type", f"{name} must be a string or an integer, got {_json_type(x)} {_show(x)}")
    if not x:
        raise _Reject("empty_id", f"{name} is an empty string")
    size = len(x.encode("utf-8"))
    if size > MAX_ID_BYTES:
        raise _Reject("id_too_long", f"{name} is {size} bytes of UTF-8, more than {MAX_ID_BYTES}")
    return x


def _check_ts(obj: dict, max_abs: float) -> float:
    if "ts" not in obj:
        raise _Reject("missing_field", "ts is required")
    x = obj["ts"]
    if type(x) is not float and type(x) is not int:
        raise _Reject("bad_type", f"ts must be a number (seconds), got {_json_type(x)} {_show(x)}")
    if not _float_ok(x):
        raise _Reject("non_finite_ts", "ts is an integer too large for a float64")
    t = float(x)
    if not math.isfinite(t):
        raise _Reject("non_finite_ts", f"ts must be finite, got {t!r}")
    if abs(t) > max_abs:
        raise _Reject(
            "ts_out_of_range",
            f"ts {t!r} is beyond ±{max_abs:g} s (ts must be in seconds: milliseconds or finer?)",
        )
    return t


def _check_label(obj: dict) -> int:
    x = obj.get("label")
    if x is None:
        return 0
    if type(x) is not int:
        raise _Reject("bad_label", f"label must be an integer, got {_json_type(x)} {_show(x)}")
    if not _INT64_MIN <= x <= _INT64_MAX:
        raise _Reject("bad_label", f"label {_show(x)} is outside the int64 range")
    return x
