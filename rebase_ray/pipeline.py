"""`run`: the stages in order — index → retrieve → transform → distill → baselines → evaluate —
as one resumable run with a run manifest (`<storage_root>/run.json`).

Each stage has a key: the hash of its own config and the keys of the stages it reads from. A
stage whose key matches the manifest's and whose outputs are still on storage is skipped, so a
rerun (or a run killed half-way) resumes at the first unfinished or changed stage. The teacher
for transform, distill and the synthetic baseline is `teacher.url` when set, else the
configured teacher started on Ray Serve for the duration of those stages. The baselines stage
(`evaluate.baselines`) trains the comparison students; the evaluate stage scores the base, the
baselines and the distilled student in one pass. A stage whose output is too small for the
next stops the run there (`StageTooSmall`), after writing a report of the stages that ran.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from rebase_ray.config import ConfigError, PipelineConfig, config_hash
from rebase_ray.runtime import init_ray
from rebase_ray.storage import Storage, open_storage

RUN_MANIFEST = "run.json"
# the file each stage writes last: its presence means the stage's outputs are complete
FINISHED = {"index": "manifest.json", "retrieve": "manifest.json", "transform": "manifest.json",
            "distill": "distill.json", "baselines": "manifest.json",
            "evaluate": "manifest.json"}


class Run:
    """Where one run's artifacts live and what its manifest says."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.st, self.root = open_storage(cfg.storage_root, cfg.s3)
        self.manifest_uri = Storage.join(self.root, RUN_MANIFEST)
        self.manifest = (self.st.read_json(self.manifest_uri) if self.st.exists(self.manifest_uri)
                         else {"stages": {}})
        self.datastore = cfg.datastore or Storage.join(self.root, "datastore")

    def out(self, stage: str) -> str:
        return self.datastore if stage == "index" else Storage.join(self.root, stage)

    def keys(self) -> dict[str, str]:
        c = self.cfg
        keys = {"index": config_hash(c.datastore or [s.model_dump() for s in c.sources or []],
                                     c.index.build_hash())}
        keys["retrieve"] = config_hash(keys["index"], c.task,
                                       c.retrieve.what())
        teacher = (c.teacher.model, c.teacher.url, c.teacher.served_model_name)
        keys["transform"] = config_hash(keys["retrieve"], c.transform, *teacher)
        # what each stage produces, not its resources (`Strict.what`): a resource change
        # reuses finished stages
        keys["distill"] = config_hash(keys["transform"], c.distill.what(), c.train.what(),
                                      c.evaluate.what())
        keys["baselines"] = config_hash(keys["distill"], c.evaluate.baselines, c.train.what(),
                                        c.transform, *teacher)
        keys["evaluate"] = config_hash(keys["baselines"], c.evaluate.what())
        return keys

    def needs_teacher(self, stage: str) -> bool:
        return stage in ("transform", "distill") or (
            stage == "baselines" and "synthetic" in self.cfg.evaluate.baselines)

    def is_done(self, stage: str, key: str) -> bool:
        entry = self.manifest["stages"].get(stage)
        if not entry or entry.get("key") != key:
            return False
        return self.st.exists(Storage.join(self.out(stage), FINISHED[stage]))

    def record(self, stage: str, key: str, summary: dict, wall_s: float) -> None:
        self.manifest["stages"][stage] = {"key": key, "wall_s": round(wall_s, 2),
                                          "finished_at": time.time(), "summary": summary}
        self.st.write_json(self.manifest_uri, self.manifest)


@contextlib.contextmanager
def teacher_endpoint(cfg: PipelineConfig) -> Iterator[str]:
    if cfg.teacher.url:
        yield cfg.teacher.url
        return
    from rebase_ray.serve.teacher import local_teacher

    with local_teacher(cfg.teacher) as url:
        yield url


