"""Index build: build time, bytes per cell and recall@100 against exact search for the three
index kinds the datastore chooses from (Flat, HNSW32, IVF-PQ), with this project's factory
strings and search parameters.

    .venv/bin/python benchmarks/index_build.py [--n 1000000] [--hnsw-n 200000] [--quick]

Scale vectors: embedding 1M texts takes about an hour on this CPU, so the N vectors are real
BIG-bench cell embeddings (from benchmarks/embed_throughput.py, or embedded here) each
repeated with small Gaussian noise and re-normalised; the queries are other real cells, not
in the base. HNSW is built on `--hnsw-n` vectors (its build is the slow one on 2 cores) and
its time projected linearly to N. IVF-PQ recall is given for the PQ scores alone and after
exact rescoring of the top 1,000 candidates with vectors.npy (what retrieval does).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np

from rebase_ray.config import IndexConfig
from rebase_ray.datastore.index import apply_params, build_index, choose_factory, search_params
from rebase_ray.models import cache_dir

RESULTS = Path(__file__).resolve().parent / "results"
K = 100
RESCORE = 1000


def real_vectors(n: int) -> np.ndarray:
    cached = sorted(cache_dir().glob("bench-bigbench-*.npy"),
                    key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not cached or len(vectors := np.load(cached[-1])) < n:
        raise SystemExit("run benchmarks/embed_throughput.py first (it caches the embeddings)")
    print(f"real cell embeddings: {cached[-1]} ({len(vectors)})")
    return vectors


def scale(base: np.ndarray, n: int, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        chunk = base[np.arange(start, stop) % len(base)]
        chunk = chunk + rng.normal(0, sigma, chunk.shape).astype(np.float32)
        out[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def exact(xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    return index.search(xq, k)[1]


def measure(kind: str, xb: np.ndarray, xq: np.ndarray, truth: np.ndarray, cfg: IndexConfig
            ) -> dict:
    factory = choose_factory(len(xb), xb.shape[1], cfg.model_copy(update={"index": kind}))
    params = search_params(factory, len(xb))
    t = time.perf_counter()
    index = build_index(xb, factory, cfg.train_sample)
    build_s = time.perf_counter() - t
    apply_params(index, params)
    size = len(faiss.serialize_index(index))
    t = time.perf_counter()
    _, ids = index.search(xq, K)
    search_s = time.perf_counter() - t
    row = {"kind": kind, "factory": factory, "params": params, "n": len(xb),
           "build_s": round(build_s, 1), "bytes_per_cell": round(size / len(xb), 1),
           f"recall@{K}": round(recall(ids, truth), 4),
           "qps": round(len(xq) / search_s, 1)}
    if kind == "ivfpq":
        _, cand = index.search(xq, RESCORE)
        rescored = []
        for q, c in zip(xq, cand):
            c = c[c >= 0]
            rescored.append(c[np.argsort(-(xb[c] @ q))[:K]])
        row[f"recall@{K}_rescored_top{RESCORE}"] = round(recall(rescored, truth), 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--hnsw-n", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--sigma", type=float, default=0.02, help="noise per dimension")
    ap.add_argument("--quick", action="store_true", help="n=100k, hnsw-n=50k")
    args = ap.parse_args()
    if args.quick:
        args.n, args.hnsw_n = 100_000, 50_000
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    real = real_vectors(2_000)
    queries, base = real[: args.queries], real[args.queries:]
    print(f"{args.n} scale vectors = {len(base)} real BIG-bench cell embeddings + Gaussian "
          f"noise (sigma {args.sigma}/dim), re-normalised; {len(queries)} real held-out queries")
    xb = scale(base, args.n, args.sigma)
    cfg = IndexConfig()
    rows = []
    t = time.perf_counter()
    truth = exact(xb, queries, K)
    print(f"exact search: {time.perf_counter() - t:.1f}s")
    for kind in ("flat", "ivfpq"):
        rows.append(measure(kind, xb, queries, truth, cfg))
        print(rows[-1])
    hn = min(args.hnsw_n, args.n)
    sub_truth = exact(xb[:hn], queries, K)
    row = measure("hnsw", xb[:hn], queries, sub_truth, cfg)
    row["build_s_projected_to_n"] = round(row["build_s"] * args.n / hn, 1)
    rows.append(row)
    print(row)
    flat_s = rows[0]["build_s"] or 1e-3
    for r in rows:
        r["build_vs_flat"] = round(r["build_s"] / flat_s, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"n": args.n, "queries": len(queries), "sigma": args.sigma,
              "vectors": "real BIG-bench cell embeddings perturbed with Gaussian noise",
              "load_avg_1m": os.getloadavg()[0], "results": rows}
    (RESULTS / "index_build.json").write_text(json.dumps(result, indent=2) + "\n")
    ivf = rows[1]
    print(f"IVF-PQ: {ivf['bytes_per_cell']} bytes/cell ({ivf['bytes_per_cell'] / 1536:.3f}x "
          f"flat's 1536), recall@{K} {ivf[f'recall@{K}']} raw, "
          f"{ivf[f'recall@{K}_rescored_top{RESCORE}']} after exact rescoring "
          f"(goal <= 100 bytes at >= 0.9)")


if __name__ == "__main__":
    main()
