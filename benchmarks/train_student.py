"""SmolLM2-135M LoRA on Ray Train (CPU): training speed, and SNLI accuracy of the base model vs
the fine-tuned student after a short run.

Trains on the first rows of ../shared/data/tasks/snli_sample's dev file and evaluates on rows
of its test file (gold label '-' dropped), base and trained in the same Ray Data pass.

    .venv/bin/python benchmarks/train_student.py --quick     # ~100 train rows, 40 eval rows
    .venv/bin/python benchmarks/train_student.py             # 300 train rows, 100 eval rows

Prints trained/base accuracy (the ratio) and writes benchmarks/results/train_student.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import ray

from rebase_ray.config import EvaluateConfig, Resources, TaskConfig, TrainConfig
from rebase_ray.evaluate import evaluate
from rebase_ray.models import SMOLLM2
from rebase_ray.train import train_student

ROOT = Path(__file__).resolve().parent.parent
SNLI = ROOT.parent / "shared" / "data" / "tasks" / "snli_sample"
LABELS = ["entailment", "neutral", "contradiction"]
TASK = TaskConfig(
    name="snli", answer="label", labels=LABELS,
    instruction="Does the premise entail the hypothesis? Answer with one word: entailment, "
                "neutral or contradiction.",
    examples=[{"input": "Premise: A man plays a guitar.\nHypothesis: A man makes music.",
               "output": "entailment"}])


def snli(path: Path, n: int) -> list[dict]:
    rows = []
    for line in path.open():
        r = json.loads(line)
        if r["gold_label"] in LABELS:
            rows.append({"input": f"Premise: {r['sentence1']}\nHypothesis: {r['sentence2']}",
                         "output": r["gold_label"], "domain": r["gold_label"]})
        if len(rows) == n:
            break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    n_train, n_eval = (100, 40) if args.quick else (300, 100)
    train_rows = snli(SNLI / "snli_1.0_dev.partial.jsonl", n_train)
    eval_rows = snli(SNLI / "snli_1.0_test.partial.jsonl", n_eval)

    ray.init(num_cpus=2, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    cfg = TrainConfig(model=SMOLLM2, resources=Resources(actors=args.workers, cpus=2 / args.workers),
                      batch_size=8, learning_rate=5e-4, epochs=1, checkpoint_every=1000)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        summary = train_student(pa.Table.from_pylist(train_rows), TASK, cfg, tmp)
        train_wall = time.time() - t0
        ecfg = EvaluateConfig(batch_size=16, max_new_tokens=8, resources=Resources(actors=1, cpus=2))
        result = evaluate(TASK, eval_rows, SMOLLM2, summary["adapter"], ecfg)
    ray.shutdown()

    key = result["keys"][0]  # acc: the label ranked first by log-likelihood
    base = result["runs"]["base"]["micro"][key]
    trained = result["runs"]["trained"]["micro"][key]
    figures = {
        "train_rows": len(train_rows), "eval_rows": len(eval_rows), "workers": args.workers,
        "steps": summary["steps"], "batch_size": cfg.batch_size,
        "s_per_step": summary["s_per_step"], "examples_per_s": summary["examples_per_s"],
        "tokens_per_s": summary["tokens_per_s"], "train_wall_s": round(train_wall, 1),
        "first_loss": summary["first_loss"], "final_loss": summary["final_loss"],
        "base_accuracy": base, "trained_accuracy": trained,
        "metric": key,
        "base_macro": result["runs"]["base"]["macro"][key],
        "trained_macro": result["runs"]["trained"]["macro"][key],
        "eval_s": result["seconds"], "eval_examples_per_s": result["examples_per_s"],
        "base_answers": sorted({p["base"]["answer"][:20] for p in result["predictions"]})[:10],
    }
    print(json.dumps(figures, indent=2))
    print(f"trained/base accuracy: {trained:.3f}/{base:.3f} = "
          f"{trained / base if base else float('inf'):.2f}x")
    out = ROOT / "benchmarks" / "results" / "train_student.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
