"""Source readers: the files named in sources.yaml → rows → cells, as Ray Data datasets.

A source is a local path, a glob or an s3:// URI holding csv, jsonl, json (a list of records),
parquet or BIG-bench style task.json files (their `examples`; the task's `description`
becomes the source description when sources.yaml gives none).

Two Ray Data passes over the files (`read_sources` says why two):
1. `ScanFiles` counts: each file's rows, cells per row, rejects and description.
2. `FileCells` streams cells: rows get their index in the source (files in sorted order),
   `max_rows` keeps a stride sample, and every non-empty (row, column) value becomes one cell.

Bad input never stops the job and is never dropped silently: undecodable bytes, unparseable
lines, missing columns, empty files and over-long values each become a reject with the
source, its location (`file`, `file#line`, `file#line:column`) and the reason.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rebase_ray.config import IndexConfig, S3Config, SourceConfig
from rebase_ray.storage import Storage, StorageError

CELL_COLUMNS = ["cell_id", "dataset", "config", "split", "row_idx", "column", "value"]
CELL_SCHEMA = pa.schema([("cell_id", pa.string()), ("dataset", pa.string()),
                         ("config", pa.string()), ("split", pa.string()),
                         ("row_idx", pa.int64()), ("column", pa.string()),
                         ("value", pa.string())])
REJECT_SCHEMA = pa.schema([("source", pa.string()), ("location", pa.string()),
                           ("reason", pa.string())])
CELL_ROWS = CELL_SCHEMA.append(pa.field("row_key", pa.string()))
# The counting pass's output: kind is "file" (one per file: pos is its row count, row_cells
# the cells of each of its rows) or "reject" (pos: the row of an over-long value, else null).
SCAN_SCHEMA = pa.schema([("kind", pa.string()), ("source", pa.string()),
                         ("file_idx", pa.int64()), ("pos", pa.int64()),
                         ("location", pa.string()), ("reason", pa.string()),
                         ("description", pa.string()), ("row_cells", pa.list_(pa.int32()))])
READ_BLOCK_BYTES = 32 << 20  # files per Ray Data block: about this many bytes of them
FORMATS = {"csv": "csv", "jsonl": "jsonl", "ndjson": "jsonl", "json": "json",
           "parquet": "parquet"}
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def row_key(dataset: str, config: str, split: str, row_idx: int) -> str:
    return f"{dataset}/{config}/{split}/{row_idx}"


def cell_id(dataset: str, config: str, split: str, row_idx: int, column: str) -> str:
    """A stable 16-hex-digit id for one (row, column) location."""
    key = json.dumps([dataset, config, split, int(row_idx), column])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def row_hash(key: str) -> int:
    """A stable non-negative 63-bit hash of a row key: rows are sharded by it."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def to_text(value: Any) -> str:
    """A value as text: nested lists and dicts become compact JSON, missing values ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


# ----------------------------------------------------------------------------- files


def list_files(source: SourceConfig, s3: S3Config | None = None) -> list[dict]:
    """The files of a source, sorted, each with a version tag (size + mtime or ETag). A source
    with no file (a glob matching nothing, an empty folder) is an error, like a missing path."""
    st = Storage.for_uri(source.path, s3)
    uris = st.glob(source.path)
    if not uris:
        raise StorageError(f"source {source.name!r}: no file matches {source.path}")
    files = []
    for uri in uris:
        info = st.fs.info(st.path(uri))
        version = info.get("ETag") or info.get("mtime") or info.get("LastModified")
        files.append({"uri": uri, "size": int(info.get("size") or 0), "version": str(version)})
    return files


def fingerprint(source: SourceConfig, files: list[dict]) -> str:
    """Changes when the source's config or any of its files changes."""
    blob = json.dumps([source.model_dump(mode="json"), files], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def detect_format(source: SourceConfig, uri: str, data: bytes) -> str | None:
    if source.format != "auto":
        return source.format
    ext = uri.rsplit("/", 1)[-1].rsplit(".", 1)[-1].lower()
    kind = FORMATS.get(ext)
    if kind == "json" and b'"examples"' in data[:1_000_000] and data.lstrip()[:1] == b"{":
        return "bigbench"
    return kind


# ----------------------------------------------------------------------------- parsing


@dataclass
class Parsed:
    rows: list[tuple[str, dict]]  # (location, record)
    rejects: list[tuple[str, str]]  # (location, reason)
    description: str = ""


def parse_file(source: SourceConfig, uri: str, data: bytes) -> Parsed:
    """Rows and rejects of one file; never raises on bad content."""
    out = Parsed([], [])
    if not data.strip():
        out.rejects.append((uri, "empty file"))
        return out
    kind = detect_format(source, uri, data)
    if kind is None:
        reason = "unknown file format (expected csv, jsonl, json, parquet or BIG-bench json)"
        out.rejects.append((uri, reason))
        return out
    reader = {"csv": _csv, "jsonl": _jsonl, "json": _json, "bigbench": _json,
              "parquet": _parquet}[kind]
    reader(uri, data, out, kind)
    return out


def _decode(data: bytes) -> str:
    # Undecodable bytes survive as lone surrogates; rows holding them are rejected below.
    return data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")


def _add(out: Parsed, location: str, record: Any) -> None:
    if not isinstance(record, dict):
        out.rejects.append((location, f"not a record (got {type(record).__name__})"))
        return
    texts = {str(k): to_text(v) for k, v in record.items()}
    if any(_UNDECODABLE.search(t) for t in list(texts.values()) + list(texts)):
        out.rejects.append((location, "undecodable bytes (not UTF-8)"))
        return
    out.rows.append((location, texts))


def _csv(uri: str, data: bytes, out: Parsed, kind: str) -> None:
    reader = csv.reader(io.StringIO(_decode(data), newline=""))
    try:
        header = next(reader)
        for fields in reader:
            location = f"{uri}#{reader.line_num}"
            if not fields:
                continue
            if len(fields) != len(header):
                out.rejects.append((location, f"{len(fields)} fields, header has {len(header)}"))
                continue
            _add(out, location, dict(zip(header, fields)))
    except csv.Error as exc:
        out.rejects.append((f"{uri}#{reader.line_num}", f"unparseable CSV: {exc}"))


def _jsonl(uri: str, data: bytes, out: Parsed, kind: str) -> None:
    for n, line in enumerate(_decode(data).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            out.rejects.append((f"{uri}#{n}", f"unparseable JSON line: {exc.msg}"))
            continue
        _add(out, f"{uri}#{n}", record)


def _json(uri: str, data: bytes, out: Parsed, kind: str) -> None:
    try:
        obj = json.loads(_decode(data))
    except json.JSONDecodeError as exc:
        out.rejects.append((uri, f"unparseable JSON: {exc.msg} at line {exc.lineno}"))
        return
    if kind == "bigbench":
        if not isinstance(obj, dict) or not isinstance(obj.get("examples"), list):
            out.rejects.append((uri, "BIG-bench task.json without an `examples` list"))
            return
        out.description = to_text(obj.get("description"))
        obj = obj["examples"]
    if not isinstance(obj, list):
        out.rejects.append((uri, f"expected a list of records, got {type(obj).__name__}"))
        return
    for n, record in enumerate(obj):
        _add(out, f"{uri}#{n}", record)


def _parquet(uri: str, data: bytes, out: Parsed, kind: str) -> None:
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        out.rejects.append((uri, f"unreadable parquet: {exc}"))
        return
    for n, record in enumerate(table.to_pylist()):
        _add(out, f"{uri}#{n}", record)


def load_file(source: SourceConfig, uri: str, s3: S3Config | None) -> Parsed:
    """One file read and parsed, its records cut to `source.columns` (a column that no row has
    is a reject of the file); never raises on bad content or an unreadable file."""
    try:
        data = Storage.for_uri(uri, s3).read_bytes(uri)
    except (OSError, StorageError) as exc:
        return Parsed([], [(uri, f"unreadable: {exc}")])
    parsed = parse_file(source, uri, data)
    if source.columns and parsed.rows:
        present = set().union(*(r.keys() for _, r in parsed.rows))
        missing = [(uri, f"missing column {c!r}") for c in source.columns if c not in present]
        parsed.rejects[:0] = missing
        parsed.rows = [(loc, {c: r[c] for c in source.columns if c in r})
                       for loc, r in parsed.rows]
    return parsed


def row_values(record: dict[str, str], reject_chars: int
               ) -> tuple[list[tuple[str, str]], list[tuple[str, int]]]:
    """A row's cells, (column, value) for each non-empty value, and its values over
    `reject_chars`, (column, length), which are rejects instead of cells."""
    cells, long = [], []
    for column, value in record.items():
        if not value.strip():
            continue
        if len(value) > reject_chars:
            long.append((column, len(value)))
        else:
            cells.append((column, value))
    return cells, long


class ScanFiles:
    """Ray Data batch function, the counting pass: files → one `file` record each (its row
    count, description and cells per row) and its rejects (`pos`: the row of an over-long
    value, null for the file's own rejects). Rows themselves are not kept."""

    def __init__(self, sources: dict[str, SourceConfig], s3: S3Config | None, cfg: IndexConfig):
        self.sources, self.s3, self.reject_chars = sources, s3, cfg.reject_value_chars

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: list[dict] = []
        for name, uri, file_idx in zip(*(batch[c].to_pylist()
                                         for c in ("source", "uri", "file_idx"))):
            where = {"source": name, "file_idx": file_idx}
            parsed = load_file(self.sources[name], uri, self.s3)
            row_cells = []
            for pos, (location, record) in enumerate(parsed.rows):
                cells, long = row_values(record, self.reject_chars)
                row_cells.append(len(cells))
                out += [{**where, "kind": "reject", "pos": pos, "location": f"{location}:{col}",
                         "reason": f"value of {n} chars is over the {self.reject_chars}-char "
                                   "limit"} for col, n in long]
            out += [{**where, "kind": "reject", "location": location, "reason": reason}
                    for location, reason in parsed.rejects]
            out.append({**where, "kind": "file", "pos": len(parsed.rows),
                        "description": parsed.description, "row_cells": row_cells})
        return pa.Table.from_pylist(out, schema=SCAN_SCHEMA)


def stride_sample(n: int, max_rows: int | None) -> set[int] | None:
    """Row indices kept by `max_rows` (evenly spaced over the n rows); None keeps all."""
    if max_rows is None or n <= max_rows:
        return None
    step = n / max_rows
    return {int(i * step) for i in range(max_rows)}


class FileCells:
    """Ray Data batch function, the streaming pass: files (with `offset`, the source's rows
    before the file, and `total`, the source's rows) → the cells of their sampled rows, one
    table per file. Rejects were collected by the counting pass (`ScanFiles`)."""

    def __init__(self, sources: dict[str, SourceConfig], s3: S3Config | None, cfg: IndexConfig):
        self.sources, self.s3 = sources, s3
        self.max_chars, self.reject_chars = cfg.max_value_chars, cfg.reject_value_chars

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for name, uri, offset, total in zip(*(batch[c].to_pylist()
                                              for c in ("source", "uri", "offset", "total"))):
            src = self.sources[name]
            keep = stride_sample(total, src.max_rows)
            rows = []
            for pos, (_, record) in enumerate(load_file(src, uri, self.s3).rows):
                idx = offset + pos
                if keep is None or idx in keep:
                    key = row_key(name, src.config, src.split, idx)
                    rows += [(cell_id(name, src.config, src.split, idx, column), name,
                              src.config, src.split, idx, column, value[:self.max_chars], key)
                             for column, value in row_values(record, self.reject_chars)[0]]
            yield pa.Table.from_pylist([dict(zip(CELL_ROWS.names, r)) for r in rows],
                                       schema=CELL_ROWS)


@dataclass
class SourceRead:
    """What reading a set of sources gave: cells (a lazy dataset: reading it is the streaming
    pass), rejects and per-source stats and descriptions (from the counting pass)."""

    cells: Any  # ray.data.Dataset with CELL_COLUMNS + row_key
    rejects: pa.Table
    stats: dict[str, dict]  # name → files, rows, cells, rejects
    descriptions: dict[str, str]


def read_sources(sources: list[SourceConfig], cfg: IndexConfig,
                 s3: S3Config | None = None, files: dict[str, list[dict]] | None = None
                 ) -> SourceRead:
    """Sources → a lazy Ray Dataset of cells, after one counting pass.

    Each pass is one Ray Data dataset over every file of every source (a few files per
    block), with nothing materialized between them. 1. `ScanFiles`, run here: a row's index
    counts the rows of its source's earlier files and `max_rows` samples the source's total,
    so no row can be numbered or sampled before every file of its source is parsed, and the
    build sizes its shards by the total cells; a few numbers per row come to the driver.
    2. `FileCells`, returned unexecuted: parses the files again and streams the sampled rows'
    cells to the consumer (the build: shard assignment, embedding actors, staging writes).
    Parsing twice costs less than holding every parsed row in the object store meanwhile.
    """
    import ray

    by_name = {s.name: s for s in sources}
    files = files or {s.name: list_files(s, s3) for s in sources}
    items = [{"source": s.name, "uri": f["uri"], "file_idx": k}
             for s in sources for k, f in enumerate(files[s.name])]
    blocks = _num_blocks([f["size"] for s in sources for f in files[s.name]])
    scanned = _arrow(ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        ScanFiles(by_name, s3, cfg), batch_size=None, batch_format="pyarrow"), SCAN_SCHEMA)

    per_file = scanned.filter(pc.equal(scanned["kind"], "file")).sort_by(
        [("source", "ascending"), ("file_idx", "ascending")])
    row_cells = per_file["row_cells"].combine_chunks()
    cells_of_rows, bounds = row_cells.values.to_numpy(), row_cells.offsets.to_numpy()
    stats = {s.name: {"files": len(files[s.name]), "rows": 0, "cells": 0, "rejects": 0}
             for s in sources}
    descriptions = {s.name: s.description for s in sources}
    offsets: dict[tuple[str, int], int] = {}
    totals: dict[str, int] = dict.fromkeys(by_name, 0)
    for name, file_idx, n, description in zip(*(per_file[c].to_pylist() for c in (
            "source", "file_idx", "pos", "description"))):
        offsets[(name, file_idx)] = totals[name]
        totals[name] += n
        if not descriptions[name] and description:
            descriptions[name] = description
    keep = {name: stride_sample(totals[name], by_name[name].max_rows) for name in by_name}
    for k, (name, file_idx) in enumerate(zip(per_file["source"].to_pylist(),
                                             per_file["file_idx"].to_pylist())):
        counts = cells_of_rows[bounds[k]:bounds[k + 1]]
        if keep[name] is not None:
            rows = offsets[(name, file_idx)] + np.arange(len(counts))
            counts = counts[np.isin(rows, np.fromiter(keep[name], np.int64))]
        stats[name]["cells"] += int(counts.sum())
        stats[name]["rows"] = totals[name] if keep[name] is None else len(keep[name])
    rejects = scanned.filter(pc.equal(scanned["kind"], "reject"))
    sampled = [pos is None or keep[name] is None or offsets[(name, file_idx)] + pos in keep[name]
               for name, file_idx, pos in zip(*(rejects[c].to_pylist()
                                                for c in ("source", "file_idx", "pos")))]
    rejects = rejects.filter(pa.array(sampled, pa.bool_())).select(REJECT_SCHEMA.names)
    for name in rejects["source"].to_pylist():
        stats[name]["rejects"] += 1

    for item in items:
        item.update(offset=offsets[(item["source"], item["file_idx"])],
                    total=totals[item["source"]])
    cells = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        FileCells(by_name, s3, cfg), batch_size=None, batch_format="pyarrow")
    return SourceRead(cells, rejects.cast(REJECT_SCHEMA), stats, descriptions)


def _num_blocks(sizes: list[int]) -> int:
    """Files per block: blocks of about READ_BLOCK_BYTES, at least one per CPU of the cluster
    (parsing runs in parallel), at most one per file."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(len(sizes), max(cpus, math.ceil(sum(sizes) / READ_BLOCK_BYTES))))


def _arrow(ds: Any, schema: pa.Schema) -> pa.Table:
    """A (small) dataset as one Arrow table with a known schema, also when it is empty."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