def run(cfg: PipelineConfig, only: list[str] | None = None, force: bool = False,
        on_stage: Callable[[str, str, dict | None], None] | None = None) -> dict[str, Any]:
    """Run the pipeline (or the stages in `only`); returns a summary with one row per stage.
    `on_stage(stage, status, brief)` is called as each stage starts ("running", None), is
    skipped ("skipped (up to date)" or "off", None) or finishes ("done", its `brief`)."""
    for stage in only or []:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    todo = [s for s in STAGES if only is None or s in only]
    if {"index", "retrieve"} & set(todo):
        cfg.require_data()
    if set(todo) - {"index"}:
        cfg.require_task()
    init_ray(cfg.ray)
    r = Run(cfg)
    keys = r.keys()
    rows = []
    t_run = time.time()

    def tell(stage: str, status: str, summary: dict | None = None) -> None:
        if on_stage:
            on_stage(stage, status, brief(stage, summary) if summary else None)

    with contextlib.ExitStack() as stack:
        url = None  # the teacher starts with the first stage that needs it, not before
        for i, stage in enumerate(todo):
            if stage == "index" and cfg.datastore:
                rows.append({"stage": stage, "status": "reused", "wall_s": 0.0,
                             "output": r.datastore})
                continue
            if stage == "baselines" and not cfg.evaluate.baselines:
                tell(stage, "off")
                rows.append({"stage": stage, "status": "off", "wall_s": 0.0, "output": ""})
                continue
            if not force and r.is_done(stage, keys[stage]):
                tell(stage, "skipped (up to date)")
                rows.append({"stage": stage, "status": "skipped (up to date)", "wall_s": 0.0,
                             "output": r.out(stage)})
                continue
            tell(stage, "running")
            t0 = time.time()
            if r.needs_teacher(stage) and url is None:
                url = stack.enter_context(teacher_endpoint(cfg))
            summary = STAGE_FUNCS[stage](r, url)
            if url is not None and not any(r.needs_teacher(s) for s in todo[i + 1:]):
                stack.close()  # the teacher's memory and CPUs go back for training and eval
                url = None
            wall = time.time() - t0
            r.record(stage, keys[stage], summary, wall)
            tell(stage, "done", summary)
            rows.append({"stage": stage, "status": "done", "wall_s": round(wall, 1),
                         "output": r.out(stage)})
            problem = too_small(stage, summary, cfg)
            if problem:
                report = _partial_report(r, stage, problem)
                raise StageTooSmall(f"the run stops after {stage}: {problem} (its outputs: "
                                    f"{r.out(stage)}; run manifest: {r.manifest_uri}; report of "
                                    f"the stages that ran: {report})")
    result: dict[str, Any] = {"storage_root": r.root, "stages": rows,
                              "wall_s": round(time.time() - t_run, 1)}
    final = r.manifest["stages"].get("evaluate", {}).get("summary")
    if final:
        result["comparison"] = final.get("comparison")
        result["report"] = final.get("report_html")
    return result


class StageTooSmall(ConfigError):
    """A stage's output is too small for the next stage: the run stops there, early, with the
    reasons and what to change (a user-facing error, like a bad config)."""


def too_small(stage: str, summary: dict, cfg: PipelineConfig) -> str | None:
    """Why the run cannot go on after `stage`, or None."""
    if stage == "retrieve" and summary["rows"] == 0:
        excluded = [e["dataset"] for e in summary["excluded_sources"]]
        return ("no row was retrieved (sources excluded by decontamination: "
                f"{', '.join(excluded) or 'none'}); add sources related to the task")
    if stage == "transform" and summary["counts"]["kept"] < cfg.transform.min_examples:
        reasons = ", ".join(f"{k} {v}" for k, v in summary["rejects_by_reason"].items())
        return (f"the transformation kept {summary['counts']['kept']} of "
                f"{summary['counts']['retrieved']} retrieved rows, fewer than "
                f"transform.min_examples ({cfg.transform.min_examples}) (rejects: "
                f"{reasons or 'none'}). To change: a stronger teacher (`teacher.url` "
                "or `teacher.model`), more rows (`retrieve.top_n`), longer replies "
                "(`transform.max_tokens`, if many are truncated), or "
                "`transform.label_check.mode: none` (if most labels are unconfirmed)")
    return None


def brief(stage: str, summary: dict) -> dict[str, Any]:
    """The few figures of a stage's summary that a person reads on the console (the whole
    summary is in the run manifest and the stage's folder)."""
    if stage == "index":
        return {"sources": len(summary["sources"]), "cells": summary["cells"],
                "cells/s": summary["cells_per_s"], "wall_s": summary["wall_s"]}
    if stage == "retrieve":
        top = ", ".join(f"{d['dataset']} {d['rows']}" for d in summary["rows_per_dataset"][:5])
        return {"rows": summary["rows"], "top sources": top,
                "excluded": ", ".join(e["dataset"] for e in summary["excluded_sources"]),
                "wall_s": summary["wall_s"]}
    if stage == "transform":
        return {**summary["counts"], "requests": summary["teacher"]["requests_total"],
                "rejects": summary["rejects_by_reason"], "labels": summary["per_label"],
                "wall_s": summary["wall_s"]}
    if stage == "distill":
        roles: dict[str, set[str]] = {}
        for row in summary["domains"]:
            roles.setdefault(row["domain"], set()).add(row["role"])
        return {"stages": summary["num_stages"],
                "spent": f"{summary['spent']}/{summary['budget']}",
                "calls": summary["calls"],
                "examples": summary["stages"][-1]["examples"] if summary["stages"] else 0,
                "roles": {d: "/".join(sorted(r)) for d, r in sorted(roles.items())},
                "wall_s": summary["wall_s"]}
    if stage == "baselines":
        return {b["baseline"]: {k: b[k] for k in ("examples", "requests", "train_steps")
                                if b.get(k) is not None} for b in summary["baselines"]}
    if stage == "evaluate":
        return {"report": summary["report_html"]}
    return summary


