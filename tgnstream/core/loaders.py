"""Readers for on-disk temporal interaction streams: JODIE CSV and SNAP-style edge lists.

Both readers parse in bulk (one numpy pass for JODIE numbers) and validate afterwards with
vectorised checks; only when bulk parsing fails do they re-scan line by line, purely to name
the offending line in the error.
"""

from __future__ import annotations

from itertools import repeat
from pathlib import Path
from typing import NoReturn

import numpy as np

from tgnstream.core.events import TemporalDataset
from tgnstream.core.synthetic import dataset_from_arrays

__all__ = ["DatasetFormatError", "load_dataset", "load_edge_list", "load_jodie_csv"]

# Ids travel through float64 during parsing; above this they would silently lose precision.
_MAX_EXACT_ID = 2**53


class DatasetFormatError(ValueError):
    """A dataset file is malformed; the message names the file, the 1-based line and the issue."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line


def _decode(path: Path, data: bytes, first_line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        raise DatasetFormatError(path, line, f"not UTF-8 text ({err.reason})") from None


def _read_lines(
    path: Path, limit: int | None, *, header: bool, skip
) -> tuple[list[str], list[int] | None, str | None]:
    """Return ``(data_lines, line_numbers, header_line)`` of the kept lines of ``path``.

    ``skip(line)`` drops blank/comment lines. ``line_numbers`` is None when no line was dropped
    (then data line ``k`` is file line ``k + 1 + header``), sparing a list for the common case.
    With ``limit`` only that many data lines are read, so huge files are not read in full.
    """
    if limit is None:
        text = _decode(path, path.read_bytes(), 1)
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
    else:
        lines = []
        kept = 0
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                line = _decode(path, raw, number).rstrip("\r\n")
                lines.append(line)
                if not skip(line) and (not header or number > 1):
                    kept += 1
                    if kept >= limit:
                        break
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    head = None
    if header:
        if not lines:
            return [], None, None
        head, lines, first = lines[0], lines[1:], 2
    else:
        first = 1
    dropped = [skip(line) for line in lines]
    if not any(dropped):
        data = lines if limit is None else lines[:limit]
        return data, None, head
    numbers = [first + k for k, d in enumerate(dropped) if not d]
    data = [line for line, d in zip(lines, dropped, strict=True) if not d]
    if limit is not None:
        data, numbers = data[:limit], numbers[:limit]
    return data, numbers, head


def _line_no(numbers: list[int] | None, k: int, first: int) -> int:
    return numbers[k] if numbers is not None else k + first


def _is_blank(line: str) -> bool:
    return not line.strip()


def _parse_float(field: str) -> float | None:
    """Parse one field with the same grammar as the vectorised path, or None if it is invalid."""
    try:
        values = np.fromstring(field, sep=",")
    except ValueError:
        return None
    return float(values[0]) if values.shape == (1,) and "," not in field else None


def _scan_jodie(path: Path, lines: list[str], numbers, ncols: int) -> NoReturn:
    """Raise for the first data line with a wrong field count or a non-numeric field."""
    for k, line in enumerate(lines):
        fields = line.split(",")
        if len(fields) != ncols:
            raise DatasetFormatError(
                path,
                _line_no(numbers, k, 2),
                f"expected {ncols} comma-separated columns (as on the first data line), found {len(fields)}",
            )
        for c, field in enumerate(fields):
            if _parse_float(field) is None:
                raise DatasetFormatError(
                    path,
                    _line_no(numbers, k, 2),
                    f"column {c + 1} is not a number: {field.strip()!r}",
                )
    raise DatasetFormatError(path, None, "could not be parsed as numeric CSV")


def load_jodie_csv(path: str | Path, *, limit: int | None = None) -> TemporalDataset:
    """Load a JODIE-format CSV stream: a header line, then rows ``u,i,ts,label[,f1,...,fd]``.

    Rules:
        * every data row has the column count of the first data row (the header's count is
          not used: original JODIE headers name the feature block with a single field);
        * ``u``/``i`` are non-negative integer ids; they keep one id space unless some raw
          ``u`` equals some raw ``i``, in which case they become ``"u:<id>"``/``"i:<id>"``;
        * dense ids are given by first appearance in the stream, ``u`` before ``i`` per row,
          and ``raw_ids[dense]`` is the canonical decimal raw id (with prefix if any);
        * ``ts`` must be finite and non-decreasing: unsorted files are rejected, never sorted;
        * labels must be integers, features finite; blank lines are ignored.

    Args:
        path: the CSV file; the dataset is named after its stem.
        limit: read only the first ``limit`` events.

    Returns:
        A :class:`TemporalDataset` with ``src``/``dst`` ``[E]`` int64, ``t`` ``[E]`` float64,
        ``feats`` ``[E, d]`` float32 (``d = 0`` without feature columns), ``labels`` ``[E]``
        int64, ``dst_nodes`` ``[D]`` sorted unique destinations.

    Raises:
        DatasetFormatError: naming the file and 1-based line for any malformed content.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    lines, numbers, head = _read_lines(path, limit, header=True, skip=_is_blank)
    if head is None:
        raise DatasetFormatError(path, None, "empty file (expected a header line, then rows)")
    if not head.strip():
        raise DatasetFormatError(path, 1, "expected a header line, found a blank line")
    if _parse_float(head.split(",")[0]) is not None:
        raise DatasetFormatError(path, 1, f"expected a header line, found data: {head!r}")
    if not lines:
        raise DatasetFormatError(path, None, "header only, no data rows")

    ncols = lines[0].count(",") + 1
    if ncols < 4:
        raise DatasetFormatError(
            path,
            _line_no(numbers, 0, 2),
            f"expected at least 4 columns u,i,ts,label, found {ncols}",
        )
    n = len(lines)
    # Per-line separator counts catch rows whose extra and missing fields would cancel out.
    commas = np.fromiter(map(str.count, lines, repeat(",")), dtype=np.int64, count=n)
    values = None
    if (commas == ncols - 1).all():
        try:
            values = np.fromstring(",".join(lines), sep=",")
        except ValueError:
            values = None
    if values is None or values.shape[0] != n * ncols:
        _scan_jodie(path, lines, numbers, ncols)
    table = values.reshape(n, ncols)

    # All row checks at once; the error reports whichever problem comes first in the file.
    ids, t, label, feats = table[:, :2], table[:, 2], table[:, 3], table[:, 4:]
    bad_id = ~((ids >= 0) & (ids <= _MAX_EXACT_ID) & (np.floor(ids) == ids)).all(axis=1)
    bad_t = ~np.isfinite(t)
    bad_order = np.zeros(n, dtype=bool)
    bad_order[1:] = t[1:] < t[:-1]
    bad_label = ~(np.isfinite(label) & (np.floor(label) == label))
    bad_feat = ~np.isfinite(feats).all(axis=1)
    bad = bad_id | bad_t | bad_order | bad_label | bad_feat
    if bad.any():
        k = int(np.argmax(bad))
        fields = [f.strip() for f in lines[k].split(",")]
        if bad_id[k]:
            problem = (
                f"ids must be non-negative integers (at most 2**53), got u={fields[0]!r}, i={fields[1]!r}"
            )
        elif bad_t[k]:
            problem = f"timestamp must be finite, got {fields[2]!r}"
        elif bad_order[k]:
            previous = lines[k - 1].split(",")[2].strip()
            problem = (
                f"timestamp {fields[2]} is earlier than {previous} on line "
                f"{_line_no(numbers, k - 1, 2)}; JODIE files must be sorted by time"
            )
        elif bad_label[k]:
            problem = f"label must be an integer, got {fields[3]!r}"
        else:
            problem = "edge features must be finite (no nan/inf)"
        raise DatasetFormatError(path, _line_no(numbers, k, 2), problem)

    u = ids[:, 0].astype(np.int64)
    i = ids[:, 1].astype(np.int64)
    collide = np.intersect1d(u, i, assume_unique=False).size > 0
    # Keys keep users and items apart only when their raw ids collide: 2*id + side.
    keys = np.empty(2 * n, dtype=np.int64)
    keys[0::2], keys[1::2] = (2 * u, 2 * i + 1) if collide else (u, i)
    dense, first_keys = _dense_by_first_appearance(keys)
    if collide:
        raw_ids = [f"{'ui'[k & 1]}:{k >> 1}" for k in first_keys.tolist()]
    else:
        raw_ids = [str(k) for k in first_keys.tolist()]
    return dataset_from_arrays(
        dense[0::2],
        dense[1::2],
        t,
        feats,
        label.astype(np.int64),
        name=path.stem,
        raw_ids=raw_ids,
    )


