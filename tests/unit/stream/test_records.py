"""RecordDecoder: every rejection reason, interleaved batches against hand-written expectations,
protobuf, record smuggling, and random mixes against a naive per-record reference decoder."""

from __future__ import annotations

import json
import math
import random
import re
import struct

import numpy as np
import pytest

from tgnstream.apps.replay import encode_event
from tgnstream.rpc.v1.event_pb2 import Event
from tgnstream.stream.records import MAX_ID_BYTES, REASONS, DecodedBatch, RecordDecoder, Rejected

OK = b'{"src":"u1","dst":"p1","ts":10.5}'  # a valid neighbour for the single-bad-record cases


def check_shapes(out: DecodedBatch, edge_dim: int) -> None:
    n = len(out.src)
    assert len(out.dst) == n and all(type(s) is str for s in out.src + out.dst)
    assert out.ts.dtype == np.float64 and out.ts.shape == (n,)
    assert out.features.dtype == np.float32 and out.features.shape == (n, edge_dim)
    assert out.labels.dtype == np.int64 and out.labels.shape == (n,)
    assert out.positions.dtype == np.int64 and out.positions.shape == (n,)
    assert np.all(np.diff(out.positions) > 0)
    for r in out.rejected:
        assert r.reason in REASONS and 0 < len(r.detail) <= 300


def test_reasons_are_stable_bounded_labels():
    assert len(set(REASONS)) == len(REASONS)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", r) for r in REASONS)
    required = {
        "null_value", "oversized", "invalid_utf8", "invalid_json", "not_an_object", "missing_field",
        "bad_type", "empty_id", "id_too_long", "non_finite_ts", "ts_out_of_range",
        "feature_length", "non_finite_feature",
        "bad_label", "self_loop", "invalid_protobuf",
    }  # fmt: skip
    assert required <= set(REASONS)


