"""Loaders against hand-computed expectations and an independent csv-module reference."""

from __future__ import annotations

import csv
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from tgnstream.core.loaders import DatasetFormatError, load_dataset, load_edge_list, load_jodie_csv


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_jodie_small_file_with_features(tmp_path):
    path = write(
        tmp_path,
        "tiny.csv",
        "user_id,item_id,timestamp,state_label,features\n"
        "10,20,0,0,0.5,1.0\n"
        "11,20,1.5,1,-1,2\n"
        "10,21,1.5,0,0,0\n",
    )
    ds = load_jodie_csv(path)
    ev = ds.events
    assert ev.src.tolist() == [0, 2, 0]
    assert ev.dst.tolist() == [1, 1, 3]
    assert ev.t.dtype == torch.float64 and ev.t.tolist() == [0.0, 1.5, 1.5]
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 1, 0]
    assert ev.feats.dtype == torch.float32
    assert ev.feats.tolist() == [[0.5, 1.0], [-1.0, 2.0], [0.0, 0.0]]
    assert ds.raw_ids == ["10", "20", "11", "21"]
    assert ds.num_nodes == 4 and ds.dst_nodes.tolist() == [1, 3]
    assert ds.bipartite and ds.name == "tiny" and ds.edge_dim == 2


def test_jodie_colliding_user_and_item_ids_get_separate_namespaces(tmp_path):
    ds = load_jodie_csv(write(tmp_path, "c.csv", "u,i,ts,label\n0,1,0,0\n1,0,1,0\n0,0,2,0\n"))
    assert ds.raw_ids == ["u:0", "i:1", "u:1", "i:0"]
    assert ds.events.src.tolist() == [0, 2, 0]
    assert ds.events.dst.tolist() == [1, 3, 3]
    assert ds.bipartite and ds.dst_nodes.tolist() == [1, 3]


def test_jodie_blank_lines_crlf_and_limit(tmp_path):
    path = tmp_path / "crlf.csv"
    path.write_bytes(b"u,i,ts,label\r\n1,5,0,0\r\n\r\n2,6,3,0\r\n3,5,4,1\r\n\r\n")
    ds = load_jodie_csv(path)
    assert ds.events.src.tolist() == [0, 2, 4] and ds.events.dst.tolist() == [1, 3, 1]
    assert ds.edge_dim == 0 and ds.events.feats.shape == (3, 0)
    assert len(load_jodie_csv(path, limit=2)) == 2
    assert load_jodie_csv(path, limit=2).raw_ids == ["1", "5", "2", "6"]


def test_jodie_bom_and_missing_final_newline(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffu,i,ts,label\n7,8,0.25,1".encode())
    ds = load_jodie_csv(path)
    assert ds.raw_ids == ["7", "8"] and ds.events.t.tolist() == [0.25]


@pytest.mark.parametrize("limit", [None, 5])
def test_non_utf8_bytes_name_the_line(tmp_path, limit):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"u,i,ts,label\n1,2,0,0\n1,2,1,0\xe9\n1,2,2,0\n")
    with pytest.raises(DatasetFormatError, match="UTF-8") as info:
        load_jodie_csv(path, limit=limit)
    assert info.value.line == 3


def test_jodie_limit_stops_before_bad_lines(tmp_path):
    path = write(tmp_path, "l.csv", "u,i,ts,label\n1,2,0,0\n1,2,1,0\n1,2,oops,0\n")
    assert len(load_jodie_csv(path, limit=2)) == 2
    with pytest.raises(DatasetFormatError):
        load_jodie_csv(path)
    # Blank lines do not count towards the limit.
    gappy = write(tmp_path, "g.csv", "u,i,ts,label\n\n1,2,0,0\n\n1,3,1,0\n1,2,x,0\n")
    assert load_jodie_csv(gappy, limit=2).raw_ids == ["1", "2", "3"]


