"""CPU embedding through ONNX Runtime vs sentence-transformers' torch `encode`, on the same real
cells (BIG-bench corpus, as embed_throughput.py), same threads, same batch size, in one process:
cells/s of each, their ratio, and the minimum cosine between a cell's two vectors.

    .venv/bin/pip install onnxruntime onnx      # not dependencies of rebase-ray (yet)
    .venv/bin/python benchmarks/embed_onnx.py [--cells 20000]

Groundwork for an `index.backend: onnx` option. sentence-transformers' own
`backend="onnx"` needs optimum-onnx, whose release pins transformers<4.58 (this stack runs
transformers 5.x), so the model is exported here with `torch.onnx.export` (the TorchScript
exporter, dynamic batch and sequence axes) and the pooling that the sentence-transformers model
declares (mean over the attention mask, then L2 normalisation) is applied to ONNX Runtime's
output. Writes benchmarks/results/embed_onnx.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from embed_throughput import CORPUS, real_cells

from rebase_ray.models import MINILM, load_embedder

RESULTS = Path(__file__).resolve().parent / "results" / "embed_onnx.json"
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


class Encoder(torch.nn.Module):
    """The transformer with keyword inputs (its forward's positional order changed in 5.x)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def export(st, path: str) -> None:
    pooling = st[1].get_config_dict()
    mean = pooling.get("pooling_mode") == "mean" or pooling.get("pooling_mode_mean_tokens")
    # sentence-transformers 3-5 and 6 spell the mode differently
    if not mean or len(st) != 3 or type(st[2]).__name__ != "Normalize":
        raise SystemExit(f"only mean pooling + Normalize is handled here, not {pooling}")
    sample = st.tokenizer(["a short one", "a padded, somewhat longer example"], padding=True,
                          return_tensors="pt")
    torch.onnx.export(Encoder(st[0].auto_model.eval()), tuple(sample[k] for k in INPUTS), path,
                      input_names=INPUTS, output_names=["hidden"], opset_version=17,
                      dynamic_axes={k: {0: "batch", 1: "seq"} for k in [*INPUTS, "hidden"]},
                      dynamo=False)


def onnx_encode(session, tokenizer, texts: list[str], batch_size: int,
                max_len: int) -> np.ndarray:
    """Mean-pooled, normalised vectors, batches of similar length (as `encode` sorts them)."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), 0), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                        max_length=max_len, return_tensors="np")
        hidden = session.run(None, {k: enc[k].astype(np.int64) for k in INPUTS})[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        vectors = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        if not out.shape[1]:
            out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        out[rows] = vectors
    return out


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    threads = os.cpu_count() or 2
    torch.set_num_threads(threads)
    texts = real_cells(args.cells)
    print(f"{len(texts)} real cells from {CORPUS}")
    st = load_embedder(MINILM, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        t0 = time.perf_counter()
        export(st, path)
        export_s = time.perf_counter() - t0
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        warm = texts[: args.batch_size]
        st.encode(warm, batch_size=args.batch_size)
        onnx_encode(session, st.tokenizer, warm, args.batch_size, st.max_seq_length)
        t0 = time.perf_counter()
        ref = st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                        convert_to_numpy=True)
        torch_s = time.perf_counter() - t0
        print(f"torch: {torch_s:.1f}s, {len(texts) / torch_s:.1f} cells/s")
        t0 = time.perf_counter()
        got = onnx_encode(session, st.tokenizer, texts, args.batch_size, st.max_seq_length)
        onnx_s = time.perf_counter() - t0
        print(f"onnx:  {onnx_s:.1f}s, {len(texts) / onnx_s:.1f} cells/s")
    cosine = (ref * got).sum(axis=1)
    result = {"cells": len(texts), "threads": threads, "batch_size": args.batch_size,
              "torch_dtype": str(next(st[0].auto_model.parameters()).dtype),
              "export_s": round(export_s, 1), "torch_s": round(torch_s, 1),
              "torch_cells_per_s": round(len(texts) / torch_s, 1), "onnx_s": round(onnx_s, 1),
              "onnx_cells_per_s": round(len(texts) / onnx_s, 1),
              "ratio": round(torch_s / onnx_s, 2), "min_cosine": float(cosine.min()),
              "onnxruntime": ort.__version__, "load_avg": os.getloadavg()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"onnx {result['onnx_cells_per_s']} vs torch {result['torch_cells_per_s']} cells/s: "
          f"{result['ratio']}x, min cosine {result['min_cosine']:.7f} (goal >= 0.99)")


if __name__ == "__main__":
    main()