# (decoder kwargs, bad value, expected reason): one concrete record per way of being wrong.
BAD_CASES = [
    ({}, None, "null_value"),
    ({"max_record_bytes": 64}, b'{"src":"a","dst":"b","ts":1,"pad":"' + b"x" * 64 + b'"}', "oversized"),
    ({}, b'{"src":"\xff\xfe","dst":"b","ts":1}', "invalid_utf8"),
    ({}, b'{"src":"a","dst":"b","ts":1', "invalid_json"),
    ({}, b'{"src":"a","dst":"b","ts":1} {"src":"c"}', "invalid_json"),
    ({}, b"", "invalid_json"),
    ({}, b'{"src":"a","dst":"b","ts":01}', "invalid_json"),
    ({}, b'{"src":"\\ud800","dst":"b","ts":1}', "invalid_json"),  # lone surrogate: not Unicode
    ({}, b"\xef\xbb\xbf" + OK, "invalid_json"),  # BOM
    ({}, b"[1,2,3]", "not_an_object"),
    ({}, b'"u1"', "not_an_object"),
    ({}, b"null", "not_an_object"),
    ({}, b'{"dst":"b","ts":1}', "missing_field"),
    ({}, b'{"src":"a","ts":1}', "missing_field"),
    ({}, b'{"src":"a","dst":"b"}', "missing_field"),
    ({"edge_dim": 2}, b'{"src":"a","dst":"b","ts":1}', "missing_field"),
    ({}, b'{"src":["a"],"dst":"b","ts":1}', "bad_type"),
    ({}, b'{"src":true,"dst":"b","ts":1}', "bad_type"),
    ({}, b'{"src":"a","dst":1.5,"ts":1}', "bad_type"),
    ({}, b'{"src":null,"dst":"b","ts":1}', "bad_type"),
    ({}, b'{"src":"a","dst":"b","ts":"1700000000"}', "bad_type"),
    ({}, b'{"src":"a","dst":"b","ts":false}', "bad_type"),
    ({"edge_dim": 2}, b'{"src":"a","dst":"b","ts":1,"features":"1,2"}', "bad_type"),
    ({"edge_dim": 2}, b'{"src":"a","dst":"b","ts":1,"features":[1.0,"2"]}', "bad_type"),
    ({"edge_dim": 2}, b'{"src":"a","dst":"b","ts":1,"features":[1.0,true]}', "bad_type"),
    ({"edge_dim": 2}, b'{"src":"a","dst":"b","ts":1,"features":[1.0,[2]]}', "bad_type"),
    ({}, b'{"src":"","dst":"b","ts":1}', "empty_id"),
    ({}, b'{"src":"a","dst":"","ts":1}', "empty_id"),
    ({}, ('{"src":"' + "x" * (MAX_ID_BYTES + 1) + '","dst":"b","ts":1}').encode(), "id_too_long"),
    ({}, ('{"src":"a","dst":"' + "é" * (MAX_ID_BYTES // 2 + 1) + '","ts":1}').encode(), "id_too_long"),
    ({}, b'{"src":' + b"9" * (MAX_ID_BYTES + 1) + b',"dst":"b","ts":1}', "id_too_long"),
    ({}, b'{"src":"a","dst":"b","ts":NaN}', "non_finite_ts"),
    ({}, b'{"src":"a","dst":"b","ts":Infinity}', "non_finite_ts"),
    ({}, b'{"src":"a","dst":"b","ts":-Infinity}', "non_finite_ts"),
    ({}, b'{"src":"a","dst":"b","ts":1e400}', "non_finite_ts"),
    ({}, b'{"src":"a","dst":"b","ts":1' + b"0" * 400 + b"}", "non_finite_ts"),
    ({}, b'{"src":"a","dst":"b","ts":1e300}', "ts_out_of_range"),
    ({}, b'{"src":"a","dst":"b","ts":1732968000123}', "ts_out_of_range"),  # Unix milliseconds
    ({}, b'{"src":"a","dst":"b","ts":-100000000001}', "ts_out_of_range"),
    ({"max_abs_ts_s": 11.0}, b'{"src":"a","dst":"b","ts":-11.5}', "ts_out_of_range"),
    ({"edge_dim": 2}, b'{"src":"a","dst":"b","ts":1,"features":[1.0,2.0,3.0]}', "feature_length"),
    ({"edge_dim": 2}, b'{"src":"a","dst":"b","ts":1,"features":[]}', "feature_length"),
    ({}, b'{"src":"a","dst":"b","ts":1,"features":[0.5]}', "feature_length"),
    ({"edge_dim": 2}, b'{"src":"a","dst":"b","ts":1,"features":[NaN,1]}', "non_finite_feature"),
    ({"edge_dim": 2}, b'{"src":"a","dst":"b","ts":1,"features":[1,-Infinity]}', "non_finite_feature"),
    ({"edge_dim": 2}, b'{"src":"a","dst":"b","ts":1,"features":[1e39,0]}', "non_finite_feature"),
    ({}, b'{"src":"a","dst":"b","ts":1,"label":1.5}', "bad_label"),
    ({}, b'{"src":"a","dst":"b","ts":1,"label":true}', "bad_label"),
    ({}, b'{"src":"a","dst":"b","ts":1,"label":"1"}', "bad_label"),
    ({}, b'{"src":"a","dst":"b","ts":1,"label":9223372036854775808}', "bad_label"),
    ({}, b'{"src":"a","dst":"a","ts":1}', "self_loop"),
    ({}, b'{"src":5,"dst":"5","ts":1}', "self_loop"),
    ({"encoding": "protobuf"}, b"\xff\xff\xff\xff", "invalid_protobuf"),
    ({"encoding": "protobuf"}, encode_event("a", "b", 1e300, 0, None, "protobuf"), "ts_out_of_range"),
    ({"encoding": "protobuf"}, b'{"src":"a","dst":"b","ts":1}', "invalid_protobuf"),
]


def _valid_for(kwargs: dict) -> bytes:
    d = kwargs.get("edge_dim", 0)
    return encode_event("u1", "p1", 10.5, 1, [0.25] * d if d else None, kwargs.get("encoding", "json"))


@pytest.mark.parametrize(("kwargs", "bad", "reason"), BAD_CASES)
def test_each_reason_between_valid_records(kwargs, bad, reason):
    dec = RecordDecoder(**kwargs)
    ok = _valid_for(kwargs)
    out = dec.decode([ok, bad, ok])
    check_shapes(out, dec.edge_dim)
    assert out.positions.tolist() == [0, 2]
    assert out.src == ["u1", "u1"] and out.dst == ["p1", "p1"]
    assert out.ts.tolist() == [10.5, 10.5] and out.labels.tolist() == [1, 1]
    assert len(out.rejected) == 1
    rej = out.rejected[0]
    assert (rej.position, rej.reason) == (1, reason), rej.detail
    # The per-record reference path agrees with the batch path.
    single = dec.decode_one(bad)
    assert isinstance(single, Rejected) and single.reason == reason


def test_every_reason_is_exercised():
    assert {reason for _, _, reason in BAD_CASES} == set(REASONS)


def test_id_at_the_byte_limit_is_accepted():
    name = "é" * (MAX_ID_BYTES // 2)  # exactly MAX_ID_BYTES bytes, 256 characters
    out = RecordDecoder().decode([encode_event(name, "p", 1.0)])
    assert out.src == [name] and not out.rejected


def test_details_name_the_problem_and_stay_short():
    dec = RecordDecoder(edge_dim=2)
    out = dec.decode(
        [
            b'{"src":"a","dst":"b","ts":NaN,"features":[1,2]}',
            b'{"src":"a","dst":"b","ts":1,"features":[1,2,3]}',
            b'{"src":' + json.dumps(["x" * 5000]).encode() + b',"dst":"b","ts":1,"features":[1,2]}',
        ]
    )
    details = [r.detail for r in out.rejected]
    assert "finite" in details[0] and "nan" in details[0].lower()
    assert "3" in details[1] and "2" in details[1]
    assert all(len(d) <= 300 for d in details)


def test_ten_kinds_of_malformed_records_interleaved_with_valid_ones():
    dec = RecordDecoder(edge_dim=2)
    values: list[bytes | None] = [
        b'{"src":"user-17","dst":"page-42","ts":1700000000.25,"features":[0.5,-1],"label":1}',  # 0 ok
        None,  # 1 null_value
        b'{"src":"user-1","dst":"page-1","ts":1,"features":[1,2]',  # 2 invalid_json
        b'{"dst":"page-9","ts":3.0,"features":[1,2]}',  # 3 missing_field
        b'  {"label":0,"ts":5,"dst":"page-7","src":17,"features":[3,4.5],"extra":{"x":[1]}}\n',  # 4 ok
        b'{"src":"user-2","dst":"page-2","ts":NaN,"features":[1,2]}',  # 5 non_finite_ts
        b'{"src":"user-3","dst":"page-3","ts":7,"features":[1,2,3]}',  # 6 feature_length
        b'{"src":"","dst":"page-4","ts":7,"features":[1,2]}',  # 7 empty_id
        b'{"src":"user-5","dst":"user-5","ts":8,"features":[1,2]}',  # 8 self_loop
        b'{"src":"user-6","dst":"page-6","ts":9,"features":[1,"x"]}',  # 9 bad_type
        b"[]",  # 10 not_an_object
        b'{"src":"user-7","dst":"page-7","ts":9,"features":[1,2],"label":0.5}',  # 11 bad_label
        b'{"src":"\xc3\x28","dst":"p","ts":1,"features":[1,2]}',  # 12 invalid_utf8
        b'{"src":"user-8","dst":"page-8","ts":9,"features":[1e300,2]}',  # 13 non_finite_feature
        b'{"src":"caf\xc3\xa9","dst":"page-\\u00e9","ts":-2.5,"features":[1e-3,0],"label":null}',  # 14 ok
    ]
    out = dec.decode(values)
    check_shapes(out, 2)
    assert out.positions.tolist() == [0, 4, 14]
    assert out.src == ["user-17", "17", "café"]
    assert out.dst == ["page-42", "page-7", "page-é"]
    assert out.ts.tolist() == [1700000000.25, 5.0, -2.5]
    np.testing.assert_array_equal(out.features, np.array([[0.5, -1], [3, 4.5], [1e-3, 0]], dtype=np.float32))
    assert out.labels.tolist() == [1, 0, 0]
    assert [(r.position, r.reason) for r in out.rejected] == [
        (1, "null_value"),
        (2, "invalid_json"),
        (3, "missing_field"),
        (5, "non_finite_ts"),
        (6, "feature_length"),
        (7, "empty_id"),
        (8, "self_loop"),
        (9, "bad_type"),
        (10, "not_an_object"),
        (11, "bad_label"),
        (12, "invalid_utf8"),
        (13, "non_finite_feature"),
    ]


def test_int_ids_are_stringified_and_floats_are_not_ids():
    out = RecordDecoder().decode(
        [
            b'{"src":17,"dst":-3,"ts":1}',
            b'{"src":12345678901234567890123,"dst":"x","ts":2}',
            b'{"src":17.0,"dst":"x","ts":3}',
            b'{"src":0,"dst":"0x","ts":4}',
        ]
    )
    assert out.src == ["17", "12345678901234567890123", "0"]
    assert out.dst == ["-3", "x", "0x"]
    assert [(r.position, r.reason) for r in out.rejected] == [(2, "bad_type")]


def test_int_times_and_labels_and_defaults():
    out = RecordDecoder().decode(
        [
            b'{"src":"a","dst":"b","ts":1700000000}',
            b'{"src":"a","dst":"b","ts":-0.0,"label":-7}',
            b'{"src":"a","dst":"b","ts":1e-300,"label":null,"features":null}',
            b'{"src":"a","dst":"b","ts":2,"features":[]}',
        ]
    )
    assert not out.rejected
    assert out.ts.tolist() == [1700000000.0, -0.0, 1e-300, 2.0]
    assert out.labels.tolist() == [0, -7, 0, 0]
    assert out.features.shape == (4, 0)


def test_features_decoded_to_float32():
    feats = [[0.1, -2, 3.4e38], [1e-45, 0, -0.0]]
    values = [encode_event("a", "b", 1.0, 0, None) for _ in feats]
    values = [v[:-1] + b',"features":' + json.dumps(f).encode() + b"}" for v, f in zip(values, feats)]
    out = RecordDecoder(edge_dim=3).decode(values)
    assert not out.rejected
    np.testing.assert_array_equal(out.features, np.array(feats, dtype=np.float64).astype(np.float32))


def test_allow_self_loops():
    out = RecordDecoder(allow_self_loops=True).decode([b'{"src":"a","dst":"a","ts":1}'])
    assert out.src == ["a"] and out.dst == ["a"] and not out.rejected


def test_empty_and_all_bad_batches():
    dec = RecordDecoder(edge_dim=4)
    empty = dec.decode([])
    check_shapes(empty, 4)
    assert len(empty) == 0 and not empty.rejected
    bad = dec.decode([None, b"{", b"[]"])
    check_shapes(bad, 4)
    assert len(bad) == 0 and [r.position for r in bad.rejected] == [0, 1, 2]


def test_constructor_rejects_bad_config():
    with pytest.raises(ValueError, match="encoding"):
        RecordDecoder(encoding="avro")
    with pytest.raises(ValueError, match="edge_dim"):
        RecordDecoder(edge_dim=-1)
    with pytest.raises(ValueError, match="max_record_bytes"):
        RecordDecoder(max_record_bytes=0)


# ------------------------------------------------------------------------------ smuggling
def test_a_value_cannot_smuggle_extra_records_into_the_batch():
    two_in_one = b'{"src":"a","dst":"b","ts":1},{"src":"c","dst":"d","ts":2}'
    # Two halves that together would form one valid object if the batch were a joined array.
    opens = b'{"src":"x","dst":"y","ts":1,"z":[1'
    closes = b"2]}"
    closes_array = b'{"src":"e","dst":"f","ts":3}]'
    inner = json.dumps({"src": '"},{"src":"evil","dst":"x","ts":1},{"a":"', "dst": "b", "ts": 4}).encode()
    values = [OK, two_in_one, opens, closes, closes_array, OK, inner]
    out = RecordDecoder().decode(values)
    assert out.positions.tolist() == [0, 5, 6]
    assert out.src == ["u1", "u1", '"},{"src":"evil","dst":"x","ts":1},{"a":"']
    assert [(r.position, r.reason) for r in out.rejected] == [
        (1, "invalid_json"),
        (2, "invalid_json"),
        (3, "invalid_json"),
        (4, "invalid_json"),
    ]


# ------------------------------------------------------------------------------ protobuf
def test_protobuf_round_trip_with_features():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((50, 5)).astype(np.float32)
    values = [encode_event(f"s{i}", f"d{i}", 0.5 * i, i % 3, feats[i], "protobuf") for i in range(50)]
    values[7] = Event(src="s7", dst="d7", ts=3.5, features=feats[7]).SerializeToString()  # no label
    out = RecordDecoder(edge_dim=5, encoding="protobuf").decode(values)
    check_shapes(out, 5)
    assert not out.rejected
    assert out.src == [f"s{i}" for i in range(50)] and out.dst == [f"d{i}" for i in range(50)]
    assert out.ts.tolist() == [0.5 * i for i in range(50)]
    assert out.labels.tolist() == [0 if i == 7 else i % 3 for i in range(50)]
    np.testing.assert_array_equal(out.features, feats)


def test_protobuf_unusual_but_legal_feature_encodings():
    head = Event(src="a", dst="b", ts=1.0).SerializeToString()
    unpacked = head + b"".join(b"\x25" + struct.pack("<f", x) for x in (1.0, 2.0, 3.0))
    split = head + Event(features=[4.0]).SerializeToString() + Event(features=[5.0, 6.0]).SerializeToString()
    split_wrong = head + Event(features=[1.0, 2.0, 3.0]).SerializeToString() * 2  # 6 values
    packed = encode_event("a", "b", 1.0, 0, [7.0, 8.0, 9.0], "protobuf")
    out = RecordDecoder(edge_dim=3, encoding="protobuf").decode([packed, unpacked, split, split_wrong])
    assert out.positions.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(out.features, np.array([[7, 8, 9], [1, 2, 3], [4, 5, 6]], dtype=np.float32))
    assert [(r.position, r.reason) for r in out.rejected] == [(3, "feature_length")]


def test_protobuf_rejections():
    dec = RecordDecoder(edge_dim=1, encoding="protobuf")
    values = [
        Event(src="a", dst="b", ts=1, features=[1]).SerializeToString(),
        Event(dst="b", ts=1, features=[1]).SerializeToString(),  # src absent reads as ""
        Event(src="a", dst="b", ts=float("nan"), features=[1]).SerializeToString(),
        Event(src="a", dst="b", ts=1, features=[float("inf")]).SerializeToString(),
        Event(src="a", dst="b", ts=1).SerializeToString(),
        Event(src="a", dst="a", ts=1, features=[1]).SerializeToString(),
        Event(src="x" * 600, dst="b", ts=1, features=[1]).SerializeToString(),
        None,
        b"\x0a\x05ab",  # truncated length-delimited field
        b"\x0a\x02\xff\xfe\x12\x01b\x19" + struct.pack("<d", 1.0),  # src is not UTF-8
    ]
    out = dec.decode(values)
    check_shapes(out, 1)
    assert out.positions.tolist() == [0]
    assert [(r.position, r.reason) for r in out.rejected] == [
        (1, "empty_id"),
        (2, "non_finite_ts"),
        (3, "non_finite_feature"),
        (4, "feature_length"),
        (5, "self_loop"),
        (6, "id_too_long"),
        (7, "null_value"),
        (8, "invalid_protobuf"),
        (9, "invalid_protobuf"),
    ]


# ------------------------------------------------------------------------------ property test
class RefReject(Exception):
    pass


def reference_decode(value, edge_dim, max_bytes=65536, allow_self_loops=False):
    """Naive, obviously-correct reading of the contract: json.loads and a chain of if-checks.

    Returns (src, dst, ts, features as float32 list, label) or raises RefReject(reason).
    Precedence: raw/syntax, src, dst, ts, features, label, self loop.
    """
    if value is None:
        raise RefReject("null_value")
    if len(value) > max_bytes:
        raise RefReject("oversized")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise RefReject("invalid_utf8") from None
    try:
        obj = json.loads(text)
    except ValueError:
        raise RefReject("invalid_json") from None
    if _has_lone_surrogate(obj):  # json accepts "\ud800"; it is not Unicode text
        raise RefReject("invalid_json")
    if not isinstance(obj, dict):
        raise RefReject("not_an_object")
    ids = []
    for name in ("src", "dst"):
        if name not in obj:
            raise RefReject("missing_field")
        x = obj[name]
        if isinstance(x, bool) or not isinstance(x, (str, int)):
            raise RefReject("bad_type")
        x = str(x)
        if x == "":
            raise RefReject("empty_id")
        if len(x.encode("utf-8")) > 512:
            raise RefReject("id_too_long")
        ids.append(x)
    if "ts" not in obj:
        raise RefReject("missing_field")
    ts = obj["ts"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise RefReject("bad_type")
    try:
        ts = float(ts)
    except OverflowError:
        raise RefReject("non_finite_ts") from None
    if math.isnan(ts) or math.isinf(ts):
        raise RefReject("non_finite_ts")
    if abs(ts) > 1e11:
        raise RefReject("ts_out_of_range")
    feats = obj.get("features")
    if feats is None:
        if edge_dim != 0:
            raise RefReject("missing_field")
        feats = []
    if not isinstance(feats, list):
        raise RefReject("bad_type")
    if len(feats) != edge_dim:
        raise RefReject("feature_length")
    for x in feats:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise RefReject("bad_type")
    out_feats = []
    for x in feats:
        try:
            f = struct.unpack("<f", struct.pack("<f", float(x)))[0]  # float32 rounding
        except (OverflowError, struct.error):
            raise RefReject("non_finite_feature") from None
        if math.isnan(f) or math.isinf(f):
            raise RefReject("non_finite_feature")
        out_feats.append(f)
    label = obj.get("label")
    if label is None:
        label = 0
    if isinstance(label, bool) or not isinstance(label, int) or not -(2**63) <= label < 2**63:
        raise RefReject("bad_label")
    if ids[0] == ids[1] and not allow_self_loops:
        raise RefReject("self_loop")
    return ids[0], ids[1], ts, out_feats, label


def _has_lone_surrogate(obj) -> bool:
    if isinstance(obj, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in obj)
    if isinstance(obj, list):
        return any(_has_lone_surrogate(x) for x in obj)
    if isinstance(obj, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in obj.items())
    return False


def random_value(rng: random.Random, edge_dim: int) -> bytes | None:
    """A random record: mostly valid with varied spellings, often broken in one of many ways."""
    ids = ["u1", "p1", "user-17", "page-42", "é", "日本", "a b", 'q"uote', "x" * 130, "y" * 600, "", "0"]
    obj: dict = {
        "src": rng.choice(ids + [17, -4, 0, 2**70]),
        "dst": rng.choice(ids + [18, 10**600]),
        "ts": rng.choice([0, 1, 1700000000.25, -3.5, 1e-310, 2**60, rng.uniform(-1e9, 1e9), 1e308]),
    }
    if edge_dim or rng.random() < 0.2:
        n = edge_dim if rng.random() < 0.85 else rng.choice([0, 1, edge_dim + 1])
        obj["features"] = [rng.choice([0, 1, -2.5, 1e-40, 3.4e38, rng.gauss(0, 1)]) for _ in range(n)]
        if n and rng.random() < 0.03:
            obj["features"][-1] = rng.choice([3.5e38, -1e39])  # finite float64, not float32
    if rng.random() < 0.7:
        obj["label"] = rng.choice([0, 1, None, -5, 2**62])
    if rng.random() < 0.2:
        obj["extra"] = {"nested": [1, {"x": None}]}
    r = rng.random()
    if r < 0.55:  # leave it as is (valid unless an id/feature choice above is bad)
        pass
    elif r < 0.60:
        obj.pop(rng.choice(["src", "dst", "ts", "features"]), None)
    elif r < 0.70:
        key = rng.choice(["src", "dst", "ts", "label", "features"])
        obj[key] = rng.choice([True, False, None, [], {}, "1", 1.5, [1, 2]])
    elif r < 0.74 and obj.get("features"):
        obj["features"][rng.randrange(len(obj["features"]))] = rng.choice([True, "1", None, [1.0]])
    elif r < 0.78:
        obj["dst"] = obj["src"]
    elif r < 0.84:
        special = rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 330])
        key = rng.choice(["ts", "features"])
        text = json.dumps(obj, separators=(",", ":"))
        if key == "ts":
            text = re.sub(r'"ts":[^,}]+', '"ts":' + special, text)
        elif obj.get("features"):
            text = re.sub(r'"features":\[[^,\]]+', '"features":[' + special, text, count=1)
        return text.encode()
    elif r < 0.92:
        text = json.dumps(obj, separators=(",", ":"))
        broken = [
            text[:-1],
            text + ",",
            text + text,
            "[" + text + "]",
            text.replace(":", "=", 1),
            '"' + text,
            text[: len(text) // 2],
            text + "]",
            "{" + text,
        ]
        return rng.choice(broken).encode()
    elif r < 0.95:
        return rng.choice([None, b"", b"\xff" + b"{}", b"null", b"42", b'"s"', b"[{}]", b'{"src":"\\udc00"}'])
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.1:
        text = " \n" + text + "\t"
    return text.encode()


@pytest.mark.parametrize("edge_dim", [0, 3])
@pytest.mark.parametrize("seed", range(6))
def test_random_batches_agree_with_naive_reference(seed, edge_dim):
    rng = random.Random(seed * 100 + edge_dim)
    dec = RecordDecoder(edge_dim=edge_dim, max_record_bytes=900)
    for _ in range(8):
        values = [random_value(rng, edge_dim) for _ in range(rng.randint(1, 250))]
        out = dec.decode(values)
        check_shapes(out, edge_dim)
        expected_ok, expected_bad = [], []
        for i, v in enumerate(values):
            try:
                expected_ok.append((i, reference_decode(v, edge_dim, max_bytes=900)))
            except RefReject as r:
                expected_bad.append((i, r.args[0]))
        assert [(r.position, r.reason) for r in out.rejected] == expected_bad
        assert out.positions.tolist() == [i for i, _ in expected_ok]
        assert out.src == [e[0] for _, e in expected_ok]
        assert out.dst == [e[1] for _, e in expected_ok]
        assert out.ts.tolist() == [e[2] for _, e in expected_ok]
        assert out.features.tolist() == [e[3] for _, e in expected_ok]
        assert out.labels.tolist() == [e[4] for _, e in expected_ok]
        assert len(out.src) + len(out.rejected) == len(values)


def test_random_mixes_actually_cover_valid_and_every_json_reason():
    rng = random.Random(7)
    seen = set()
    for _ in range(4000):
        try:
            reference_decode(random_value(rng, 3), 3, max_bytes=900)
            seen.add("valid")
        except RefReject as r:
            seen.add(r.args[0])
    assert seen >= set(REASONS) - {"invalid_protobuf"} | {"valid"}
