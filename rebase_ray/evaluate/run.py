"""Evaluate the student (and the untrained base model as the baseline row) on an eval set:
batch inference, final-answer parsing, per-example scores, per-domain / macro / micro metrics.
"""

from __future__ import annotations

import time

from rebase_ray.config import EvaluateConfig, S3Config, TaskConfig
from rebase_ray.evaluate.code_exec import PASS, run_tests
from rebase_ray.evaluate.infer import predict
from rebase_ray.evaluate.metrics import accuracy_score, aggregate, squad_scores
from rebase_ray.formats import extract_code, final_answer

METRIC_KEYS = {"accuracy": ["accuracy"], "exact_match_f1": ["exact_match", "f1"],
               "pass_at_1": ["pass_at_1"]}


def score(task: TaskConfig, record: dict, prediction: str, cfg: EvaluateConfig) -> dict:
    """The parsed answer and its scores for one prediction."""
    if task.metric == "pass_at_1":
        code = extract_code(prediction)
        result = run_tests(code, record.get("tests") or record["output"], cfg.code_timeout_s,
                           cfg.code_memory_mb)
        return {"prediction": prediction, "answer": code,
                "pass_at_1": float(result["status"] == PASS), **result}
    answer = final_answer(prediction)
    if task.metric == "accuracy":
        return {"prediction": prediction, "answer": answer,
                "accuracy": accuracy_score(answer, record["output"], task.labels)}
    return {"prediction": prediction, "answer": answer, **squad_scores(answer, record["output"])}


def evaluate(task: TaskConfig, records: list[dict], model: str, adapter: str | None,
             cfg: EvaluateConfig, s3: S3Config | None = None) -> dict:
    """Metrics of `model` (+ `adapter`) on `records` (input, output, domain; `tests` for code).

    Returns {'task', 'metric', 'keys', 'model', 'adapter', 'n', 'runs': {'base'|'trained':
    {'domains', 'macro', 'micro'}}, 'predictions': [{input, output, domain, base/trained:
    {prediction, answer, scores}}], 'seconds', 'examples_per_s'}. 'base' is the model without
    the adapter (present without an adapter, or with `cfg.baseline`).
    """
    if cfg.max_examples:
        records = records[: cfg.max_examples]
    if not records:
        raise ValueError(f"task {task.name!r}: no eval records to evaluate")
    keys = METRIC_KEYS[task.metric]
    t0 = time.time()
    outputs = predict([r["input"] for r in records], task.instruction, model, adapter, cfg, s3)
    seconds = time.time() - t0
    predictions = []
    for i, rec in enumerate(records):
        row = {"input": rec["input"], "output": rec["output"],
               "domain": rec.get("domain") or task.name}
        for run, texts in outputs.items():
            row[run] = score(task, rec, texts[i], cfg)
        predictions.append(row)
    runs = {run: aggregate(({"domain": p["domain"], **p[run]} for p in predictions), keys)
            for run in outputs}
    return {"task": task.name, "metric": task.metric, "keys": keys, "model": model,
            "adapter": adapter, "n": len(records), "runs": runs, "predictions": predictions,
            "seconds": round(seconds, 2),
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
