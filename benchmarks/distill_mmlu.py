"""BalDistill on MMLU (long-tailed by subject) with the bundled models on CPU: random vs balanced
vs adaptive quotas, macro and micro accuracy after each stage, and time per stage.

The pool is MMLU's test split of a few subjects spread over the size range (100 … 1,534 rows);
the eval set is a stratified sample of those subjects held out of the pool, the same for every
mode. The teacher (SmolLM2-135M on Ray Serve) writes rationales given the gold letter and
synthesizes tail examples; the student (SmolLM2-135M + LoRA) is trained on Ray Train.

    .venv/bin/python benchmarks/distill_mmlu.py --quick

Small, honest numbers: a 135M teacher and student, a budget of a few dozen calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
MMLU = REPO.parent / "shared" / "data" / "tasks" / "mmlu"
LETTERS = "ABCD"


def mmlu_rows(split: str) -> pd.DataFrame:
    frames = []
    for f in sorted((MMLU / split).glob("*.csv")):
        subject = f.name.rsplit(f"_{split}", 1)[0]
        frame = pd.read_csv(f, dtype=str, keep_default_na=False)
        frames.append(frame.assign(subject=subject))
    rows = pd.concat(frames, ignore_index=True)
    rows["input"] = rows.apply(lambda r: r["question"] + "\n" + "\n".join(
        f"{LETTERS[i]}. {r[f'choice{i}']}" for i in range(4)), axis=1)
    rows["output"] = rows["answer"].map(lambda a: LETTERS[int(a)])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true",
                    help="3 subjects, 5 eval each, budget 12, 4 steps per stage")
    ap.add_argument("--subjects", type=int, default=6)
    ap.add_argument("--eval-per-subject", type=int, default=10)
    ap.add_argument("--budget", type=int, default=36)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--modes", nargs="+", default=["random", "balanced", "adaptive"])
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default results/distill_mmlu[_quick].json)")
    args = ap.parse_args()
    if args.quick:
        args.subjects, args.eval_per_subject, args.budget, args.train_steps = 3, 5, 12, 4
    if args.out is None:
        name = "distill_mmlu_quick.json" if args.quick else "distill_mmlu.json"
        args.out = REPO / "benchmarks" / "results" / name
    if not MMLU.is_dir():
        sys.exit(f"MMLU not found at {MMLU}")

    import ray

    from rebase_ray.config import (
        DistillConfig,
        EvalSetConfig,
        EvaluateConfig,
        FewShot,
        ServeConfig,
        TaskConfig,
        TeacherConfig,
        TrainConfig,
    )
    from rebase_ray.distill import distill
    from rebase_ray.models import SMOLLM2
    from rebase_ray.serve.teacher import local_teacher

    test = mmlu_rows("test")
    sizes = test["subject"].value_counts().sort_values()
    step = (len(sizes) - 1) / max(1, args.subjects - 1)
    subjects = [sizes.index[round(i * step)] for i in range(args.subjects)]
    test = test[test["subject"].isin(subjects)]
    eval_rows = test.groupby("subject", sort=True).head(args.eval_per_subject)
    pool = test.drop(eval_rows.index)
    pool = pool.assign(example_id=pool["subject"] + "-" + pool.index.astype(str),
                       dataset=pool["subject"])
    dev = mmlu_rows("dev").iloc[0]

    tmp = Path(tempfile.mkdtemp(prefix="distill-mmlu-"))
    eval_path = tmp / "eval.jsonl"
    eval_rows[["input", "output", "subject"]].to_json(eval_path, orient="records", lines=True)
    task = TaskConfig(
        name="mmlu", instruction="Answer the multiple-choice question with the letter (A, B, C "
        "or D) of the correct choice.", examples=[FewShot(input=dev["input"],
                                                          output=dev["output"])],
        labels=list(LETTERS), answer="label", cot="annotate",
        eval=EvalSetConfig(path=str(eval_path), input="input", output="output",
                           domain="subject"))
    train = TrainConfig(model=SMOLLM2, max_steps=args.train_steps, batch_size=4,
                        max_seq_len=384)
    evaluate = EvaluateConfig(batch_size=8, max_new_tokens=64)

    ray.init(num_cpus=2, log_to_driver=False)
    results = {"subjects": {s: int(sizes[s]) for s in subjects}, "pool": len(pool),
               "eval": len(eval_rows), "eval_per_subject": args.eval_per_subject,
               "train_steps": args.train_steps, "budget": args.budget, "stages": args.stages,
               "modes": {}}
    teacher_cfg = TeacherConfig(model=SMOLLM2, max_batch_size=8,
                                serve=ServeConfig(port=0, num_cpus=1))
    with local_teacher(teacher_cfg) as url:
        for mode in args.modes:
            cfg = DistillConfig(stages=args.stages, budget=args.budget, mode=mode,
                                ifd_candidates=2, ifd_max_new_tokens=32, max_tokens=128)
            t0 = time.time()
            s = distill(task, pa.Table.from_pandas(pool, preserve_index=False),
                        str(tmp / mode), cfg, train, evaluate, teacher_url=url)
            results["modes"][mode] = {
                "wall_s": round(time.time() - t0, 1), "long_tail": s["long_tail"],
                "stages": [{k: r.get(k) for k in ("stage", "spent", "remaining", "kept",
                                                   "examples", "macro", "micro", "ifd_s",
                                                   "teacher_s", "train_s", "eval_s", "wall_s")}
                           for r in s["stages"]],
                "domains": s["domains"], "curves": s["curves"]}
            print(json.dumps({"mode": mode, "stages": results["modes"][mode]["stages"]}),
                  flush=True)
    ray.shutdown()

    base = next((c.get("base") for c in results["modes"][args.modes[0]]["curves"]
                 if c["domain"] == "(macro)"), None)
    results["base_macro"] = base
    ref = results["modes"].get("random")
    print(f"\nMMLU, {len(subjects)} subjects, pool {len(pool)}, eval {len(eval_rows)}, "
          f"B={args.budget}, K={args.stages}; base model macro accuracy {base}")
    for mode, r in results["modes"].items():
        last = r["stages"][-1]
        ratio = (last["macro"] / ref["stages"][-1]["macro"]
                 if ref and ref["stages"][-1]["macro"] else float("nan"))
        print(f"{mode:9s} final macro {last['macro']:.3f} micro {last['micro']:.3f} "
              f"(macro vs random ×{ratio:.2f}); s/stage "
              f"{[s['wall_s'] for s in r['stages']]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
