"""Evaluation speed: examples/s of the base SmolLM2-135M-Instruct on SNLI dev for the
log-likelihood metric (`acc`: the three labels ranked after the prompt) and the generative one
(`gen_strict` / `gen_flexible`: a greedy reply, then the labels ranked too), with one worker,
and the fixed cost of an evaluation (an evaluation of one example) when it is the first of the
run (the worker imports torch and loads the model) and when it is the next one (the worker and
its model kept from the first: what the stages of one run pay), in the same run. The two
metrics run after those, so on the kept model too.

    .venv/bin/python benchmarks/eval_speed.py [--n 100] [--max-new-tokens 16]

Data: ../shared/data/tasks/snli_sample (dev rows). Prints and writes
benchmarks/results/eval_speed.json: seconds, examples/s and model loads per run, the first
evaluation's fixed cost over the next one's, and each metric's throughput net of the next
evaluation's fixed cost.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from eval_fairness import snli

RESULTS = Path(__file__).resolve().parent / "results" / "eval_speed.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="SNLI dev rows")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()

    from rebase_ray.config import EvaluateConfig, FewShot, Resources, TaskConfig
    from rebase_ray.evaluate import evaluate
    from rebase_ray.models import SMOLLM2
    from rebase_ray.runtime import init_ray

    task = TaskConfig(
        name="snli", answer="label", labels=["entailment", "neutral", "contradiction"],
        instruction="Does the premise entail the hypothesis? Answer entailment, neutral or "
                    "contradiction.",
        examples=[FewShot(input="Premise: A man sleeps.\nHypothesis: A person rests.",
                          output="entailment")])
    records = snli(args.n)
    t0 = time.perf_counter()
    init_ray()
    ray_start = time.perf_counter() - t0
    threads = os.cpu_count() or 2
    result = {"model": SMOLLM2, "n": len(records), "cpus": threads, "ray_start_s":
              round(ray_start, 2), "runs": {}}
    for name, generative, rows in (("first", False, records[:1]),
                                   ("again", False, records[:1]),
                                   ("loglikelihood", False, records),
                                   ("generative", True, records)):
        cfg = EvaluateConfig(batch_size=16, max_new_tokens=args.max_new_tokens,
                             resources=Resources(actors=1, cpus=1, threads=threads),
                             generative=generative)
        start = time.perf_counter()
        r = evaluate(task, rows, SMOLLM2, None, cfg)
        wall = time.perf_counter() - start
        result["runs"][name] = {"examples": len(rows), "wall_s": round(wall, 2),
                                "examples_per_s": round(len(rows) / wall, 3),
                                "model_loads": r["resources"]["model_loads"],
                                "micro": r["runs"]["base"]["micro"]}
    fixed = result["runs"]["again"]["wall_s"]
    result["first_over_again"] = round(result["runs"]["first"]["wall_s"] / fixed, 2)
    for name in ("loglikelihood", "generative"):
        run = result["runs"][name]
        run["examples_per_s_net_of_fixed_cost"] = round(
            run["examples"] / max(run["wall_s"] - fixed, 1e-9), 3)
    result["load_avg"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    for name in ("loglikelihood", "generative"):
        run = result["runs"][name]
        print(f"{name}: {run['examples']} examples in {run['wall_s']} s = "
              f"{run['examples_per_s']} examples/s ({run['examples_per_s_net_of_fixed_cost']} "
              f"net of the {fixed} s fixed cost of a next evaluation)")
    print(f"fixed cost: first evaluation {result['runs']['first']['wall_s']} s, next {fixed} s: "
          f"{result['first_over_again']}x")


if __name__ == "__main__":
    main()
