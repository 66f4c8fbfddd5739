"""ReBase transformation on two real dev tasks (SQuAD v1.1, SNLI) with a datastore built from
the BIG-bench corpus and the bundled SmolLM2-135M teacher on Ray Serve (CPU): replies
constrained to the task's JSON schema (xgrammar) against free decoding, in the same run.

    .venv/bin/python benchmarks/transform_dev_tasks.py [--rows 32] [--source-rows 10]

For each task: few-shot examples and the eval set (used by the contamination filters) come
from ../shared/data/tasks; the datastore holds `--source-rows` rows of every task.json in
../shared/data/corpora/bigbench_subset (cached between runs); the task's top `--rows` rows are
retrieved, then transformed through the served teacher twice, `reply.structured` on and off
(the label check off in both, so the format alone differs). Prints and writes
(benchmarks/results/transform_dev_tasks.json), per task and decoding: yield (kept /
retrieved), rejects by reason, the kept label distribution beside the few-shot examples',
seconds and teacher tokens per example, teacher completion tokens/s; and the constrained/free
ratios of yield and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
CORPUS = SHARED / "corpora" / "bigbench_subset" / "benchmark_tasks"
RESULTS = REPO / "benchmarks" / "results"
SHOTS = 3


def squad(n_eval: int) -> tuple[list[dict], list[dict]]:
    """(few-shot, eval) records {input, output}: the paragraph and question → the first
    gold answer span."""
    data = json.loads((SHARED / "tasks" / "squad_v1.1_dev" / "dev-v1.1.json").read_text())
    rows = [{"input": f"{p['context']}\nQuestion: {qa['question']}",
             "output": qa["answers"][0]["text"]}
            for article in data["data"] for p in article["paragraphs"] for qa in p["qas"]]
    return rows[:SHOTS], rows[SHOTS:SHOTS + n_eval]


def snli(n_eval: int) -> tuple[list[dict], list[dict]]:
    folder = SHARED / "tasks" / "snli_sample"
    rows = []
    for name in ("snli_1.0_dev.partial.jsonl", "snli_1.0_test.partial.jsonl"):
        for line in (folder / name).read_text().splitlines():
            r = json.loads(line)
            if r["gold_label"] in ("entailment", "neutral", "contradiction"):
                rows.append({"input": f"Premise: {r['sentence1']}\nHypothesis: {r['sentence2']}",
                             "output": r["gold_label"]})
    shots = [next(r for r in rows if r["output"] == label)
             for label in ("entailment", "neutral", "contradiction")]
    return shots, [r for r in rows if r not in shots][:n_eval]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32, help="retrieved rows per task")
    ap.add_argument("--source-rows", type=int, default=10, help="rows per BIG-bench task")
    ap.add_argument("--eval", type=int, default=500, help="eval rows per task")
    args = ap.parse_args()

    import ray

    from rebase_ray.config import (
        EvalSetConfig,
        FewShot,
        IndexConfig,
        RetrieveConfig,
        ServeConfig,
        SourceConfig,
        TaskConfig,
        TeacherConfig,
        TransformConfig,
    )
    from rebase_ray.datastore import build_datastore
    from rebase_ray.models import SMOLLM2, cache_dir
    from rebase_ray.retrieve import retrieve
    from rebase_ray.serve.teacher import local_teacher
    from rebase_ray.transform import transform

    tmp = Path(tempfile.mkdtemp(prefix="transform-dev-"))
    tasks = {}
    for name, (shots, eval_rows), extra in (
            ("squad", squad(args.eval),
             {"instruction": "Answer the question with a span copied from the paragraph.",
              "answer": "span"}),
            ("snli", snli(args.eval),
             {"instruction": "Does the premise entail the hypothesis? Answer entailment, "
                             "neutral or contradiction.",
              "answer": "label", "labels": ["entailment", "neutral", "contradiction"]})):
        path = tmp / f"{name}_eval.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
        tasks[name] = TaskConfig(name=name, examples=[FewShot(**s) for s in shots],
                                 eval=EvalSetConfig(path=str(path), input="input",
                                                    output="output"), **extra)

    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    store = cache_dir() / f"bench-transform-bigbench-{args.source_rows}"
    sources = [SourceConfig(name=p.parent.relative_to(CORPUS).as_posix().replace("/", "."),
                            path=str(p), format="bigbench", max_rows=args.source_rows,
                            license="Apache-2.0")
               for p in sorted(CORPUS.rglob("task.json"))]
    t = time.perf_counter()
    built = build_datastore(sources, str(store), IndexConfig())
    print(f"datastore {store}: {built['cells']} cells from {len(sources)} BIG-bench tasks "
          f"({time.perf_counter() - t:.0f}s)")

    results = {"datastore": {"sources": len(sources), "rows_per_source": args.source_rows,
                             "cells": built["cells"]},
               "teacher": SMOLLM2, "rows_per_task": args.rows, "tasks": {}}
    teacher = TeacherConfig(model=SMOLLM2, max_batch_size=8,
                            serve=ServeConfig(port=0, cpus=1, threads=os.cpu_count()))
    with local_teacher(teacher) as url:
        for name, task in tasks.items():
            out = tmp / name
            hits = retrieve(task, str(store), str(out / "retrieve"),
                            RetrieveConfig(top_n=args.rows))
            runs = {}
            for decoding, structured in (("constrained", True), ("free", False)):
                cfg = TransformConfig(reply={"structured": structured},
                                      label_check={"mode": "none"})
                s = transform(task, str(out / "retrieve"), url,
                              str(out / f"transform-{decoding}"), cfg, sources=sources)
                runs[decoding] = {
                    "retrieved": s["counts"]["retrieved"], "kept": s["counts"]["kept"],
                    "yield": s["counts"]["yield"], "rejects_by_reason": s["rejects_by_reason"],
                    "per_label": s["per_label"],
                    "seconds_per_example": s["seconds_per_example"],
                    "tokens_per_example": s["teacher"]["tokens_per_example"],
                    "teacher_requests": s["teacher"]["requests"],
                    "completion_tokens_per_s": round(
                        s["teacher"]["completion_tokens"] / max(s["wall_s"], 1e-9), 2),
                    "wall_s": s["wall_s"]}
                print(json.dumps({name: {decoding: runs[decoding]}}, indent=2), flush=True)
            c, f = runs["constrained"], runs["free"]
            results["tasks"][name] = {
                **runs, "fewshot_labels": dict(Counter(e.output for e in task.examples))
                if task.labels else {},
                "top_sources": sorted(hits["rows_per_dataset"], key=lambda d: -d["rows"])[:5],
                "ratio_yield": round(c["yield"] / f["yield"], 2) if f["yield"] else None,
                "ratio_tokens_per_s": round(c["completion_tokens_per_s"]
                                            / max(f["completion_tokens_per_s"], 1e-9), 2),
                "ratio_wall": round(c["wall_s"] / max(f["wall_s"], 1e-9), 2)}
    ray.shutdown()
    results["load_avg_1m"] = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "transform_dev_tasks.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, r in results["tasks"].items():
        for decoding in ("constrained", "free"):
            d = r[decoding]
            print(f"{name} {decoding}: yield {d['kept']}/{d['retrieved']} = {d['yield']:.1%}; "
                  f"{d['seconds_per_example']:.2f} s and {d['tokens_per_example']:.0f} teacher "
                  f"tokens per example, {d['completion_tokens_per_s']} tokens/s; rejects "
                  f"{d['rejects_by_reason']}; labels {d['per_label']}")
        print(f"{name} constrained/free: yield x{r['ratio_yield']}, tokens/s "
              f"x{r['ratio_tokens_per_s']}, wall x{r['ratio_wall']}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
