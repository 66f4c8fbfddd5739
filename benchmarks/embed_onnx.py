"""CPU embedding through ONNX Runtime (`index.backend: onnx`, rebase_ray/datastore/encoders.py)
vs sentence-transformers' torch `encode`, on the same real cells (BIG-bench corpus, as
embed_throughput.py), same threads, same batch size, in one process: cells/s of each, their
ratio, and the minimum cosine between a cell's two vectors.

    .venv/bin/python benchmarks/embed_onnx.py [--cells 20000]

Writes benchmarks/results/embed_onnx.json. The export (once per model, cached) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import onnxruntime as ort
import torch
from embed_throughput import CORPUS, real_cells

from rebase_ray.datastore.encoders import OnnxEncoder, TorchEncoder
from rebase_ray.models import MINILM

RESULTS = Path(__file__).resolve().parent / "results" / "embed_onnx.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    threads = os.cpu_count() or 2
    torch.set_num_threads(threads)
    texts = real_cells(args.cells)
    print(f"{len(texts)} real cells from {CORPUS}")
    base = TorchEncoder(MINILM, "cpu")
    t0 = time.perf_counter()
    onnx = OnnxEncoder(MINILM, threads)  # exports the model unless the cache has it
    load_s = time.perf_counter() - t0
    warm = texts[: args.batch_size]
    base.encode(warm, args.batch_size)
    onnx.encode(warm, args.batch_size)
    t0 = time.perf_counter()
    ref = base.encode(texts, args.batch_size)
    torch_s = time.perf_counter() - t0
    print(f"torch: {torch_s:.1f}s, {len(texts) / torch_s:.1f} cells/s")
    t0 = time.perf_counter()
    got = onnx.encode(texts, args.batch_size)
    onnx_s = time.perf_counter() - t0
    print(f"onnx:  {onnx_s:.1f}s, {len(texts) / onnx_s:.1f} cells/s")
    cosine = (ref * got).sum(axis=1)
    result = {"cells": len(texts), "threads": threads, "batch_size": args.batch_size,
              "torch_dtype": str(next(base.model[0].auto_model.parameters()).dtype),
              "onnx_load_s": round(load_s, 1), "torch_s": round(torch_s, 1),
              "torch_cells_per_s": round(len(texts) / torch_s, 1), "onnx_s": round(onnx_s, 1),
              "onnx_cells_per_s": round(len(texts) / onnx_s, 1),
              "ratio": round(torch_s / onnx_s, 2), "min_cosine": float(cosine.min()),
              "onnxruntime": ort.__version__, "load_avg": os.getloadavg()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"onnx / torch: {result['ratio']}x, min cosine {result['min_cosine']:.7f}")


if __name__ == "__main__":
    main()
