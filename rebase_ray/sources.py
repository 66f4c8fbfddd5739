"""Source readers: the files named in sources.yaml → rows → cells, as Ray Data datasets.

A source is a local path, a glob or an s3:// URI holding csv, jsonl, json (a list of records),
parquet or BIG-bench style task.json files (their `examples`; the task's `description`
becomes the source description when sources.yaml gives none).

Two Ray Data passes:
1. `parse`: one task per file turns it into rows (a JSON record of text values per row) plus
   rejects and a per-file row count.
2. `to_cells`: rows get their index in the source (files in sorted order), `max_rows` keeps a
   stride sample, and every non-empty (row, column) value becomes one cell.

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
from dataclasses import dataclass
from typing import Any

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
# One output table for the parse pass: kind is "row", "reject" or "count" (one per file).
PARSED_SCHEMA = pa.schema([("kind", pa.string()), ("source", pa.string()),
                           ("file_idx", pa.int64()), ("pos", pa.int64()),
                           ("record", pa.string()), ("location", pa.string()),
                           ("reason", pa.string()), ("description", pa.string())])
# ... and for the cells pass: kind is "cell" or "reject".
CELLS_OR_REJECTS = pa.schema([("kind", pa.string()), *CELL_SCHEMA, ("row_key", pa.string()),
                              ("source", pa.string()), ("location", pa.string()),
                              ("reason", pa.string())])
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


class ParseFiles:
    """Ray Data batch function: file descriptors → parsed rows, rejects and counts."""

    def __init__(self, sources: dict[str, SourceConfig], s3: S3Config | None):
        self.sources = sources
        self.s3 = s3

    def __call__(self, batch: dict) -> pa.Table:
        out: dict[str, list] = {name: [] for name in PARSED_SCHEMA.names}

        def emit(**kw: Any) -> None:
            for name, values in out.items():
                values.append(kw.get(name))

        for name, uri, file_idx in zip(batch["source"], batch["uri"], batch["file_idx"]):
            source = self.sources[name]
            try:
                data = Storage.for_uri(uri, self.s3).read_bytes(uri)
            except (OSError, StorageError) as exc:
                parsed = Parsed([], [(uri, f"unreadable: {exc}")])
            else:
                parsed = parse_file(source, uri, data)
            if source.columns and parsed.rows:
                present = set().union(*(r.keys() for _, r in parsed.rows))
                for col in source.columns:
                    if col not in present:
                        emit(kind="reject", source=name, location=uri,
                             reason=f"missing column {col!r}")
            for pos, (location, record) in enumerate(parsed.rows):
                if source.columns:
                    record = {c: record[c] for c in source.columns if c in record}
                emit(kind="row", source=name, file_idx=int(file_idx), pos=pos,
                     record=json.dumps(record, ensure_ascii=False), location=location)
            for location, reason in parsed.rejects:
                emit(kind="reject", source=name, location=location, reason=reason)
            emit(kind="count", source=name, file_idx=int(file_idx), pos=len(parsed.rows),
                 description=parsed.description)
        return pa.table(out, schema=PARSED_SCHEMA)


def stride_sample(n: int, max_rows: int | None) -> set[int] | None:
    """Row indices kept by `max_rows` (evenly spaced over the n rows); None keeps all."""
    if max_rows is None or n <= max_rows:
        return None
    step = n / max_rows
    return {int(i * step) for i in range(max_rows)}


class ToCells:
    """Ray Data batch function: parsed rows → cells (and rejects for over-long values)."""

    def __init__(self, sources: dict[str, SourceConfig], offsets: dict[tuple[str, int], int],
                 keep: dict[str, set[int] | None], cfg: IndexConfig):
        self.sources = sources
        self.offsets = offsets
        self.keep = keep
        self.max_chars = cfg.max_value_chars
        self.reject_chars = cfg.reject_value_chars

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {name: [] for name in CELLS_OR_REJECTS.names}
        for name, file_idx, pos, record, location in zip(
                *(batch[c].to_pylist() for c in ("source", "file_idx", "pos", "record",
                                                  "location"))):
            idx = self.offsets[(name, file_idx)] + pos
            keep = self.keep[name]
            if keep is not None and idx not in keep:
                continue
            src = self.sources[name]
            key = row_key(name, src.config, src.split, idx)
            for column, value in json.loads(record).items():
                if not value.strip():
                    continue
                row = dict.fromkeys(out)
                if len(value) > self.reject_chars:
                    row.update(kind="reject", source=name, location=f"{location}:{column}",
                               reason=f"value of {len(value)} chars is over the "
                                      f"{self.reject_chars}-char limit")
                else:
                    row.update(kind="cell", cell_id=cell_id(name, src.config, src.split, idx,
                                                            column),
                               dataset=name, config=src.config, split=src.split, row_idx=idx,
                               column=column, value=value[:self.max_chars], row_key=key)
                for k, v in row.items():
                    out[k].append(v)
        return pa.table(out, schema=CELLS_OR_REJECTS)


@dataclass
class SourceRead:
    """What reading a set of sources gave: cells (materialized), rejects and per-source stats."""

    cells: Any  # ray.data.Dataset with CELL_COLUMNS + row_key
    rejects: pa.Table
    stats: dict[str, dict]  # name → files, rows, cells, rejects
    descriptions: dict[str, str]


def read_sources(sources: list[SourceConfig], cfg: IndexConfig,
                 s3: S3Config | None = None, files: dict[str, list[dict]] | None = None
                 ) -> SourceRead:
    """Read sources into a materialized Ray Dataset of cells (plus rejects and counts)."""
    import ray
    from ray.data.expressions import col

    by_name = {s.name: s for s in sources}
    files = files or {s.name: list_files(s, s3) for s in sources}
    items = [{"source": s.name, "uri": f["uri"], "file_idx": k}
             for s in sources for k, f in enumerate(files[s.name])]
    stats = {s.name: {"files": len(files[s.name]), "rows": 0, "cells": 0, "rejects": 0}
             for s in sources}
    parsed = (ray.data.from_items(items, override_num_blocks=max(1, len(items)))
              .map_batches(ParseFiles(by_name, s3), batch_size=1, batch_format="numpy")
              .materialize())
    meta = _arrow(parsed.filter(expr=col("kind") != "row"), PARSED_SCHEMA).to_pandas()
    counts = meta[meta["kind"] == "count"].sort_values(["source", "file_idx"])
    offsets: dict[tuple[str, int], int] = {}
    totals: dict[str, int] = dict.fromkeys(by_name, 0)
    descriptions = {s.name: s.description for s in sources}
    for rec in counts.itertuples():
        offsets[(rec.source, int(rec.file_idx))] = totals[rec.source]
        totals[rec.source] += int(rec.pos)
        if not descriptions[rec.source] and rec.description:
            descriptions[rec.source] = rec.description
    keep = {name: stride_sample(totals[name], by_name[name].max_rows) for name in by_name}
    for name in by_name:
        stats[name]["rows"] = totals[name] if keep[name] is None else len(keep[name])

    both = (parsed.filter(expr=col("kind") == "row")
            .map_batches(ToCells(by_name, offsets, keep, cfg), batch_format="pyarrow")
            .materialize())
    cells = both.filter(expr=col("kind") == "cell").select_columns(
        [*CELL_COLUMNS, "row_key"]).materialize()
    reject_table = pa.concat_tables([
        _arrow(parsed.filter(expr=col("kind") == "reject"), PARSED_SCHEMA).select(REJECT_SCHEMA.names),
        _arrow(both.filter(expr=col("kind") == "reject"), CELLS_OR_REJECTS).select(REJECT_SCHEMA.names),
    ]).cast(REJECT_SCHEMA)
    for name, n in _count(cells, "dataset").items():
        stats[name]["cells"] = n
    for name in reject_table["source"].to_pylist():
        stats[name]["rejects"] += 1
    return SourceRead(cells, reject_table, stats, descriptions)


def _arrow(ds: Any, schema: pa.Schema) -> pa.Table:
    """A (small) dataset as one Arrow table with a known schema, also when it is empty."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


def _count(ds: Any, column: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for batch in ds.select_columns([column]).iter_batches(batch_format="pyarrow",
                                                           batch_size=None):
        for item in pc.value_counts(batch[column]).to_pylist():
            found[item["values"]] = found.get(item["values"], 0) + item["counts"]
    return found
