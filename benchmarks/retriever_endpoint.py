"""Retriever endpoint latency: N concurrent HTTP clients for T seconds against the Serve app
on 127.0.0.1, over the benchmark datastore of benchmarks/retrieval.py (1M scale-vector cells
by default; run that first, it builds and caches the datastore).

    .venv/bin/python benchmarks/retriever_endpoint.py [--cells 1000000] [--clients 8]
        [--seconds 30] [--distinct] [--quick]

Each request is a real text task (instruction + 2 examples, embedded by MiniLM in the replica),
top_n=10: the same four tasks in turn (their texts' vectors come from the replica's embedding
cache after the first time), or with `--distinct` texts made new in every request (each one
embedded). Prints p50/p99 latency and throughput (goal p50 ≤ 50 ms, p99 ≤ 200 ms on CPU)
and, as the baseline, the p50 of one client alone; writes
benchmarks/results/retriever_endpoint.json (`--distinct`: retriever_endpoint_distinct.json).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from rebase_ray.config import Resources, RetrieveConfig, ServeConfig
from rebase_ray.datastore.store import FORMAT_VERSION
from rebase_ray.models import cache_dir

RESULTS = Path(__file__).resolve().parent / "results"
ALONE = 20  # requests of the one-client baseline
TASKS = [
    ("Classify the topic of a news article.",
     [("Chelsea won the league after a late goal.", "sport"),
      ("Shares fell after the airline warned on profits.", "business")]),
    ("Answer the arithmetic question.",
     [("What is 12 plus 30?", "42"), ("What is 7 times 6?", "42")]),
    ("Translate the sentence to French.",
     [("The cat sleeps.", "Le chat dort."), ("I like bread.", "J'aime le pain.")]),
    ("Decide whether the review is positive or negative.",
     [("A wonderful, moving film.", "positive"), ("Dull and far too long.", "negative")]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--factory", default="IVF2048,Flat")
    ap.add_argument("--nprobe", type=int, default=24)
    ap.add_argument("--load", choices=["mmap", "memory"], default="memory")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--candidates", type=int, default=2000)
    ap.add_argument("--distinct", action="store_true",
                    help="new texts in every request (the embedding cache never hits)")
    ap.add_argument("--quick", action="store_true", help="100k cells, 10 s")
    args = ap.parse_args()
    if args.quick:
        args.cells, args.seconds = 100_000, 10
    store = cache_dir() / (f"bench-retrieval-v{FORMAT_VERSION}-{args.cells}-{args.shards}-"
                           f"{args.factory.replace(',', '_')}")
    if not (store / "manifest.json").exists():
        raise SystemExit(f"no benchmark datastore at {store}: run benchmarks/retrieval.py "
                         f"--cells {args.cells} first")
    import ray

    from rebase_ray.serve.retriever import local_retriever

    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    cfg = RetrieveConfig(top_n=10, candidates_per_query=args.candidates, load=args.load,
                         search_params=f"nprobe={args.nprobe}" if "IVF" in args.factory else None,
                         resources=Resources(cpus=1 / args.shards),
                         serve=ServeConfig(port=0, route_prefix="/retriever", cpus=1))
    latencies: list[float] = []
    errors = [0]
    sent = iter(range(10**9))  # request numbers, shared by the clients
    lock = threading.Lock()

    def body(n: int) -> dict:
        """Request n: one of TASKS, its texts made new with --distinct (no embedding cache
        hit), else the same four tasks over and over."""
        instruction, examples = TASKS[n % len(TASKS)]
        tag = f" (request {n})" if args.distinct else ""
        return {"instruction": instruction + tag, "top_n": 10,
                "examples": [{"input": a + tag, "output": b} for a, b in examples]}

    def timed(http: httpx.Client, url: str, n: int) -> float | None:
        t = time.perf_counter()
        r = http.post(f"{url}/retrieve", json=body(n))
        return time.perf_counter() - t if r.status_code == 200 else None

    def client(url: str, stop: float) -> None:
        with httpx.Client(timeout=60) as http:
            while time.perf_counter() < stop:
                with lock:
                    n = next(sent)
                dt = timed(http, url, n)
                with lock:
                    if dt is None:
                        errors[0] += 1
                    else:
                        latencies.append(dt)

    with local_retriever(str(store), cfg) as url:
        with httpx.Client(timeout=120) as http:
            for n in range(len(TASKS)):  # warm up every query path once
                http.post(f"{url}/retrieve", json=body(next(sent))).raise_for_status()
            # the baseline: one client alone
            alone = [timed(http, url, next(sent)) for _ in range(ALONE)]
        stop = time.perf_counter() + args.seconds
        threads = [threading.Thread(target=client, args=(url, stop))
                   for _ in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        with httpx.Client(timeout=60) as http:
            cache = http.get(f"{url}/healthz").json()["embed_cache"]
    ray.shutdown()
    lat = np.array(latencies) * 1000
    alone_ms = float(np.median([a for a in alone if a is not None]) * 1000)
    result = {
        "cells": args.cells, "shards": args.shards, "factory": args.factory,
        "nprobe": args.nprobe, "load": args.load, "candidates_per_query": args.candidates,
        "distinct_texts": args.distinct, "clients": args.clients, "seconds": args.seconds,
        "requests": len(lat), "errors": errors[0], "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()),
        "requests_per_s": len(lat) / wall, "one_client_p50_ms": alone_ms,
        "p50_vs_one_client": float(np.percentile(lat, 50)) / alone_ms,
        "embed_cache": cache, "load_avg_1m": os.getloadavg()[0],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "retriever_endpoint_distinct.json" if args.distinct else "retriever_endpoint.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"{args.clients} clients: p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} "
          f"ms, {result['requests_per_s']:.1f} req/s; one client alone: p50 {alone_ms:.0f} ms "
          f"({result['p50_vs_one_client']:.1f}x) (goal p50 <= 50 ms, p99 <= 200 ms)")


if __name__ == "__main__":
    main()
