"""Scoring the answer, not the format: the base SmolLM2-135M-Instruct on SNLI dev and MMLU,
ranked by log-likelihood over the label set (lm-evaluation-harness's `acc` / `acc_norm`)
against the generative answer (strict: the exact format; flexible: the label extracted), in the
same run, by the same `rebase_ray.evaluate.evaluate` call.

    .venv/bin/python benchmarks/eval_fairness.py [--snli 100] [--mmlu-per-subject 10]

Data: ../shared/data/tasks (SNLI dev rows; MMLU dev + test rows of a few subjects, the
question with its four lettered choices, answer a letter). Prints and writes
benchmarks/results/eval_fairness.json: per task every metric, examples/s, and the ratio of
log-likelihood accuracy to strict generative accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "tasks"
RESULTS = REPO / "benchmarks" / "results"
SUBJECTS = ["high_school_geography", "marketing", "high_school_psychology", "sociology"]


def snli(n: int) -> list[dict]:
    rows = []
    for line in (SHARED / "snli_sample" / "snli_1.0_dev.partial.jsonl").open():
        r = json.loads(line)
        if r["gold_label"] in ("entailment", "neutral", "contradiction"):
            rows.append({"input": f"Premise: {r['sentence1']}\nHypothesis: {r['sentence2']}",
                         "output": r["gold_label"], "domain": "snli"})
    return rows[:n]


def mmlu(per_subject: int) -> list[dict]:
    rows = []
    for subject in SUBJECTS:
        with (SHARED / "mmlu" / "test" / f"{subject}_test.csv").open() as f:
            for r in list(csv.DictReader(f))[:per_subject]:
                choices = "\n".join(f"{letter}. {r[f'choice{i}']}"
                                    for i, letter in enumerate("ABCD"))
                rows.append({"input": f"{r['question']}\n{choices}",
                             "output": "ABCD"[int(r["answer"])], "domain": subject})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--snli", type=int, default=100, help="SNLI dev rows")
    ap.add_argument("--mmlu-per-subject", type=int, default=10)
    args = ap.parse_args()

    from rebase_ray.config import EvaluateConfig, FewShot, Resources, TaskConfig
    from rebase_ray.evaluate import evaluate
    from rebase_ray.models import SMOLLM2
    from rebase_ray.runtime import init_ray

    tasks = {
        "snli": (TaskConfig(
            name="snli", answer="label", labels=["entailment", "neutral", "contradiction"],
            instruction="Does the premise entail the hypothesis? Answer entailment, neutral "
                        "or contradiction.",
            examples=[FewShot(input="Premise: A man sleeps.\nHypothesis: A person rests.",
                              output="entailment")]), snli(args.snli)),
        "mmlu": (TaskConfig(
            name="mmlu", answer="label", labels=list("ABCD"),
            instruction="Answer the multiple-choice question with the letter of the correct "
                        "choice (A, B, C or D).",
            examples=[FewShot(input="2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6", output="B")]),
            mmlu(args.mmlu_per_subject))}
    init_ray()
    cfg = EvaluateConfig(batch_size=16, max_new_tokens=16,
                         resources=Resources(actors=1, cpus=1, threads=os.cpu_count()))
    results = {"model": SMOLLM2, "tasks": {}}
    for name, (task, records) in tasks.items():
        r = evaluate(task, records, SMOLLM2, None, cfg)
        micro = r["runs"]["base"]["micro"]
        strict = micro.get("gen_strict")
        results["tasks"][name] = {
            "n": r["n"], "keys": r["keys"], "micro": micro, "macro": r["runs"]["base"]["macro"],
            "seconds": r["seconds"], "examples_per_s": r["examples_per_s"],
            "ratio_acc_to_gen_strict": round(micro["acc"] / strict, 2) if strict else None,
            "ratio_acc_to_gen_flexible": round(micro["acc"] / micro["gen_flexible"], 2)
            if micro.get("gen_flexible") else None}
        print(name, json.dumps(results["tasks"][name]), flush=True)
    results["load_avg_1m"] = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_fairness.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, t in results["tasks"].items():
        m = t["micro"]
        print(f"{name} (n={t['n']}): acc {m['acc']:.3f}, acc_norm {m['acc_norm']:.3f}, "
              f"generative strict {m['gen_strict']:.3f}, flexible {m['gen_flexible']:.3f}; "
              f"acc / strict x{t['ratio_acc_to_gen_strict']}; {t['examples_per_s']} ex/s")


if __name__ == "__main__":
    main()