def _dense_by_first_appearance(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map ``[M]`` int64 keys to dense ids in order of first appearance.

    Returns ``(dense [M] int64, first_keys [N])`` with ``first_keys[dense[m]] == keys[m]``.
    """
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return rank[inverse.reshape(-1)].astype(np.int64), uniq[order]


def _is_blank_or_comment(line: str) -> bool:
    stripped = line.lstrip()
    return not stripped or stripped[0] in "#%"


def load_edge_list(path: str | Path, *, limit: int | None = None) -> TemporalDataset:
    """Load a whitespace-separated SNAP-style edge list: ``src dst ts [ignored columns...]``.

    Lines starting with ``#`` or ``%`` are comments; blank lines are ignored. Ids are arbitrary
    strings. Unlike JODIE files, SNAP files are often not time-ordered, so events are sorted
    stably by ``ts`` (ties keep file order); dense ids then follow first appearance in that
    sorted stream, ``src`` before ``dst`` per event. ``ts`` must be finite. There are no
    features (``d = 0``) and labels are zeros. ``bipartite`` is computed, not assumed.

    Args:
        path: the edge-list file; the dataset is named after its stem.
        limit: read only the first ``limit`` events of the file (before sorting).

    Returns:
        A :class:`TemporalDataset` with ``src``/``dst`` ``[E]`` int64, ``t`` ``[E]`` float64,
        ``feats`` ``[E, 0]``, ``labels`` ``[E]`` zeros, ``raw_ids`` the original id strings.

    Raises:
        DatasetFormatError: naming the file and 1-based line for any malformed content.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    lines, numbers, _ = _read_lines(path, limit, header=False, skip=_is_blank_or_comment)
    if not lines:
        raise DatasetFormatError(path, None, "no edges (file is empty or only comments)")
    rows = [line.split(None, 3) for line in lines]
    if min(map(len, rows)) < 3:
        k = next(k for k, r in enumerate(rows) if len(r) < 3)
        raise DatasetFormatError(
            path, _line_no(numbers, k, 1), f"expected 'src dst ts', found {len(rows[k])} column(s)"
        )
    src_names = [r[0] for r in rows]
    dst_names = [r[1] for r in rows]
    ts_text = [r[2] for r in rows]
    try:
        t = np.array(ts_text, dtype=np.float64)
    except ValueError:
        t = None
    if t is None or not np.isfinite(t).all():
        for k, text in enumerate(ts_text):
            try:
                ok = bool(np.isfinite(np.array([text], dtype=np.float64)).all())
            except ValueError:
                ok = False
            if not ok:
                raise DatasetFormatError(
                    path,
                    _line_no(numbers, k, 1),
                    f"timestamp must be a finite number, got {text!r}",
                )
        raise DatasetFormatError(path, None, "timestamps could not be parsed")

    # Provisional integer codes first, so that the relabelling after the sort stays in numpy.
    codes: dict[str, int] = {}
    n = len(rows)
    file_keys = np.empty(2 * n, dtype=np.int64)
    file_keys[0::2] = [codes.setdefault(s, len(codes)) for s in src_names]
    file_keys[1::2] = [codes.setdefault(d, len(codes)) for d in dst_names]
    order = np.argsort(t, kind="stable")
    keys = file_keys.reshape(n, 2)[order].reshape(-1)
    dense, first_codes = _dense_by_first_appearance(keys)
    names = list(codes)
    return dataset_from_arrays(
        dense[0::2],
        dense[1::2],
        t[order],
        name=path.stem,
        raw_ids=[names[c] for c in first_codes.tolist()],
    )


def load_dataset(path: str | Path, *, limit: int | None = None) -> TemporalDataset:
    """Load a stream by extension: ``.csv`` as JODIE CSV, anything else as an edge list."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return load_jodie_csv(path, limit=limit)
    return load_edge_list(path, limit=limit)
