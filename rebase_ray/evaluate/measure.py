"""Evaluate the student (and the untrained base model as the baseline row) on an eval set:
batch inference, final-answer parsing, per-example scores, per-domain / macro / micro metrics.
The one evaluation of a model: every distill stage and the evaluate stage (`stage.run`, which
`rebase-ray eval` and the pipeline call) use `evaluate`; base and trained go the same way.
"""

from __future__ import annotations

import time

from rebase_ray.config import EvaluateConfig, S3Config, TaskConfig
from rebase_ray.evaluate.code_exec import PASS, run_tests
from rebase_ray.evaluate.infer import predict
from rebase_ray.evaluate.metrics import (
    aggregate,
    argmax,
    gold_index,
    ranked_scores,
    squad_scores,
    strict_score,
)
from rebase_ray.formats import extract_code, final_answer, flexible_score, strict_answer

# the score keys of each task metric; the first is the primary one
METRIC_KEYS = {"accuracy": ["acc", "acc_norm", "gen_strict", "gen_flexible"],
               "exact_match_f1": ["exact_match", "f1"], "pass_at_1": ["pass_at_1"]}


def score(task: TaskConfig, record: dict, prediction: str | None, cfg: EvaluateConfig,
          logprobs: list[float] | None = None) -> dict:
    """The parsed answer and its scores for one prediction; for label accuracy `logprobs`
    holds the log-likelihood of each of the task's labels after the prompt, and `prediction`
    is None when no answer was generated (no generative scores then)."""
    if task.metric == "pass_at_1":
        code = extract_code(prediction)
        result = run_tests(code, record.get("tests") or record["output"], cfg.code_timeout_s,
                           cfg.code_memory_mb)
        return {"prediction": prediction, "answer": code,
                "pass_at_1": float(result["status"] == PASS), **result}
    answer = final_answer(prediction)
    if task.metric == "accuracy":
        labels, gold = task.labels, record["output"]
        ranked = ranked_scores(logprobs, labels, gold_index(gold, labels))
        choice = labels[argmax(logprobs)]
        if prediction is None:
            return {"prediction": None, "answer": choice, "choice": choice,
                    "logprobs": dict(zip(labels, logprobs)), **ranked}
        return {"prediction": prediction, "answer": answer, "choice": choice,
                "logprobs": dict(zip(labels, logprobs)), **ranked,
                "gen_strict": strict_score(strict_answer(prediction), gold),
                "gen_flexible": flexible_score(answer, gold, labels)}
    return {"prediction": prediction, "answer": answer, **squad_scores(answer, record["output"])}


def evaluate(task: TaskConfig, records: list[dict], model: str, adapter: str | None,
             cfg: EvaluateConfig, s3: S3Config | None = None,
             baselines: dict[str, str] | None = None) -> dict:
    """Metrics of `model` (+ `adapter`) on `records` (input, output, domain; `tests` for code).

    Returns {'task', 'metric', 'keys', 'model', 'adapter', 'n', 'runs': {run: {'domains',
    'macro', 'micro'}}, 'predictions': [{input, output, domain, <run>: {prediction, answer,
    scores}}], 'seconds', 'resources' (the workers', with `model_loads`), 'examples_per_s'}; `keys[0]` is the primary score (`METRIC_KEYS`).
    Runs: 'base' (the model without any adapter; present without an adapter, with
    `cfg.baseline`, or with an untrained baseline), 'trained' (`adapter`) and one per entry of
    `baselines` ({name: adapter URI}, e.g. students trained on other data; None: a student
    that had nothing to train on, which is the base model and gets the base's answers), all
    answered in one pass.
    """
    if cfg.max_examples:
        records = records[: cfg.max_examples]
    if not records:
        raise ValueError(f"task {task.name!r}: no eval records to evaluate")
    labels = None  # the labels ranked by log-likelihood
    if task.metric == "accuracy":
        labels = task.labels
        if not labels:
            raise ValueError(f"task {task.name!r}: metric accuracy needs the task's `labels`")
        for rec in records:
            gold_index(rec["output"], labels)  # raises unless every gold answer is a label
    keys = METRIC_KEYS[task.metric]
    if task.metric == "accuracy" and not cfg.generative:
        keys = keys[:2]  # acc, acc_norm: nothing generated
    untrained = [name for name, a in (baselines or {}).items() if a is None]
    adapters = {**{name: a for name, a in (baselines or {}).items() if a is not None},
                **({"trained": adapter} if adapter else {})}
    t0 = time.time()
    outputs, resources = predict([r["input"] for r in records], task.instruction, labels,
                                 model, adapters, cfg, s3, base=cfg.baseline or bool(untrained))
    seconds = time.time() - t0
    # base first, the baselines in their order, the distilled student last
    outputs = {run: outputs["base"] if run in untrained else outputs[run]
               for run in [*(["base"] if "base" in outputs else []), *(baselines or {}),
                           *(["trained"] if adapter else [])]}
    predictions = []
    for i, rec in enumerate(records):
        row = {"input": rec["input"], "output": rec["output"],
               "domain": rec.get("domain") or task.name}
        for run, answers in outputs.items():
            row[run] = score(task, rec, answers[i]["reply"], cfg, answers[i].get("logprobs"))
        predictions.append(row)
    runs = {run: aggregate(({"domain": p["domain"], **p[run]} for p in predictions), keys)
            for run in outputs}
    return {"task": task.name, "metric": task.metric, "keys": keys, "model": model,
            "adapter": adapter, "n": len(records), "runs": runs, "predictions": predictions,
            "seconds": round(seconds, 2), "resources": resources,
            "examples_per_s": round(len(records) * len(outputs) / max(seconds, 1e-9), 3)}


def metric_rows(result: dict) -> list[dict]:
    """One row per (run, domain) plus the macro and micro rows: the summary table."""
    rows = []
    for run, agg in result["runs"].items():
        for domain, m in agg["domains"].items():
            rows.append({"run": run, "domain": domain, **m})
        rows.append({"run": run, "domain": "(macro)", **agg["macro"]})
        rows.append({"run": run, "domain": "(micro)", **agg["micro"]})
    return rows


def comparison_rows(result: dict) -> list[dict]:
    """The primary score side by side, one column per run (base, the baselines, then the
    distilled student as `rebase-ray`), one row per domain plus macro and micro."""
    key, runs = result["keys"][0], result["runs"]
    names = {run: "rebase-ray" if run == "trained" else run for run in runs}
    domains = sorted({d for agg in runs.values() for d in agg["domains"]})
    rows = [{"domain": d, **{names[run]: agg["domains"].get(d, {}).get(key)
                             for run, agg in runs.items()}} for d in domains]
    rows += [{"domain": f"({avg})", **{names[run]: agg[avg][key] for run, agg in runs.items()}}
             for avg in ("macro", "micro")]
    return [{"metric": key, **row} for row in rows]