def test_jodie_matches_csv_module_on_wikipedia_prefix(wikipedia_csv):
    with open(wikipedia_csv, newline="") as f:
        rows = list(islice(csv.reader(f), 1, 1001))
    dense: dict[str, int] = {}
    src, dst = [], []
    for u, i, *_ in rows:
        src.append(dense.setdefault(u, len(dense)))
        dst.append(dense.setdefault(i, len(dense)))

    ds = load_jodie_csv(wikipedia_csv, limit=1000)
    assert len(ds) == 1000
    assert ds.events.src.tolist() == src and ds.events.dst.tolist() == dst
    assert ds.events.t.tolist() == [float(r[2]) for r in rows]
    assert ds.labels.tolist() == [int(r[3]) for r in rows]
    assert ds.raw_ids == list(dense)
    assert ds.num_nodes == len(dense) and ds.bipartite
    assert ds.dst_nodes.tolist() == sorted(set(dst))
    assert ds.edge_dim == 0 and ds.name == "wikipedia"


def test_jodie_full_wikipedia_matches_readme(wikipedia_csv):
    ds = load_dataset(wikipedia_csv)
    assert len(ds) == 157_474 and ds.num_nodes == 9_227
    assert ds.dst_nodes.numel() == 1_000 and ds.bipartite
    assert int(ds.labels.sum()) == 217
    users = {int(ds.raw_ids[k]) for k in ds.events.src.unique().tolist()}
    assert users == set(range(8_227))


JODIE_HEADER = "u,i,ts,label\n"

MALFORMED_JODIE = [
    ("too_many_columns", "1,2,0,0\n1,2,1,0,9\n", 3, "columns"),
    # One short row and one long row would balance a whole-file field count.
    ("columns_cancel_out", "1,2,0,0\n1,2,1\n1,2,2,0,7\n", 3, "columns"),
    ("non_numeric", "1,2,0,0\n1,2,1,0\n1,x,2,0\n", 4, "not a number"),
    ("empty_field", "1,2,0,0\n1,,1,0\n", 3, "not a number"),
    ("nan_time", "1,2,0,0\n1,2,nan,0\n", 3, "finite"),
    ("inf_time", "1,2,0,0\n1,2,1,0\n1,2,inf,0\n", 4, "finite"),
    ("negative_id", "1,2,0,0\n-1,2,1,0\n", 3, "non-negative integers"),
    ("fractional_id", "1.5,2,0,0\n", 2, "non-negative integers"),
    ("huge_id", "1,2,0,0\n1e300,2,1,0\n", 3, "non-negative integers"),
    ("out_of_order", "1,2,0,0\n1,2,5,0\n1,2,4,0\n", 4, "earlier than 5 on line 3"),
    ("fractional_label", "1,2,0,0.5\n", 2, "label"),
    ("nan_feature", "1,2,0,0,1.0\n1,2,1,0,nan\n", 3, "features"),
    ("too_few_columns", "1,2,0\n", 2, "at least 4 columns"),
    # Blank lines are skipped but still counted in line numbers.
    ("after_blank_lines", "1,2,0,0\n\n\n1,2,-1,0\n", 5, "earlier than 0"),
]


@pytest.mark.parametrize(
    "body, line, fragment", [c[1:] for c in MALFORMED_JODIE], ids=[c[0] for c in MALFORMED_JODIE]
)
def test_jodie_malformed_reports_line(tmp_path, body, line, fragment):
    path = write(tmp_path, "bad.csv", JODIE_HEADER + body)
    with pytest.raises(DatasetFormatError) as info:
        load_jodie_csv(path)
    assert info.value.line == line
    message = str(info.value)
    assert str(path) in message and f"line {line}:" in message and fragment in message


