"""Build a datastore: sources → cells → embeddings → sharded FAISS indexes on storage.

1. Sources whose shards are already built and intact (same build config, same source
   fingerprints, checksums verified) are kept; the others form this run's *group*.
2. The group's sources are counted (`rebase_ray.sources.read_sources`, the first of the two
   Ray Data passes: rows, cells, rejects and descriptions), which fixes the shard count.
3. The second pass streams: the files are parsed into cells, each row assigned to one of the
   group's shards by the hash of its row key (a row never spans shards); cells of shards not
   finished yet (a crashed run leaves finished shards with their `shard.json`) and the
   sources' descriptions are embedded by an actor pool and staged as Parquet partitioned by
   shard, one file per embedded block and shard as each block finishes. The staging folder
   is keyed by what the embeddings depend on (`staging_key`), so a rerun of a build that died
   while embedding reads the pieces already there (a piece cut short by the kill has no
   Parquet footer and is deleted) and embeds only the cells and descriptions that are
   missing.
4. One Ray task per shard (`datastore.shards`) sorts its cells, writes cells.parquet, vectors.npy, basis.npy (the
   basis of its sources' descriptions) and index.faiss (dataset-aware: see
   `datastore.index`) and their checksums.
5. sources.parquet, rejects.parquet and, last, manifest.json are written.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rebase_ray.config import IndexConfig, S3Config, SourceConfig, config_hash
from rebase_ray.datastore.embed import (
    VECTOR,
    column_vectors,
    embed_dataset,
    embed_plan,
    encode_batch_size,
)
from rebase_ray.datastore.encoders import resolve_backend
from rebase_ray.datastore.shards import build_shards, read_partition, shard_name
from rebase_ray.datastore.store import FORMAT_VERSION
from rebase_ray.runtime import init_ray
from rebase_ray.sources import (
    CELL_COLUMNS,
    CELL_SCHEMA,
    REJECT_SCHEMA,
    fingerprint,
    list_files,
    read_sources,
    row_hash,
)
from rebase_ray.storage import ChecksumError, Storage, StorageError, open_storage

SOURCES_SCHEMA = pa.schema([("name", pa.string()), ("description", pa.string()),
                            ("vector", pa.list_(pa.float32())), ("domain", pa.string()),
                            ("license", pa.string()), ("rows", pa.int64()),
                            ("cells", pa.int64())])
DESCRIPTIONS = -1  # the staging partition that carries the source descriptions
STAGING = "_staging"


class AssignShard:
    """Ray Data batch function: a `shard` column from the row key; drops the cells of finished
    shards and those already embedded (`embedded`: sorted `cell_numbers` of staged cells)."""

    def __init__(self, base: int, count: int, finished: set[int],
                 embedded: np.ndarray | None = None):
        self.base, self.count, self.finished = base, count, finished
        self.embedded = embedded if embedded is not None else np.zeros(0, np.uint64)

    def __call__(self, batch: pa.Table) -> pa.Table:
        shards = [self.base + row_hash(k) % self.count for k in batch["row_key"].to_pylist()]
        batch = batch.append_column("shard", pa.array(shards, pa.int64()))
        keep = np.array([s not in self.finished for s in shards], bool)
        if len(self.embedded) and batch.num_rows:
            ids = cell_numbers(batch["cell_id"].to_pylist())
            at = np.minimum(np.searchsorted(self.embedded, ids), len(self.embedded) - 1)
            keep &= self.embedded[at] != ids
        return batch.filter(pa.array(keep)) if not keep.all() else batch


def cell_numbers(cell_ids: list[str]) -> np.ndarray:
    """Cell ids (16 hex digits) as uint64: a compact set of millions of staged cells."""
    return np.frombuffer(bytes.fromhex("".join(cell_ids)), ">u8").astype(np.uint64)


def staging_key(cfg: IndexConfig, fingerprints: list[str], base: int, count: int) -> str:
    """What staged embeddings depend on: the embedding config (`IndexConfig.embed_hash`), the
    sources' fingerprints (which cells, their text) and the shard layout (their partition)."""
    return config_hash(cfg.embed_hash(), sorted(fingerprints), base, count)


