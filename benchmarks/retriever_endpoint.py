"""Retriever endpoint latency: N concurrent HTTP clients for T seconds against the Serve app
on 127.0.0.1, over the benchmark datastore of benchmarks/retrieval.py (1M scale-vector cells
by default; run that first, it builds and caches the datastore).

    .venv/bin/python benchmarks/retriever_endpoint.py [--cells 1000000] [--clients 8]
        [--seconds 30] [--quick]

Each request is a real text task (instruction + 2 examples, embedded by MiniLM in the replica),
top_n=10. Prints p50/p99 latency and throughput (goal p50 ≤ 50 ms, p99 ≤ 200 ms on CPU) and
the in-process `Retriever.search` time for the same requests as the baseline; writes
benchmarks/results/retriever_endpoint.json.
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

from rebase_ray.config import RetrieveConfig, ServeConfig
from rebase_ray.models import cache_dir

RESULTS = Path(__file__).resolve().parent / "results"
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
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--factory", default="IVF256,Flat")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="100k cells, 10 s")
    args = ap.parse_args()
    if args.quick:
        args.cells, args.seconds = 100_000, 10
    store = cache_dir() / f"bench-retrieval-{args.cells}-{args.shards}-{args.factory.replace(',', '_')}"
    if not (store / "manifest.json").exists():
        raise SystemExit(f"no benchmark datastore at {store}: run benchmarks/retrieval.py "
                         f"--cells {args.cells} first")
    import ray

    from rebase_ray.serve.retriever import local_retriever

    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    cfg = RetrieveConfig(top_n=10, candidates_per_query=args.candidates,
                         shard_cpus=1 / args.shards,
                         serve=ServeConfig(port=0, route_prefix="/retriever", num_cpus=1))
    bodies = [{"instruction": i, "examples": [{"input": a, "output": b} for a, b in ex],
               "top_n": 10} for i, ex in TASKS]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(url: str, seed: int, stop: float) -> None:
        with httpx.Client(timeout=60) as http:
            i = seed
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = http.post(f"{url}/retrieve", json=bodies[i % len(bodies)])
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors[0] += 1
                i += 1

    with local_retriever(str(store), cfg) as url:
        with httpx.Client(timeout=120) as http:
            for body in bodies:  # warm up every query path once
                http.post(f"{url}/retrieve", json=body).raise_for_status()
            served_ms = [http.post(f"{url}/retrieve", json=b).json()["took_ms"] for b in bodies]
        stop = time.perf_counter() + args.seconds
        threads = [threading.Thread(target=client, args=(url, s, stop))
                   for s in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    ray.shutdown()
    lat = np.array(latencies) * 1000
    result = {
        "cells": args.cells, "shards": args.shards, "factory": args.factory,
        "clients": args.clients, "seconds": args.seconds, "requests": len(lat),
        "errors": errors[0], "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()),
        "requests_per_s": len(lat) / wall,
        "single_request_in_replica_ms": float(np.median(served_ms)),
        "load_avg_1m": os.getloadavg()[0],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "retriever_endpoint.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"{args.clients} clients: p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} "
          f"ms, {result['requests_per_s']:.1f} req/s; one request alone takes "
          f"{result['single_request_in_replica_ms']:.0f} ms in the replica "
          "(goal p50 <= 50 ms, p99 <= 200 ms)")


if __name__ == "__main__":
    main()
