"""Label ranking by log-likelihood, as the evaluation scores label tasks: every (prompt, label)
pair run as its own sequence (lm-evaluation-harness's way, `generation.loglikelihood`) against
the prompt run once with the labels sharing its KV cache (`generation.choice_loglikelihood`),
in the same run, with the bundled SmolLM2-135M on BBC dev articles (600 characters, 5 topics).

    .venv/bin/python benchmarks/label_scoring.py [--articles 40] [--batch-size 16]

Prints examples/s of both, the ratio, and the largest difference between their values;
writes benchmarks/results/label_scoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
LABELS = ["business", "entertainment", "politics", "sport", "tech"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--articles", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import torch

    from rebase_ray.demo import bbc_split
    from rebase_ray.formats import student_messages
    from rebase_ray.generation import LM, choice_loglikelihood, loglikelihood

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        bbc_split(Path(tmp))  # the dev split: articles after the held-out ones
        rows = [json.loads(x) for x in (Path(tmp) / "bbc_train.jsonl").open()]
    rows = rows[:: max(1, len(rows) // args.articles)][: args.articles]
    lm = LM.load("bundled:smollm2-135m-instruct")
    prompts = [lm.render(student_messages("Classify the topic of a BBC news article.",
                                          r["text"])) for r in rows]
    load = os.getloadavg()[0]
    t0 = time.time()
    pairs = loglikelihood(lm, [p for p in prompts for _ in LABELS], LABELS * len(prompts),
                          batch_size=args.batch_size)
    pairwise_s = time.time() - t0
    t0 = time.time()
    shared = choice_loglikelihood(lm, prompts, LABELS)
    shared_s = time.time() - t0
    diff = max(abs(a[0] - b[0]) for a, b in zip(pairs, [x for row in shared for x in row]))
    result = {"articles": len(prompts), "labels": len(LABELS),
              "pairwise_examples_per_s": round(len(prompts) / pairwise_s, 2),
              "shared_prefix_examples_per_s": round(len(prompts) / shared_s, 2),
              "speedup": round(pairwise_s / shared_s, 2), "max_abs_difference": diff,
              "threads": torch.get_num_threads(), "load_avg_1m": round(load, 2)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "label_scoring.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