def run(sources: list[SourceConfig], out: str, cfg: IndexConfig,
        s3: S3Config | None = None, force: bool = False) -> dict:
    """Build (or complete, or extend) the datastore at `out`; returns a summary."""
    start = time.time()
    files = {s.name: list_files(s, s3) for s in sources}  # a source with no file: before Ray
    init_ray(dashboard=False)  # a Ray already up (`run`, a caller) is kept as it is
    st, out = open_storage(out, s3)
    build_hash = cfg.build_hash()
    old = None if force else st.read_manifest(out)
    if old is not None and (old.get("config_hash") != build_hash
                            or old.get("format") != FORMAT_VERSION):
        old = None
    prints = {s.name: fingerprint(s, files[s.name]) for s in sources}
    kept_shards, kept_sources = _intact(st, out, old, prints)
    todo = [s for s in sources if s.name not in kept_sources]
    work = {"cells_embedded": 0, "cells_reused": 0, "descriptions_embedded": 0,
            "shards_built": 0, "shards_resumed": 0, "shards_kept": len(kept_shards)}

    shards = list(kept_shards)
    source_rows = _old_table(st, out, old, "sources.parquet", SOURCES_SCHEMA, kept_sources,
                             "name")
    rejects = _old_table(st, out, old, "rejects.parquet", REJECT_SCHEMA, kept_sources, "source")
    stats = {name: {**old["sources"][name], "status": "kept"} for name in kept_sources}
    dim = old["dim"] if kept_sources else None
    if todo:
        group = config_hash(build_hash, sorted(prints[s.name] for s in todo))
        read = read_sources(todo, cfg, s3, files)
        total = sum(v["cells"] for v in read.stats.values())
        count = cfg.shards or max(1, math.ceil(total / cfg.target_shard_cells))
        base = max((s["id"] for s in kept_shards), default=-1) + 1
        finished = {}
        for i in range(base, base + count) if not force else ():
            entry = _finished_shard(st, out, i, group, count)
            if entry is not None:
                finished[i] = entry
        todo_ids = [i for i in range(base, base + count) if i not in finished]
        staging = _staging(st, out, staging_key(cfg, [prints[s.name] for s in todo], base,
                                                count), force)
        staged = _staged_pieces(st, staging, set(todo_ids))
        missing = total - sum(e["cells"] for e in finished.values()) - len(staged.cells)
        undescribed = [s for s in todo if s.name not in staged.described]
        parts = []
        if missing > 0:  # in pieces of piece_cells (a streaming split, not a pass of its own)
            parts.append(read.cells.map_batches(
                AssignShard(base, count, set(finished), staged.cells), batch_format="pyarrow"
            ).repartition(target_num_rows_per_block=cfg.piece_cells))
        if undescribed:
            parts.append(_descriptions(undescribed, read.descriptions))
        if parts:  # one streaming pass: embedded blocks are written as they finish
            to_embed = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
            pool = embed_plan(cfg, max(missing, 0) + len(undescribed))
            work["resources"] = pool.summary()
            # auto's choice is made here, before the pipeline runs: timed on a quiet machine
            work["backend"] = resolve_backend(cfg.backend, "cuda" if pool.gpus else "cpu",
                                              cfg.embedder, pool.threads)
            work["encode_batch_size"] = encode_batch_size(cfg, pool)
            embed_dataset(to_embed, cfg.model_copy(update={"backend": work["backend"]}),
                          pool).write_parquet(
                st.path(staging), filesystem=st.pa_fs, partition_cols=["shard"])
        new = _staged_pieces(st, staging, set(todo_ids), prior=staged)
        desc = read_partition(st, staging, DESCRIPTIONS)
        dim = int(desc[VECTOR].type.list_size)
        described = dict(zip(desc["dataset"].to_pylist(), column_vectors(desc[VECTOR])))
        built, work["build_resources"] = build_shards(
            st, out, s3, staging, todo_ids, count, group, dim, described, cfg)
        indexed = sum(s["cells"] for s in [*finished.values(), *built])
        if indexed != total:  # staged pieces that don't match the sources: never published
            raise StorageError(f"{out}: the shards hold {indexed} cells, the sources give "
                               f"{total}; rebuild with --force")
        st.delete(st.join(out, STAGING), recursive=True)
        shards += sorted([*finished.values(), *built], key=lambda s: s["id"])
        work["cells_embedded"] = new.num_cells
        work["cells_reused"] = len(staged.cells)
        work["descriptions_embedded"] = len(new.described)
        work["shards_built"] = len(built)
        work["shards_resumed"] = len(finished)
        source_rows = pa.concat_tables([source_rows, _source_table(todo, read, described)])
        rejects = pa.concat_tables([rejects, read.rejects])
        for s in todo:
            stats[s.name] = {**read.stats[s.name], "fingerprint": prints[s.name],
                             "group": group, "status": "built"}
    if dim is None:
        raise StorageError(f"nothing to build into {out}: no sources given")

    top_files = {"sources.parquet": _write(st, out, "sources.parquet", source_rows),
                 "rejects.parquet": _write(st, out, "rejects.parquet", rejects)}
    _remove_stale_shards(st, out, {shard_name(s["id"]) for s in shards})
    manifest = {
        "format": FORMAT_VERSION, "embedder": cfg.embedder, "dim": dim, "metric": "ip",
        "config_hash": build_hash, "index_config": cfg.model_dump(mode="json"),
        "shards": shards, "files": top_files,
        "sources": {name: {k: v for k, v in stats[name].items() if k != "status"}
                    for name in sorted(stats)},
        "written_at": time.time(),
    }
    st.write_json(st.join(out, "manifest.json"), manifest)
    return _summary(out, manifest, stats, work, time.time() - start)


