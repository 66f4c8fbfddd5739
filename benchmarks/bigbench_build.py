"""A datastore build over a slice of the whole BIG-bench package, with the projected time for
all of it.

    # the sdist from PyPI (`pip download` refuses it: it declares a file:// dependency)
    curl -LO https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/bigbench-1.0.0.tar.gz
    tar xzf bigbench-1.0.0.tar.gz
    .venv/bin/python benchmarks/bigbench_build.py bigbench-1.0.0/bigbench/benchmark_tasks \
        [--cells 200000] [--out DIR]

Every task.json of the package (1,041 with subtasks) is one source, named after its path.
Each source keeps a stride sample of `max_rows` rows, one cap for all of them, chosen from
the package catalog (../shared/data/corpora/bigbench_subset/full_catalog_bigbench_1.0.0.tsv)
so that the slice holds about `--cells` cells. The build is the real one
(`build_datastore`: Ray Data parsing every file, the embedding actor, the shard index
builds), on this machine's CPUs.

The projection for the whole package scales this build's wall time by package cells / slice
cells: an upper bound, since every file is already parsed in full here (the stride sample
is taken from all its rows) and only the embedding and index work grow with the cells.
Writes benchmarks/results/bigbench_build.json.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from rebase_ray.config import IndexConfig, Resources, SourceConfig

REPO = Path(__file__).resolve().parent.parent
CATALOG = (REPO.parent / "shared" / "data" / "corpora" / "bigbench_subset"
           / "full_catalog_bigbench_1.0.0.tsv")
RESULTS = REPO / "benchmarks" / "results"
CELLS_PER_ROW = 2.0  # first guess (input + target); the build reports the true count


def row_cap(sizes: list[int], rows: int) -> int:
    """The smallest per-source cap m with sum(min(size, m)) >= rows (all of it if less)."""
    lo, hi = 1, max(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(min(s, mid) for s in sizes) >= rows:
            hi = mid
        else:
            lo = mid + 1
    return lo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tasks", type=Path, help="the package's bigbench/benchmark_tasks folder")
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/rebase-ray-bigbench-slice"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    with CATALOG.open() as f:
        catalog = {r["path"]: int(r["n_examples"]) for r in csv.DictReader(f, delimiter="\t")}
    paths = sorted(p.relative_to(args.tasks).as_posix() for p in args.tasks.rglob("task.json"))
    sizes = [catalog.get(p, 0) for p in paths]
    cap = row_cap(sizes, int(args.cells / CELLS_PER_ROW))
    sources = [SourceConfig(name=p.removesuffix("/task.json").replace("/", "."),
                            path=str(args.tasks / p), format="bigbench", max_rows=cap,
                            license="Apache-2.0") for p in paths]
    print(f"{len(sources)} task files, {sum(sizes):,} examples in the catalog; "
          f"max_rows {cap} per source -> about {sum(min(s, cap) for s in sizes):,} rows")

    import ray

    from rebase_ray.datastore import build_datastore

    shutil.rmtree(args.out, ignore_errors=True)
    ray.init(num_cpus=args.threads, log_to_driver=False)
    cfg = IndexConfig(resources=Resources(actors=1, cpus=1, threads=args.threads))
    t = time.perf_counter()
    summary = build_datastore(sources, str(args.out), cfg)
    wall = time.perf_counter() - t
    ray.shutdown()

    rows = sum(s["rows"] for s in summary["sources"])
    cells = summary["cells"]
    all_rows = sum(sizes)
    all_cells = all_rows * cells / max(rows, 1)
    projected = wall * all_cells / cells
    reasons = collections.Counter(
        pq.read_table(args.out / "rejects.parquet").column("reason").to_pylist())
    result = {
        "task_files": len(sources), "max_rows_per_source": cap, "rows": rows, "cells": cells,
        "rejects": summary["rejects"], "rejects_by_reason": reasons,
        "shards": summary["shards"], "index": summary["index"], "wall_s": round(wall, 1),
        "cells_per_s": round(cells / wall, 1), "threads": args.threads,
        "package_examples": all_rows, "package_cells_estimated": round(all_cells),
        "projected_whole_package_s": round(projected),
        "projection": "upper bound: this build's wall time x package cells / slice cells "
                      "(every file was already parsed in full here)",
        "load_avg_1m": os.getloadavg()[0],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bigbench_build.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"{cells:,} cells in {wall:.0f}s ({cells / wall:.0f} cells/s); whole package "
          f"(~{all_cells:,.0f} cells) projected at {projected / 3600:.1f} h on this machine")


if __name__ == "__main__":
    main()
