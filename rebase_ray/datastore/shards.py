"""One datastore shard from its staged cells: cells.parquet, vectors.npy, basis.npy and
index.faiss (dataset-aware: see `datastore.index`) with their checksums, built by one Ray task
per shard (step 4 of the build, `datastore.stage`)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from rebase_ray.config import IndexConfig, S3Config
from rebase_ray.datastore.embed import VECTOR, column_vectors
from rebase_ray.datastore.index import (
    build_index,
    choose_factory,
    dataset_basis,
    search_params,
    with_datasets,
)
from rebase_ray.runtime import resolve_resources
from rebase_ray.sources import CELL_COLUMNS, CELL_SCHEMA
from rebase_ray.storage import Storage

SORT = [("dataset", "ascending"), ("row_idx", "ascending"), ("column", "ascending")]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def read_partition(st: Storage, staging: str, shard: int) -> pa.Table | None:
    folder = st.join(staging, f"shard={shard}")
    if not st.exists(folder):
        return None
    return pa.concat_tables([st.read_parquet(f) for f in st.glob(folder)
                             if f.endswith(".parquet")])


def build_shards(st: Storage, out: str, s3: S3Config | None, staging: str, ids: list[int],
                  count: int, group: str, dim: int, described: dict[str, np.ndarray],
                  cfg: IndexConfig) -> tuple[list[dict], dict]:
    """The shards of `ids`, built by `cfg.build.actors` Ray tasks at a time (resolved from the
    free CPUs), and the resolved resources."""
    import ray

    pool = resolve_resources(cfg.build, most=len(ids))
    task = ray.remote(build_shard).options(num_cpus=pool.cpus)
    described = ray.put(described)
    waiting = list(ids)
    pending, built = [], []
    with tqdm(total=len(ids), desc="shard indexes", unit="shard", leave=False) as bar:
        while waiting or pending:
            while waiting and len(pending) < pool.actors:
                pending.append(task.remote(out, s3, staging, waiting.pop(0), count, group, dim,
                                           described, cfg, pool.threads))
            ready, pending = ray.wait(pending, num_returns=1)
            built.append(ray.get(ready[0]))
            bar.update(1)
    return built, pool.summary()


def build_shard(out: str, s3: S3Config | None, staging: str, i: int, count: int, group: str,
                dim: int, described: dict[str, np.ndarray], cfg: IndexConfig,
                threads: int = 1) -> dict:
    """One shard (a Ray task): staged cells+vectors → cells.parquet, vectors.npy, basis.npy,
    index.faiss in a fixed row order (dataset, row_idx, column) that is also the FAISS id
    order. `described`: the description vector of every source of the group."""
    import faiss

    faiss.omp_set_num_threads(threads)
    st = Storage.for_uri(out, s3)
    table = read_partition(st, staging, i)
    if table is None or table.num_rows == 0:
        cells = CELL_SCHEMA.empty_table()
        vectors = np.zeros((0, dim), np.float32)
        rows = 0
    else:
        table = table.sort_by(SORT)
        # a cell staged twice (a killed run's last write landing after its rerun read the
        # staging folder) is kept once: its copies sit side by side in this order
        ids = table["cell_id"].to_numpy(zero_copy_only=False)
        if len(ids) > 1 and (ids[1:] == ids[:-1]).any():
            table = table.filter(pa.array(np.r_[True, ids[1:] != ids[:-1]]))
        cells = table.select(CELL_COLUMNS).cast(CELL_SCHEMA)
        vectors = column_vectors(table[VECTOR])
        rows = len(set(table["row_key"].to_pylist()))
    basis, coords = _dataset_coords(cells, described, dim, cfg.dataset_dims)
    factory = choose_factory(len(vectors), dim + basis.shape[1], cfg) if len(vectors) else "Flat"
    index = build_index(with_datasets(vectors, coords), factory, cfg.train_sample)
    folder = st.join(out, "shards", shard_name(i))
    blobs = {"index.faiss": faiss.serialize_index(index).tobytes(),
             "vectors.npy": npy_bytes(vectors), "basis.npy": npy_bytes(basis)}
    files = {f"shards/{shard_name(i)}/cells.parquet": {
        "sha256": st.write_parquet(st.join(folder, "cells.parquet"), cells),
        "bytes": st.size(st.join(folder, "cells.parquet"))}}
    for name, data in blobs.items():
        files[f"shards/{shard_name(i)}/{name}"] = {
            "sha256": st.write_bytes(st.join(folder, name), data), "bytes": len(data)}
    entry = {"id": i, "name": shard_name(i), "group": group, "of": count,
             "cells": len(vectors), "rows": rows, "factory": factory,
             "dataset_dims": int(basis.shape[1]),
             "search_params": search_params(factory, len(vectors)), "files": files}
    st.write_json(st.join(folder, "shard.json"), entry)
    return entry


def _dataset_coords(cells: pa.Table, described: dict[str, np.ndarray], dim: int,
                    max_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """The basis of the shard's source descriptions and each cell's coordinates in it."""
    encoded = pc.dictionary_encode(cells["dataset"]).combine_chunks()
    names, codes = encoded.dictionary.to_pylist(), encoded.indices.to_numpy()
    vectors = np.stack([described[n] for n in names]) if names else np.zeros((0, dim))
    basis = dataset_basis(vectors, max_dims)
    return basis, (vectors @ basis).astype(np.float32)[codes]


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of a .npy file."""
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
