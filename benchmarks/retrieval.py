"""Retrieval: rebase-ray (sharded dataset-aware FAISS on Ray actors + exact rescoring of
candidate rows) vs ReBase-style exhaustive torch cosine over every cell with the same
scoring, in one run.

    .venv/bin/python benchmarks/retrieval.py [--cells 1000000] [--shards 2] [--quick]

Scale vectors: embedding 1M texts takes about an hour on this CPU, so the cells are real
BIG-bench cell embeddings (cached by benchmarks/embed_throughput.py) repeated with Gaussian
noise and re-normalised, as in benchmarks/index_build.py; rows have 2 cells, over 20 source
datasets. The datastore is written directly in the on-storage layout (cells.parquet,
vectors.npy, basis.npy, index.faiss per shard, sources.parquet, manifest.json) with the
datastore's own index functions, not through Ray Data embedding, and cached for benchmarks/retriever_endpoint.py.
Queries are real held-out cells: per task 1 instruction, 3 few-shot inputs, 3 outputs. Both
sides start from the same query vectors (embedding the query costs the same for both).

Prints median seconds per query for both, the speed ratio and recall@100 of the top rows
(goal ≥ 20x at recall ≥ 0.95); writes benchmarks/results/retrieval.json. rebase-ray is timed
twice per task: its first query (the index lists and vectors it touches are cold in the
shard actors' memory maps) and the same query repeated (warm, as in a long-running
endpoint). The exhaustive baseline runs after them, alone, on vectors held in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from index_build import real_vectors, scale

from rebase_ray.config import IndexConfig, Resources, RetrieveConfig, config_hash
from rebase_ray.datastore.index import build_index, dataset_basis, with_datasets
from rebase_ray.datastore.shards import npy_bytes, shard_name
from rebase_ray.datastore.stage import SOURCES_SCHEMA
from rebase_ray.datastore.store import FORMAT_VERSION
from rebase_ray.models import cache_dir
from rebase_ray.retrieve.queries import Query
from rebase_ray.sources import CELL_SCHEMA
from rebase_ray.storage import Storage

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = 20
CELLS_PER_ROW = 2


def bench_datastore(cells: int, shards: int, factory: str, nprobe: int, sigma: float) -> str:
    """A datastore of `cells` scale vectors in the on-storage layout (cached)."""
    out = cache_dir() / (f"bench-retrieval-v{FORMAT_VERSION}-{cells}-{shards}-"
                         f"{factory.replace(',', '_')}")
    if (out / "manifest.json").exists():
        return str(out)
    st = Storage("file")
    real = real_vectors(2_000)
    base = real[500:]  # 0..499 are held out for queries
    vectors = scale(base, cells, sigma)
    desc = scale(real[:DATASETS], DATASETS, sigma, seed=1)
    rows = cells // CELLS_PER_ROW
    row_of = np.arange(cells) // CELLS_PER_ROW
    bounds = np.linspace(0, rows, shards + 1).astype(int) * CELLS_PER_ROW
    basis = dataset_basis(desc, IndexConfig().dataset_dims)  # every shard holds every dataset
    entries = []
    for i in range(shards):
        a, b = bounds[i], bounds[i + 1]
        r = row_of[a:b]
        # each shard holds every dataset, its cells in (dataset, row, column) order
        code = (r - r[0]) * DATASETS // (r[-1] - r[0] + 1)
        cells_table = pa.table({
            "cell_id": pa.array([f"c{j}" for j in range(a, b)]),
            "dataset": pa.array([f"bench{d:02d}" for d in code]),
            "config": pa.array(["default"] * (b - a)), "split": pa.array(["train"] * (b - a)),
            "row_idx": pa.array(r, pa.int64()),
            "column": pa.array(["input" if j % 2 == 0 else "output" for j in range(a, b)]),
            "value": pa.array([f"text of cell {j}" for j in range(a, b)])}, schema=CELL_SCHEMA)
        t = time.perf_counter()
        index = build_index(with_datasets(vectors[a:b], (desc @ basis)[code]), factory, 60_000)
        print(f"shard {i}: {b - a} cells, {factory} built in {time.perf_counter() - t:.0f}s")
        folder = st.join(str(out), "shards", shard_name(i))
        files = {}
        for name, data in (("index.faiss", faiss.serialize_index(index).tobytes()),
                           ("vectors.npy", npy_bytes(vectors[a:b])),
                           ("basis.npy", npy_bytes(basis))):
            files[f"shards/{shard_name(i)}/{name}"] = {
                "sha256": st.write_bytes(st.join(folder, name), data), "bytes": len(data)}
        uri = st.join(folder, "cells.parquet")
        files[f"shards/{shard_name(i)}/cells.parquet"] = {
            "sha256": st.write_parquet(uri, cells_table), "bytes": st.size(uri)}
        entries.append({"id": i, "name": shard_name(i), "cells": b - a,
                        "rows": (b - a) // CELLS_PER_ROW, "factory": factory,
                        "dataset_dims": int(basis.shape[1]),
                        "search_params": f"nprobe={nprobe}" if "IVF" in factory else "",
                        "files": files})
    sources = pa.table({
        "name": [f"bench{d:02d}" for d in range(DATASETS)],
        "description": [f"benchmark source {d}" for d in range(DATASETS)],
        "vector": [v.tolist() for v in desc], "domain": [None] * DATASETS,
        "license": [None] * DATASETS, "rows": [rows // DATASETS] * DATASETS,
        "cells": [cells // DATASETS] * DATASETS}, schema=SOURCES_SCHEMA)
    uri = st.join(str(out), "sources.parquet")
    sha = st.write_parquet(uri, sources)
    st.write_json(st.join(str(out), "manifest.json"), {
        "format": FORMAT_VERSION, "embedder": "bundled:minilm", "dim": int(vectors.shape[1]),
        "metric": "ip", "config_hash": config_hash(cells, shards, factory, sigma),
        # the default index settings: queries are embedded as a default build's would be
        # (index.backend auto: the faster of torch and ONNX Runtime on this CPU)
        "index_config": IndexConfig().model_dump(mode="json"),
        "shards": entries, "files": {"sources.parquet": {"sha256": sha, "bytes": st.size(uri)}},
        "sources": {}, "note": "benchmark scale vectors, written by benchmarks/retrieval.py"})
    return str(out)


def tasks(n: int, seed: int = 0) -> list[tuple[np.ndarray, list, list]]:
    """(instruction, 3 inputs, 3 outputs) vectors per task, from held-out real cells."""
    real = real_vectors(2_000)[:500]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pick = rng.choice(len(real), 7, replace=False)
        out.append((real[pick[0]], list(real[pick[1:4]]), list(real[pick[4:]])))
    return out


class Exhaustive:
    """ReBase's reference search: cosine of every cell to every few-shot example (torch),
    mean over examples, max over each row's cells, plus the dataset score, mean of three."""

    def __init__(self, store_uri: str):
        from rebase_ray.datastore import Datastore

        store = Datastore.open(store_uri)
        self.cells = torch.from_numpy(np.concatenate(
            [np.asarray(store.load_vectors(i)) for i in range(store.num_shards)]))
        self.row_of = torch.arange(len(self.cells)) // CELLS_PER_ROW
        self.rows = int(self.row_of[-1]) + 1
        first = [store.load_cells(i).to_pandas().iloc[::CELLS_PER_ROW]
                 for i in range(store.num_shards)]
        first = pd.concat(first, ignore_index=True)
        self.row_key = (first["dataset"] + "/default/train/" + first["row_idx"].astype(str)).to_numpy()
        src = store.sources().to_pandas()
        self.desc = torch.from_numpy(np.stack(src["vector"].map(np.asarray)).astype(np.float32))
        code = {n: i for i, n in enumerate(src["name"])}
        self.row_dataset = torch.from_numpy(first["dataset"].map(code).to_numpy())

    def search(self, instruction, inputs, outputs, top: int) -> list[str]:
        scores = []
        for examples in (inputs, outputs):
            cell = (self.cells @ torch.from_numpy(np.stack(examples)).T).mean(1)
            row = torch.full((self.rows,), -2.0).scatter_reduce(0, self.row_of, cell, "amax")
            scores.append(row)
        ds = (self.desc @ torch.from_numpy(instruction))[self.row_dataset]
        best = torch.topk((scores[0] + scores[1] + ds) / 3, top).indices.numpy()
        return self.row_key[best].tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=2, help="one shard actor per core here")
    ap.add_argument("--factory", default="IVF2048,Flat",
                    help="FAISS factory per shard (HNSW builds too slowly on 2 shared cores)")
    ap.add_argument("--nprobe", type=int, default=24, help="IVF lists probed per query")
    ap.add_argument("--candidates", type=int, default=2000,
                    help="ANN cells per query vector per shard")
    ap.add_argument("--exact", action="store_true", help="RetrieveConfig.exact")
    ap.add_argument("--load", choices=["mmap", "memory"], default="mmap",
                    help="RetrieveConfig.load")
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--top", type=int, default=100, help="rows asked for (and recall@top)")
    ap.add_argument("--sigma", type=float, default=0.02)
    ap.add_argument("--quick", action="store_true", help="100k cells")
    args = ap.parse_args()
    if args.quick:
        args.cells = 100_000
    import ray

    from rebase_ray.retrieve import Retriever

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    uri = bench_datastore(args.cells, args.shards, args.factory, args.nprobe, args.sigma)
    print(f"datastore {uri} ready in {time.perf_counter() - t:.0f}s")
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    params = f"nprobe={args.nprobe}" if "IVF" in args.factory else None
    cfg = RetrieveConfig(top_n=args.top, candidates_per_query=args.candidates,
                         exact=args.exact, load=args.load, resources=Resources(cpus=1 / args.shards),
                         search_params=params)
    t = time.perf_counter()
    retriever = Retriever(uri, cfg)
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    exhaustive = Exhaustive(uri)
    load_s = time.perf_counter() - t
    warm_up, *queries = tasks(args.tasks + 1)
    warm_q = Query(warm_up[0], np.mean(warm_up[1], 0), np.mean(warm_up[2], 0))
    retriever.search(warm_q, args.top)
    first, repeat, found, rescored = [], [], [], []
    for instruction, inputs, outputs in queries:
        q = Query(instruction, np.mean(inputs, 0), np.mean(outputs, 0))
        t = time.perf_counter()
        result = retriever.search(q, args.top)
        first.append(time.perf_counter() - t)
        t = time.perf_counter()
        retriever.search(q, args.top)  # the same query again: its lists and vectors are warm
        repeat.append(time.perf_counter() - t)
        found.append({h["row_key"] for h in result.hits})
        rescored.append(result.candidates)
    retriever.close()
    ray.shutdown()
    # the baseline runs alone afterwards: torch's threads keep spinning after a matmul and
    # would take the cores from the shard actors
    theirs, recalls = [], []
    for (instruction, inputs, outputs), keys in zip(queries, found):
        t = time.perf_counter()
        truth = exhaustive.search(instruction, inputs, outputs, args.top)
        theirs.append(time.perf_counter() - t)
        recalls.append(len(keys & set(truth)) / args.top)
    result = {
        "cells": args.cells, "rows": args.cells // CELLS_PER_ROW, "shards": args.shards,
        "factory": args.factory, "search_params": params, "exact": args.exact,
        "load": args.load,
        "candidates_per_query": args.candidates, "dataset_dims": IndexConfig().dataset_dims,
        "tasks": len(queries), "top": args.top,
        "vectors": "real BIG-bench cell embeddings perturbed with Gaussian noise "
                   f"(sigma {args.sigma}/dim); datastore written directly in the on-storage "
                   "layout, not embedded through Ray Data",
        "rebase_ray_first_s_median": float(np.median(first)),
        "rebase_ray_repeat_s_median": float(np.median(repeat)),
        "exhaustive_torch_s_median": float(np.median(theirs)),
        "speedup_first": float(np.median(theirs) / np.median(first)),
        "speedup_repeat": float(np.median(theirs) / np.median(repeat)),
        "recall_mean": float(np.mean(recalls)), "recall_min": float(min(recalls)),
        "rows_rescored_mean": float(np.mean(rescored)),
        "retriever_open_s": round(open_s, 1), "exhaustive_load_s": round(load_s, 1),
        "load_avg_1m": os.getloadavg()[0],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "retrieval.json" if args.top == 100 else f"retrieval_top{args.top}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"rebase-ray {result['rebase_ray_first_s_median'] * 1000:.1f} ms (a task's first "
          f"query), {result['rebase_ray_repeat_s_median'] * 1000:.1f} ms (repeated) vs "
          f"exhaustive {result['exhaustive_torch_s_median'] * 1000:.1f} ms per query: "
          f"{result['speedup_first']:.1f}x / {result['speedup_repeat']:.1f}x at recall@{args.top} "
          f"{result['recall_mean']:.3f} (goal >= 20x at >= 0.95)")


if __name__ == "__main__":
    main()
