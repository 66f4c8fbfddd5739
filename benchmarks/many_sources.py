"""A datastore from hundreds of sources, and retrieval for many tasks in one call.

    .venv/bin/python benchmarks/many_sources.py [--sources 802] [--max-rows 12] [--skip-build]
        [--backend auto|torch|onnx] [--name STEM]

1. Build: one source per BIG-bench task file in ../shared/data/corpora (802 files, `max_rows`
   rows each), `rebase-ray index` as a user runs it (its own process, default `index`
   settings, whose resources follow the free CPUs; `--backend torch|onnx` sets `index.backend`),
   against sentence-transformers `encode` of the same cells (read back from the built
   datastore) in one plain process with every core, in one call at the build's CPU batch
   (`CPU_ENCODE_BATCH`): cells/s of each end to end and their ratio (issue 21's goal: at
   least 0.8x). The same cells through the ONNX encoder in one plain
   process too, so the build's overhead over its own encoder shows apart from the backend's.
2. Retrieval: 6 tasks (SQuAD, SNLI and four MMLU subjects, few-shot examples from
   ../shared/data/tasks) with `rebase-ray retrieve` once per task against one call with all
   six; the wall time of each way (each a process, Ray's start included) and their ratio.
Writes benchmarks/results/many_sources.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
CORPUS = SHARED / "corpora" / "bigbench_subset" / "benchmark_tasks"
RESULTS = REPO / "benchmarks" / "results" / "many_sources.json"
CLI = str(Path(sys.executable).parent / "rebase-ray")
MMLU_SUBJECTS = ["astronomy", "college_biology", "high_school_us_history", "marketing"]
LETTERS = "ABCD"


def sources(limit: int, max_rows: int) -> list[dict]:
    files = sorted(CORPUS.rglob("task.json"))[:limit]
    return [{"name": str(f.parent.relative_to(CORPUS)).replace("/", "__"), "path": str(f),
             "max_rows": max_rows} for f in files]


def tasks() -> dict[str, dict]:
    """The six task.yaml bodies: three few-shot examples each."""
    squad = json.loads((SHARED / "tasks" / "squad_v1.1_dev" / "dev-v1.1.json").read_text())
    paragraphs = [p for a in squad["data"] for p in a["paragraphs"]][:3]
    out = {"squad": {"name": "squad", "answer": "span", "metric": "exact_match_f1",
                     "instruction": "Answer the question with a span of the paragraph.",
                     "examples": [{"input": f"{p['context']}\nQuestion: {p['qas'][0]['question']}",
                                   "output": p["qas"][0]["answers"][0]["text"]}
                                  for p in paragraphs]}}
    rows = [json.loads(x) for x in (SHARED / "tasks" / "snli_sample"
                                    / "snli_1.0_dev.partial.jsonl").read_text().splitlines()]
    labels = ["entailment", "neutral", "contradiction"]
    out["snli"] = {"name": "snli", "answer": "label", "labels": labels,
                   "instruction": "Does the premise entail, contradict or leave open the "
                                  "hypothesis?",
                   "examples": [{"input": f"Premise: {r['sentence1']}\nHypothesis: "
                                          f"{r['sentence2']}", "output": r["gold_label"]}
                                for r in (next(r for r in rows if r["gold_label"] == label)
                                          for label in labels)]}
    for subject in MMLU_SUBJECTS:
        with (SHARED / "tasks" / "mmlu" / "dev" / f"{subject}_dev.csv").open() as f:
            picked = list(csv.DictReader(f))[:3]
        out[subject] = {
            "name": f"mmlu_{subject}", "answer": "label", "labels": list(LETTERS),
            "instruction": f"Answer the multiple-choice question on {subject.replace('_', ' ')}"
                           " with the letter of the right choice.",
            "examples": [{"input": r["question"] + "\n" + "\n".join(
                f"{LETTERS[i]}. {r[f'choice{i}']}" for i in range(4)),
                "output": LETTERS[int(r["answer"])]} for r in picked]}
    return out


def cli(*args: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([CLI, *args, "--json"], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"rebase-ray {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout)


def built_cells(store: Path) -> list[str]:
    """The values of the datastore's cells, read back from its shards."""
    return [v for f in sorted(store.glob("shards/*/cells.parquet"))
            for v in pq.read_table(f, columns=["value"])["value"].to_pylist()]


