"""The two label filters for a weak teacher, measured on dev data with gold labels: round-trip
(the teacher labels the input again, greedy, constrained to the label set) against
self-consistency voting (`--votes` sampled labels, majority kept at `--min-agreement`), with no
filter as the baseline, in the same run, with the bundled SmolLM2-135M teacher on Ray Serve.

    .venv/bin/python benchmarks/label_filters.py [--rows 40] [--votes 5]

A transformation gives each generated input a label that may be wrong. To measure a filter
without a teacher-written input of unknown truth, real dev inputs stand in for generated ones:
each gets its gold label (even rows) or a wrong label (odd rows, the next label in the list).
Tasks: SNLI (../shared/data/tasks, dev rows) and BBC topics (the demo's dev split: articles
after the first 20 per topic, which are the demo's held-out test and never read here).
Per task and filter: kept, precision (share of kept examples whose final label is gold),
correct labels kept (recall), wrong labels rejected, teacher requests. Writes
benchmarks/results/label_filters.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def snli_rows() -> list[dict]:
    rows = []
    for line in (SHARED / "tasks" / "snli_sample" / "snli_1.0_dev.partial.jsonl").open():
        r = json.loads(line)
        if r["gold_label"] in ("entailment", "neutral", "contradiction"):
            rows.append({"input": f"Premise: {r['sentence1']}\nHypothesis: {r['sentence2']}",
                         "output": r["gold_label"]})
    return rows


def bbc_rows() -> list[dict]:
    from rebase_ray.demo import bbc_split

    out = Path(os.environ.get("TMPDIR", "/tmp")) / "label-filters-bbc"
    bbc_split(out)
    rows = [json.loads(line) for line in (out / "bbc_train.jsonl").open()]
    return [{"input": r["text"], "output": r["category"]} for r in rows]


def tasks():
    from rebase_ray.config import FewShot, TaskConfig

    snli = snli_rows()
    labels = ["entailment", "neutral", "contradiction"]
    shots = [next(r for r in snli if r["output"] == lab) for lab in labels]
    yield (TaskConfig(name="snli", answer="label", labels=labels,
                      instruction="Does the premise entail the hypothesis? Answer entailment, "
                                  "neutral or contradiction.",
                      examples=[FewShot(**s) for s in shots]),
           [r for r in snli if r not in shots])
    from rebase_ray.config import load_task

    demo = load_task(REPO / "examples" / "demo" / "task.yaml")
    yield demo.model_copy(update={"eval": None}), bbc_rows()


def pick(rows: list[dict], labels: list[str], n: int) -> list[tuple[str, str, str]]:
    """n rows spread over the set, (input, given label, gold): odd rows get a wrong label."""
    step = max(1, len(rows) // n)
    chosen = rows[::step][:n]
    out = []
    for i, r in enumerate(chosen):
        wrong = labels[(labels.index(r["output"]) + 1) % len(labels)]
        out.append((r["input"][:600], r["output"] if i % 2 == 0 else wrong, r["output"]))
    return out


def measure(verdicts, rows) -> dict:
    kept = [(v.label, gold) for v, (_, _, gold) in zip(verdicts, rows) if v.label is not None]
    correct_given = [i for i, (_, given, gold) in enumerate(rows) if given == gold]
    wrong_given = [i for i, (_, given, gold) in enumerate(rows) if given != gold]
    return {"kept": len(kept),
            "precision": round(sum(lab == gold for lab, gold in kept) / len(kept), 3)
            if kept else None,
            "correct_labels_kept": round(sum(verdicts[i].label == rows[i][2]
                                             for i in correct_given) / len(correct_given), 3),
            "wrong_labels_rejected_or_fixed": round(sum(verdicts[i].label != rows[i][1]
                                                        for i in wrong_given)
                                                    / len(wrong_given), 3),
            "requests": sum(v.requests for v in verdicts)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=40, help="rows per task")
    ap.add_argument("--votes", type=int, default=5)
    ap.add_argument("--min-agreement", type=float, default=0.6)
    args = ap.parse_args()

    import ray

    from rebase_ray.config import LabelCheck, ServeConfig, TeacherConfig
    from rebase_ray.models import SMOLLM2
    from rebase_ray.serve.teacher import local_teacher
    from rebase_ray.teacher.client import TeacherClient
    from rebase_ray.transform.filters import FilterContext
    from rebase_ray.transform.label_check import check_labels

    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    results = {"teacher": SMOLLM2, "rows_per_task": args.rows, "tasks": {}}
    teacher = TeacherConfig(model=SMOLLM2, max_batch_size=16,
                            serve=ServeConfig(port=0, cpus=1, threads=os.cpu_count()))
    filters = {"none": LabelCheck(mode="none"), "roundtrip": LabelCheck(mode="roundtrip"),
               "vote": LabelCheck(mode="vote", votes=args.votes,
                                  min_agreement=args.min_agreement)}
    with local_teacher(teacher) as url:
        for task, pool in tasks():
            rows = pick(pool, task.labels, args.rows)
            ctx = FilterContext(task)
            per = {}
            for name, cfg in filters.items():
                client = TeacherClient(url, concurrency=16)
                t = time.perf_counter()
                verdicts = check_labels(client, task, ctx, [(x, y) for x, y, _ in rows], cfg,
                                        seed=0)
                per[name] = {**measure(verdicts, rows),
                             "wall_s": round(time.perf_counter() - t, 2)}
                print(task.name, name, per[name], flush=True)
            results["tasks"][task.name] = per
    ray.shutdown()
    results["load_avg_1m"] = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "label_filters.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, per in results["tasks"].items():
        base = per["none"]["precision"]
        for f in ("roundtrip", "vote"):
            p = per[f]["precision"]
            ratio = f"x{p / base:.2f}" if p and base else "n/a"
            print(f"{name} {f}: precision {p} vs {base} unfiltered ({ratio}), kept "
                  f"{per[f]['kept']}/{args.rows}, {per[f]['requests']} requests")


if __name__ == "__main__":
    main()