# ----------------------------------------------------------------------------- resume


def _intact(st: Storage, out: str, old: dict | None, prints: dict[str, str]
            ) -> tuple[list[dict], set[str]]:
    """Shards (and their sources) from the previous build that can be kept as they are: every
    source of their group is unchanged and every file matches its checksum."""
    if old is None:
        return [], set()
    groups: dict[str, list[str]] = {}
    for name, entry in old["sources"].items():
        groups.setdefault(entry["group"], []).append(name)
    shards, names = [], set()
    for group, members in groups.items():
        if not all(prints.get(n) == old["sources"][n]["fingerprint"] for n in members):
            continue
        mine = [s for s in old["shards"] if s["group"] == group]
        if all(_verified(st, out, s) for s in mine):
            shards += mine
            names.update(members)
    return shards, names


def _verified(st: Storage, out: str, entry: dict) -> bool:
    try:
        st.verify(out, {"files": entry["files"]})
    except ChecksumError:
        return False
    return True


def _finished_shard(st: Storage, out: str, i: int, group: str, count: int) -> dict | None:
    """The entry of a shard that an interrupted run of the same group already finished."""
    uri = st.join(out, "shards", shard_name(i), "shard.json")
    if not st.exists(uri):
        return None
    entry = st.read_json(uri)
    if entry.get("group") != group or entry.get("of") != count:
        return None
    return entry if _verified(st, out, entry) else None


def _old_table(st: Storage, out: str, old: dict | None, name: str, schema: pa.Schema,
               keep: set[str], column: str) -> pa.Table:
    if old is None or not keep:
        return schema.empty_table()
    st.verify(out, {"files": {name: old["files"][name]}})
    table = st.read_parquet(st.join(out, name)).cast(schema)
    mask = [v in keep for v in table[column].to_pylist()]
    return table.filter(pa.array(mask, pa.bool_()))


def _remove_stale_shards(st: Storage, out: str, names: set[str]) -> None:
    for uri in st.ls(st.join(out, "shards")):
        if uri.rstrip("/").rsplit("/", 1)[-1] not in names:
            st.delete(uri, recursive=True)


# ----------------------------------------------------------------------------- staging


def _staging(st: Storage, out: str, key: str, force: bool) -> str:
    """This build's staging folder, `_staging/<key>`. Other keys' folders (a build of other
    sources, shards or embedding config that died) can't serve this one and are deleted, as
    is this key's on --force."""
    root = st.join(out, STAGING)
    staging = st.join(root, key)
    for uri in st.ls(root):
        if force or uri.rstrip("/").rsplit("/", 1)[-1] != key:
            st.delete(uri, recursive=True)
    return staging


@dataclass
class Staged:
    """The complete pieces of a staging folder (for the shards asked about)."""

    files: set[str] = field(default_factory=set)
    cells: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # sorted
    num_cells: int = 0
    described: set[str] = field(default_factory=set)  # sources whose description is staged


