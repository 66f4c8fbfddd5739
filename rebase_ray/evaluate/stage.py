"""The evaluate stage, the same for `rebase-ray eval` and the pipeline: the student, the base
model and any baseline students on the task's eval set in one pass (`measure.evaluate`), then
report.json and report.html with the training summary found beside the adapter."""

from __future__ import annotations

from typing import Any

from rebase_ray.config import ConfigError, EvaluateConfig, S3Config, TaskConfig
from rebase_ray.evaluate.measure import comparison_rows, evaluate, metric_rows
from rebase_ray.evaluate.report import write_report
from rebase_ray.storage import Storage, open_storage
from rebase_ray.tasks import load_eval_set


def run(task: TaskConfig, model: str, adapter: str | None, cfg: EvaluateConfig,
        out: str | None = None, s3: S3Config | None = None,
        baselines: dict[str, str | None] | None = None, report: dict[str, Any] | None = None,
        required: bool = True) -> dict[str, Any]:
    """Evaluate `model` + `adapter` (and the base model, and `baselines`: {name: adapter or
    None}) per domain. With `out`, write the report there, with `report`'s extra parts
    (sections, examples, hits) and a manifest. No eval records is a ConfigError when
    `required`, else a report without evaluation."""
    eval_set = load_eval_set(task, s3)
    if required and not eval_set.records:
        raise ConfigError(f"task {task.name!r}: no eval records (`eval` missing, or every row "
                          f"rejected: {len(eval_set.rejects)} rejects)")
    result = (evaluate(task, eval_set.records, model, adapter, cfg, s3, baselines=baselines)
              if eval_set.records else None)
    summary: dict[str, Any] = {
        "task": task.name, "model": model, "adapter": adapter,
        "n": result["n"] if result else 0, "eval_rejects": len(eval_set.rejects),
        "seconds": result["seconds"] if result else 0.0,
        "examples_per_s": result["examples_per_s"] if result else 0.0,
        "resources": result["resources"] if result else {},
        "metrics": metric_rows(result) if result else [],
        "comparison": comparison_rows(result) if result else []}
    if out:
        st, out = open_storage(out, s3)
        doc: dict[str, Any] = {"title": f"rebase-ray — {task.name}",
                               "task": task.model_dump(mode="json"), **(report or {})}
        if result:
            doc["evaluation"] = result
        training = _training_summary(adapter, s3)
        if training:
            doc["training"] = training
        summary["report_json"], summary["report_html"] = write_report(out, doc, s3)
        st.write_manifest(out, {"stage": "evaluate", "task": task.name},
                          ["report.json", "report.html"])
    return summary


def _training_summary(adapter: str | None, s3: S3Config | None) -> dict | None:
    """The train_summary.json that `train` writes beside the adapter, if any."""
    if not adapter:
        return None
    st = Storage.for_uri(adapter, s3)
    uri = st.join(adapter.rstrip("/").rsplit("/", 1)[0], "train_summary.json")
    return st.read_json(uri) if st.exists(uri) else None