def _partial_report(r: Run, stopped_at: str, problem: str) -> str:
    """report.html of the stages that ran (their summaries), for a run that stopped early."""
    from rebase_ray.evaluate.report import write_report

    sections = [{"title": f"The run stopped after {stopped_at}", "text": problem}]
    for stage in STAGES:
        entry = r.manifest["stages"].get(stage)
        if entry:
            sections.append({"title": f"{stage} ({entry['wall_s']} s)",
                             "table": [{"figure": k, "value": json.dumps(v, default=str)[:300]}
                                       for k, v in brief(stage, entry["summary"]).items()]})
    task = r.cfg.task  # None when only the index ran, with no task given
    report = {"title": f"rebase-ray — {task.name if task else 'index'} (stopped after "
                       f"{stopped_at})",
              "task": task.model_dump(mode="json") if task else None, "sections": sections}
    return write_report(r.out("evaluate"), report, r.cfg.s3)[1]


# --------------------------------------------------------------------------- stage bodies


def _index(r: Run, _url: str | None) -> dict:
    from rebase_ray.datastore import build_datastore

    return build_datastore(r.cfg.sources, r.datastore, r.cfg.index, s3=r.cfg.s3)


def _retrieve(r: Run, _url: str | None) -> dict:
    from rebase_ray.retrieve import retrieve

    return retrieve(r.cfg.task, r.datastore, r.out("retrieve"), r.cfg.retrieve, s3=r.cfg.s3)


def _api_key(cfg: PipelineConfig) -> str | None:
    from rebase_ray.serve.http import teacher_client_key

    return teacher_client_key(cfg.teacher, local=cfg.teacher.url is None)


def _teacher_model(cfg: PipelineConfig) -> str | None:
    """The model to ask an external endpoint (`teacher.url`) for: `served_model_name`, else
    the first one it lists; our own local teacher serves one model."""
    return cfg.teacher.served_model_name if cfg.teacher.url else None


def _transform(r: Run, url: str | None) -> dict:
    from rebase_ray.transform import transform

    return transform(r.cfg.task, r.out("retrieve"), url, r.out("transform"), r.cfg.transform,
                     s3=r.cfg.s3, api_key=_api_key(r.cfg), sources=r.cfg.sources,
                     teacher_model=_teacher_model(r.cfg))


def _distill(r: Run, url: str | None) -> dict:
    from rebase_ray.distill import distill

    return distill(r.cfg.task, Storage.join(r.out("transform"), "examples.parquet"),
                   r.out("distill"), r.cfg.distill, r.cfg.train, r.cfg.evaluate,
                   teacher_url=url, api_key=_api_key(r.cfg), s3=r.cfg.s3,
                   teacher_model=_teacher_model(r.cfg))


def _baselines(r: Run, url: str | None) -> dict:
    from rebase_ray import baselines

    transformed = r.st.read_json(Storage.join(r.out("transform"), "stats.json"))
    distilled = r.st.read_json(Storage.join(r.out("distill"), "distill.json"))
    return baselines.run(r.cfg.task, r.out("baselines"), r.cfg.evaluate.baselines, r.cfg.train,
                         r.cfg.transform, url, prompts=transformed["counts"]["retrieved"],
                         requests=transformed["teacher"]["requests_total"] + distilled["calls"],
                         api_key=_api_key(r.cfg), s3=r.cfg.s3,
                         teacher_model=_teacher_model(r.cfg))


def _evaluate(r: Run, _url: str | None) -> dict:
    """The run's report (`evaluate.stage.run`, as `rebase-ray eval`): the final distilled
    student against the base student and the baselines on the eval set, all answered in one
    pass (the same prompts, each adapter switched on in turn and all off for the base row),
    the training data with the rows it came from, and the BalDistill views."""
    from rebase_ray.distill.report import report_sections
    from rebase_ray.evaluate.stage import run as evaluate_stage

    st, task = r.st, r.cfg.task
    result = st.read_json(st.join(r.out("distill"), "distill.json"))
    report: dict = {
        "sections": report_sections(result, task.metric),
        "examples": st.read_parquet(st.join(r.out("transform"), "examples.parquet")).to_pylist(),
        "hits": st.read_parquet(st.join(r.out("retrieve"), "hits.parquet")).to_pylist(),
    }
    baseline_adapters = {}
    if r.cfg.evaluate.baselines:
        done = st.read_json(st.join(r.out("baselines"), "baselines.json"))
        # a baseline with nothing to train on is the base model (adapter None)
        baseline_adapters = {b["baseline"]: b.get("adapter") for b in done["baselines"]}
        report["sections"].insert(0, {"title": "Baselines: what each comparison student "
                                               "trained on", "table": done["baselines"]})
    summary = evaluate_stage(task, r.cfg.train.model, result.get("final_adapter"),
                             r.cfg.evaluate, out=r.out("evaluate"), s3=r.cfg.s3,
                             baselines=baseline_adapters, report=report, required=False)
    return {**summary, "final_adapter": result.get("final_adapter")}


STAGE_FUNCS: dict[str, Callable[[Run, str | None], dict]] = {
    "index": _index, "retrieve": _retrieve, "transform": _transform, "distill": _distill,
    "baselines": _baselines, "evaluate": _evaluate,
}
STAGES = tuple(STAGE_FUNCS)  # the stages, in the order they run