def plain_encode(texts: list[str], threads: int, backend: str) -> dict:
    """`encode` of `texts` in this process with every core: sentence-transformers (torch) or
    our ONNX encoder."""
    import torch

    from rebase_ray.datastore.encoders import CPU_ENCODE_BATCH, load_encoder

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    encoder = load_encoder("bundled:minilm", "cpu", backend, threads)
    encoder.encode(texts, CPU_ENCODE_BATCH)  # the build's CPU batch, one call for all cells
    wall = time.perf_counter() - t0
    return {"cells": len(texts), "wall_s": round(wall, 1),
            "cells_per_s": round(len(texts) / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=802)
    ap.add_argument("--max-rows", type=int, default=12)
    ap.add_argument("--work", type=Path, default=Path("/tmp/rebase-ray-many-sources"))
    ap.add_argument("--skip-build", action="store_true", help="reuse the datastore in --work")
    ap.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                    help="index.backend of the build")
    ap.add_argument("--name", default="many_sources", help="results file stem")
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    work, store = args.work, args.work / "store"
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"sources": args.sources, "max_rows": args.max_rows, "threads": threads,
                    "load_avg_at_start": os.getloadavg()[0]}
    if not args.skip_build:
        listed = sources(args.sources, args.max_rows)
        (work / "sources.yaml").write_text(yaml.safe_dump({"sources": listed}))
        # default `index` settings but the backend: the resources follow the free CPUs
        config = work / "pipeline.yaml"
        config.write_text(yaml.safe_dump({"index": {"backend": args.backend}}))
        wall, summary = cli("index", str(work / "sources.yaml"), "--out", str(store), "--force",
                            "--config", str(config))
        result["build"] = {"cells": summary["cells"], "wall_s": round(wall, 1),
                           "cells_per_s": round(summary["cells"] / wall, 1),
                           "stage_wall_s": summary["wall_s"], "shards": summary["shards"],
                           "backend": args.backend, "resolved_backend": summary.get("backend"),
                           "resources": summary["resources"]}
        print(f"build ({args.backend}, ran {summary.get('backend')}): {summary['cells']} cells "
              f"in {wall:.0f} s "
              f"({result['build']['cells_per_s']} cells/s)", flush=True)
        texts = built_cells(store)
        for backend in ("torch", "onnx"):
            plain = result[f"plain_encode_{backend}"] = plain_encode(texts, threads, backend)
            ratio = result[f"build_vs_plain_encode_{backend}"] = round(
                result["build"]["cells_per_s"] / plain["cells_per_s"], 2)
            print(f"plain encode ({backend}): {plain['cells_per_s']} cells/s; build / plain "
                  f"{ratio}x", flush=True)

    files = []
    for key, body in tasks().items():
        path = work / f"task_{key}.yaml"
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        files.append(str(path))
    separate = 0.0
    for f in files:
        wall, _ = cli("retrieve", f, "--datastore", str(store), "--out",
                      str(work / "one" / Path(f).stem), "--force")
        separate += wall
    together, summary = cli("retrieve", *files, "--datastore", str(store), "--out",
                            str(work / "many"), "--force")
    result["retrieve_6_tasks"] = {
        "separate_calls_s": round(separate, 1), "one_call_s": round(together, 1),
        "speedup": round(separate / together, 2), "startup_s": summary["startup_s"],
        "rows": {t["task"]: t["rows"] for t in summary["tasks"]}}
    print(f"6 tasks: {separate:.0f} s in 6 calls, {together:.0f} s in one "
          f"({result['retrieve_6_tasks']['speedup']}x)", flush=True)
    out = RESULTS.with_name(f"{args.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