def _staged_pieces(st: Storage, staging: str, shards: set[int],
                   prior: Staged | None = None) -> Staged:
    """The staged pieces of `shards` and of the descriptions' partition.

    Before embedding (`prior` None): the complete pieces, with their cells' ids. A piece is
    complete when its Parquet footer reads and it has the vector column: Ray Data writes a
    piece in one go, footer last, so one cut short by a kill has none; it is deleted and its
    cells embedded again. After embedding: the pieces not in `prior` (this run's), counted
    from their footers; here any unreadable piece is an error."""
    found = Staged()
    numbers = []
    for folder in st.ls(staging, "shard=*"):
        shard = int(folder.rstrip("/").rsplit("=", 1)[-1])
        if shard != DESCRIPTIONS and shard not in shards:
            continue
        for uri in st.ls(folder, "*.parquet"):
            if prior is not None and uri in prior.files:
                continue
            try:
                with st.pa_fs.open_input_file(st.path(uri)) as fh:
                    piece = pq.ParquetFile(fh)
                    if VECTOR not in piece.schema_arrow.names:
                        raise ValueError(f"staged piece {uri} has no {VECTOR} column")
                    if shard == DESCRIPTIONS:
                        column = piece.read(columns=["dataset"])["dataset"]
                        found.described.update(column.to_pylist())
                    else:
                        found.num_cells += piece.metadata.num_rows
                        if prior is None:
                            column = piece.read(columns=["cell_id"])["cell_id"]
                            numbers.append(cell_numbers(column.to_pylist()))
            except ValueError:  # pa.ArrowInvalid too: no footer
                if prior is not None:
                    raise
                st.delete(uri)
                continue
            found.files.add(uri)
    if numbers:
        found.cells = np.unique(np.concatenate(numbers))
    return found


# ----------------------------------------------------------------------------- build


def _descriptions(sources: list[SourceConfig], descriptions: dict[str, str]):
    """Descriptions ride along with the cells through the embedding actors (partition -1)."""
    import ray

    rows: dict[str, list] = {name: [None] * len(sources)
                             for name in [*CELL_COLUMNS, "row_key"]}
    rows["dataset"] = [s.name for s in sources]
    rows["value"] = [descriptions[s.name] or s.name for s in sources]
    rows["row_idx"] = [-1] * len(sources)
    rows["shard"] = [DESCRIPTIONS] * len(sources)
    schema = CELL_SCHEMA.append(pa.field("row_key", pa.string())).append(
        pa.field("shard", pa.int64()))
    return ray.data.from_arrow(pa.table(rows, schema=schema))


def _source_table(sources: list[SourceConfig], read: Any,
                  vectors: dict[str, np.ndarray]) -> pa.Table:
    return pa.table({
        "name": [s.name for s in sources],
        "description": [read.descriptions[s.name] for s in sources],
        "vector": [vectors[s.name].tolist() for s in sources],
        "domain": [s.domain for s in sources],
        "license": [s.license for s in sources],
        "rows": [read.stats[s.name]["rows"] for s in sources],
        "cells": [read.stats[s.name]["cells"] for s in sources],
    }, schema=SOURCES_SCHEMA)


def _write(st: Storage, out: str, name: str, table: pa.Table) -> dict:
    uri = st.join(out, name)
    return {"sha256": st.write_parquet(uri, table), "bytes": st.size(uri)}


def _summary(out: str, manifest: dict, stats: dict, work: dict, wall: float) -> dict:
    factories = Counter(s["factory"] for s in manifest["shards"])
    return {
        "datastore": out,
        "embedder": manifest["embedder"],
        "dim": manifest["dim"],
        "sources": [{"source": name, "rows": v["rows"], "cells": v["cells"],
                     "rejects": v["rejects"], "status": v["status"]}
                    for name, v in sorted(stats.items())],
        "shards": len(manifest["shards"]),
        "index": ", ".join(f"{f} x{n}" for f, n in sorted(factories.items())),
        "cells": sum(s["cells"] for s in manifest["shards"]),
        "rejects": sum(v["rejects"] for v in stats.values()),
        **work,
        "wall_s": round(wall, 2),
        "cells_per_s": round(work["cells_embedded"] / wall, 1) if wall > 0 else 0.0,
    }
