"""Embedding throughput: the datastore's Ray Data actor-pool pipeline vs one plain process
calling sentence-transformers `encode`, on the same real cells (BIG-bench corpus).

    .venv/bin/python benchmarks/embed_throughput.py [--cells 20000] [--quick]

Prints cells/s for both and the ratio (goal ≥ 0.8x); writes benchmarks/results/
embed_throughput.json (`--quick`: embed_throughput_quick.json). The Ray timing covers the
whole pipeline run (actor start and model load included, `ray.init` excluded); the baseline
times `encode` alone. The vectors are cached for benchmarks/index_build.py.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from rebase_ray.config import IndexConfig, Resources, SourceConfig
from rebase_ray.models import cache_dir
from rebase_ray.sources import parse_file

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "data" / "corpora" / "bigbench_subset" / "benchmark_tasks"
RESULTS = REPO / "benchmarks" / "results"


def real_cells(n: int, max_chars: int = 2000) -> list[str]:
    """n non-empty cell values, stride-sampled over every BIG-bench task in the corpus."""
    values: list[str] = []
    for path in sorted(CORPUS.rglob("task.json")):
        source = SourceConfig(name="bb", path=str(path), format="bigbench")
        parsed = parse_file(source, str(path), path.read_bytes())
        values += [v[:max_chars] for _, row in parsed.rows for v in row.values() if v.strip()]
    step = len(values) / n
    return [values[int(i * step)] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true",
                    help="2,000 cells (results in embed_throughput_quick.json)")
    ap.add_argument("--batch-size", type=int, default=2048, help="rows per Ray Data batch")
    args = ap.parse_args()
    n = 2_000 if args.quick else args.cells
    threads = os.cpu_count() or 1
    texts = real_cells(n)
    print(f"{n} real cells from {CORPUS}")

    import torch

    from rebase_ray.datastore.embed import column_vectors, embed_dataset, embed_plan
    from rebase_ray.datastore.encoders import TorchEncoder

    torch.set_num_threads(threads)
    encoder = TorchEncoder("bundled:minilm", "cpu")
    t = time.perf_counter()
    base_vectors = encoder.encode(texts, 64)
    base_s = time.perf_counter() - t
    del encoder
    print(f"plain encode: {base_s:.1f}s, {n / base_s:.0f} cells/s")

    import pyarrow as pa
    import ray

    ray.init(num_cpus=threads, log_to_driver=False)
    cfg = IndexConfig(batch_size=args.batch_size, encode_batch_size=64, backend="torch",
                      resources=Resources(actors=1, cpus=1, threads=threads))
    ds = ray.data.from_arrow(pa.table({"cell_id": [str(i) for i in range(n)], "value": texts}))
    t = time.perf_counter()
    pool = embed_plan(cfg, n)
    table = pa.concat_tables(ray.get(embed_dataset(ds, cfg, pool).materialize().to_arrow_refs()))
    ray_s = time.perf_counter() - t
    ray.shutdown()
    order = np.argsort(np.array(table["cell_id"].to_pylist(), dtype=np.int64))
    ray_vectors = column_vectors(table["vector"])[order]
    agree = float(np.min(np.sum(ray_vectors * base_vectors, axis=1)))
    ratio = base_s / ray_s
    print(f"ray data pipeline: {ray_s:.1f}s, {n / ray_s:.0f} cells/s "
          f"(1 actor, {threads} threads, batch {args.batch_size})")
    print(f"ratio ray/plain throughput: {ratio:.2f}x (goal >= 0.8x); "
          f"min cosine between the two embeddings of a cell: {agree:.5f}")

    np.save(cache_dir() / f"bench-bigbench-{n}.npy", base_vectors)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"cells": n, "threads": threads, "plain_s": round(base_s, 2),
              "plain_cells_per_s": round(n / base_s, 1), "ray_s": round(ray_s, 2),
              "ray_cells_per_s": round(n / ray_s, 1), "ratio": round(ratio, 3),
              "batch_size": args.batch_size, "min_cosine_agreement": agree,
              "load_avg_1m": os.getloadavg()[0]}
    name = "embed_throughput_quick.json" if args.quick else "embed_throughput.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
