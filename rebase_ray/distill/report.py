"""BalDistill's summaries and report: per-stage, per-domain rows, the metric curves across
stages, and the report's sections (the pool's long tail, macro vs micro, per-domain curves)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from rebase_ray.distill.domains import long_tail_stats
from rebase_ray.distill.teacher_phase import POOL_KINDS

if TYPE_CHECKING:
    from rebase_ray.distill.stage import Run


def stage_metrics(evaluation: dict | None) -> dict[str, Any]:
    """{run: {'domains': {d: value}, 'macro', 'micro'}} of the metric's main key."""
    if not evaluation:
        return {}
    key = evaluation["keys"][0]
    return {run: {"domains": {d: m[key] for d, m in agg["domains"].items()},
                  "macro": agg["macro"][key], "micro": agg["micro"][key]}
            for run, agg in evaluation["runs"].items()}


def domain_rows(stage: int, quotas: dict[str, int], roles: dict[str, str], calls: pd.DataFrame,
                metrics: dict[str, Any], left: dict[str, int]) -> list[dict[str, Any]]:
    """One row per domain of the stage: its quota, what was asked for and what was kept."""
    student = metrics.get("trained") or metrics.get("base") or {}
    rows = []
    for domain in sorted(quotas):
        mine = calls[calls["domain"] == domain]
        rows.append({"stage": stage, "domain": domain, "role": roles.get(domain, "-"),
                     "quota": quotas[domain], "pool_left": left.get(domain, 0),
                     "selected": int(mine["kind"].isin(POOL_KINDS).sum()),
                     "synthesized": int((mine["kind"] == "synthesize").sum()),
                     "kept": int((mine["status"] == "kept").sum()),
                     "dropped": int((mine["status"] != "kept").sum()),
                     "metric": student.get("domains", {}).get(domain)})
    return rows


def curves(metrics_by_stage: dict[int, dict]) -> list[dict[str, Any]]:
    """One row per eval domain plus macro and micro: the metric after each stage (and of the
    base model, when stage 1 evaluated it)."""
    names: dict[str, dict[str, Any]] = {}
    base = metrics_by_stage.get(1, {}).get("base") if metrics_by_stage.get(1, {}).get(
        "trained") else None
    for label, m in ([("base", base)] if base else []) + [
            (f"stage {s}", metrics_by_stage[s].get("trained") or metrics_by_stage[s].get("base"))
            for s in sorted(metrics_by_stage)]:
        if not m:
            continue
        for d, v in m["domains"].items():
            names.setdefault(d, {"domain": d})[label] = v
        names.setdefault("(macro)", {"domain": "(macro)"})[label] = m["macro"]
        names.setdefault("(micro)", {"domain": "(micro)"})[label] = m["micro"]
    return [names[d] for d in sorted(names, key=lambda d: (d.startswith("("), d))]


def run_summary(run: Run, rejects: pd.DataFrame, stage_rows: list[dict], domains: list[dict],
                metrics_by_stage: dict[int, dict], resumed: list[int], adapter: str | None,
                wall_s: float) -> dict[str, Any]:
    """The distill summary: `spent` counts the examples the stages added (of the budget B),
    `calls` the teacher requests they took."""
    return {
        "task": run.task.name, "mode": run.cfg.mode, "num_stages": run.cfg.stages,
        "budget": run.cfg.budget, "spent": run.spent, "remaining": run.cfg.budget - run.spent,
        "calls": run.calls,
        "task_examples": len(run.task.examples) if run.cfg.task_examples else 0,
        "pool": {"examples": len(run.pool), "rejected": len(rejects),
                 **{f"rejected_{k}": int(v) for k, v in rejects["reason"].value_counts().items()}},
        "long_tail": long_tail_stats(run.pool["domain"]),
        "stages": stage_rows,
        "domains": domains,
        "curves": curves(metrics_by_stage),
        "resumed_stages": resumed,
        "final_adapter": adapter,
        "out": run.out,
        "wall_s": round(wall_s, 2),
    }


def report_sections(result: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """The BalDistill views of a distill summary, for `write_report`'s `sections`: the pool's
    long tail, macro vs micro across stages, per-domain curves, per-stage selection."""
    stats = result["long_tail"]
    stages = [r["stage"] for r in result["stages"]]
    return [
        {"title": "Pool: examples per domain (long tail)",
         "text": f"{stats['domains']} domains, imbalance ratio {stats['imbalance_ratio']}, "
                 f"Gini {stats['gini']}.",
         "bar_chart": {"categories": list(stats["counts"]),
                       "series": {"examples": list(stats["counts"].values())},
                       "y_label": "examples"}},
        {"title": "BalDistill stages: budget, kept examples, macro vs micro",
         "line_chart": {"series": {k: [[s, r[k]] for s, r in zip(stages, result["stages"])
                                       if r[k] is not None] for k in ("macro", "micro")},
                        "x_label": "stage", "y_label": metric},
         "table": [{k: v for k, v in r.items() if k != "adapter"} for r in result["stages"]]},
        {"title": "Per-domain metric after each stage",
         "line_chart": {"series": {c["domain"]: [[s, c[f"stage {s}"]] for s in stages
                                                 if f"stage {s}" in c]
                                   for c in result["curves"]},
                        "x_label": "stage", "y_label": metric},
         "table": result["curves"]},
        {"title": "Per-stage, per-domain selection", "table": result["domains"]},
    ]


def write_distill_report(run: Run, result: dict, gathered: pd.DataFrame, training: dict,
                         evaluation: dict | None) -> tuple[str, str]:
    from rebase_ray.evaluate.report import write_report

    report = {"title": f"BalDistill ({run.cfg.mode}) — {run.task.name}",
              "task": run.task.model_dump(mode="json"),
              "sections": report_sections(result, run.task.metric),
              "examples": gathered.to_dict(orient="records")}
    if evaluation:
        report["evaluation"] = evaluation
    if training.get("loss_curve"):
        report["training"] = training
    return write_report(run.out, report, run.s3)