@pytest.mark.parametrize(
    "text, line, fragment",
    [("", None, "empty file"), ("u,i,ts,label\n\n", None, "no data rows"), ("1,2,0,0\n", 1, "header")],
    ids=["empty", "header_only", "missing_header"],
)
def test_jodie_empty_or_headerless(tmp_path, text, line, fragment):
    path = write(tmp_path, "e.csv", text)
    with pytest.raises(DatasetFormatError, match=fragment) as info:
        load_jodie_csv(path)
    assert info.value.line == line and str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


EDGE_LIST = """\
% konect-style header comment
# FromNodeId ToNodeId Timestamp
a b 30 extra columns
b c 10

c a 20 x
  # indented comment
a c 10
"""


def test_edge_list_sorts_stably_and_maps_by_first_appearance(tmp_path):
    path = write(tmp_path, "snap.txt", EDGE_LIST)
    rows = [ln.split() for ln in EDGE_LIST.splitlines() if ln.strip() and ln.lstrip()[0] not in "#%"]
    rows = sorted(rows, key=lambda r: float(r[2]))  # Python's sort is stable.
    dense: dict[str, int] = {}
    src, dst = [], []
    for r in rows:
        src.append(dense.setdefault(r[0], len(dense)))
        dst.append(dense.setdefault(r[1], len(dense)))

    ds = load_edge_list(path)
    assert ds.events.src.tolist() == src and ds.events.dst.tolist() == dst
    assert ds.events.t.tolist() == [10.0, 10.0, 20.0, 30.0]
    assert ds.raw_ids == list(dense) == ["b", "c", "a"]
    assert not ds.bipartite and ds.num_nodes == 3
    assert ds.edge_dim == 0 and ds.labels.tolist() == [0, 0, 0, 0]
    assert ds.name == "snap"


def test_edge_list_limit_applies_in_file_order(tmp_path):
    ds = load_edge_list(write(tmp_path, "s.txt", EDGE_LIST), limit=2)
    assert ds.events.t.tolist() == [10.0, 30.0]
    assert ds.raw_ids == ["b", "c", "a"] and ds.bipartite is False


def test_edge_list_bipartite_is_computed(tmp_path):
    ds = load_edge_list(write(tmp_path, "bi.txt", "u1 p1 0\nu2 p1 1\nu1 p2 2\n"))
    assert ds.bipartite and ds.dst_nodes.tolist() == [1, 3]


MALFORMED_EDGES = [
    ("two_columns", "# c\na b 1\na b\n", 3, "found 2 column"),
    ("non_numeric_ts", "a b 1\n\n% c\na b later\n", 4, "'later'"),
    ("nan_ts", "a b 1\na b nan\n", 2, "finite"),
    ("inf_ts", "a b inf\n", 1, "finite"),
]


@pytest.mark.parametrize(
    "text, line, fragment", [c[1:] for c in MALFORMED_EDGES], ids=[c[0] for c in MALFORMED_EDGES]
)
def test_edge_list_malformed_reports_line(tmp_path, text, line, fragment):
    path = write(tmp_path, "bad.txt", text)
    with pytest.raises(DatasetFormatError) as info:
        load_edge_list(path)
    assert info.value.line == line
    assert str(path) in str(info.value) and fragment in str(info.value)


@pytest.mark.parametrize("text", ["", "# only\n% comments\n\n"])
def test_edge_list_without_edges(tmp_path, text):
    with pytest.raises(DatasetFormatError, match="no edges"):
        load_edge_list(write(tmp_path, "none.txt", text))


def test_load_dataset_dispatches_on_extension(tmp_path):
    csv_path = write(tmp_path, "x.CSV", "u,i,ts,label\n1,2,0,1\n")
    assert load_dataset(csv_path).labels.tolist() == [1]
    txt_path = write(tmp_path, "x.edges", "1 2 0\n")
    ds = load_dataset(txt_path)
    assert ds.raw_ids == ["1", "2"] and ds.labels.tolist() == [0]
    np.testing.assert_array_equal(ds.events.t.numpy(), [0.0])
