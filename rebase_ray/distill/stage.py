"""BalDistill's stage loop: K stages spend the budget B (examples the teacher annotates or
synthesizes) on the domains of a long-tailed example pool, then fine-tune and evaluate the
student.

Stage i (1..K) has budget B/K split into per-domain quotas (planner.py). Its teacher phase
(teacher_phase.py) fills them: IFD-selected head examples get a rationale, tail domains
synthesize what their pool lacks, in rounds until the quotas are filled or the stage's calls are
spent. The student is then fine-tuned (Ray Train LoRA, from the base model) on all examples
gathered so far and evaluated per domain.

Files under `out`: plan.json; stage-i/{calls.parquet (one row per teacher call: kept or the
reason it was not), ifd.parquet, examples.parquet (all examples gathered up to stage i),
teacher.json, train/, eval.json, stage.json, manifest.json}; distill.json and
report.{json,html}. A stage with a manifest is finished and skipped on rerun; a stage whose
teacher calls are written resumes at training, so no call is ever made twice.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from rebase_ray.config import (
    ConfigError,
    DistillConfig,
    EvaluateConfig,
    S3Config,
    TaskConfig,
    TrainConfig,
    config_hash,
)
from rebase_ray.distill.domains import expected_domains
from rebase_ray.distill.planner import stage_budgets, stage_quotas
from rebase_ray.distill.pool import EXAMPLE_COLUMNS, clean_pool, read_pool, task_examples
from rebase_ray.distill.report import (
    domain_rows,
    run_summary,
    stage_metrics,
    write_distill_report,
)
from rebase_ray.distill.teacher_phase import POOL_KINDS, TeacherPhase
from rebase_ray.storage import open_storage
from rebase_ray.tasks import load_eval_set
from rebase_ray.text import NgramIndex
from rebase_ray.transform.filters import FilterContext


class Run:
    """State shared by the stages of one distill run."""

    def __init__(self, task: TaskConfig, pool: pd.DataFrame, out: str, cfg: DistillConfig,
                 train: TrainConfig, evaluate: EvaluateConfig, teacher_url: str,
                 api_key: str | None, s3: S3Config | None, teacher_model: str | None = None):
        self.task, self.pool, self.cfg, self.train, self.evaluate = task, pool, cfg, train, evaluate
        self.teacher_url, self.api_key, self.s3 = teacher_url, api_key, s3
        self.teacher_model = teacher_model
        self.st, self.out = open_storage(out, s3)
        self.sizes = {str(d): int(n) for d, n in pool["domain"].value_counts().sort_index().items()}
        for d in expected_domains(task, cfg):  # domains the pool lacks are the extreme tail
            self.sizes.setdefault(d, 0)
        self.budgets = stage_budgets(cfg.budget, cfg.stages)
        self.spent = 0  # examples the stages added
        self.calls = 0  # teacher requests they took
        eval_set = load_eval_set(task, s3)
        self.eval_records = eval_set.records
        self.filters = FilterContext(task, cfg.max_output_chars, cfg.reply.min_input_chars,
                                     NgramIndex([r["input"] for r in self.eval_records], n=13))

    def stage_dir(self, stage: int) -> str:
        return self.st.join(self.out, f"stage-{stage}")

    def check_plan(self) -> dict[str, Any]:
        """Write plan.json, or check that an existing one belongs to the same run."""
        ids = "\x1f".join(sorted(self.pool["example_id"]))
        plan = {"task": self.task.name, "plan_hash": self.cfg.plan_hash(),
                "train_hash": config_hash(self.train.what()),
                "pool": hashlib.sha256(ids.encode()).hexdigest()[:16],
                "budgets": self.budgets,
                "quotas": [stage_quotas(self.cfg.mode, i + 1, self.cfg.stages, b, self.sizes)
                           for i, b in enumerate(self.budgets)]}
        uri = self.st.join(self.out, "plan.json")
        if self.st.exists(uri):
            old = self.st.read_json(uri)
            for key in ("task", "plan_hash", "train_hash", "pool"):
                if old.get(key) != plan[key]:
                    raise ConfigError(
                        f"{self.out} holds a distill run with a different {key} "
                        f"({old.get(key)} ≠ {plan[key]}): use a new output folder, or delete it "
                        "to start over")
        else:
            self.st.write_json(uri, plan)
        return plan

    def train_and_evaluate(self, stage: int, gathered: pd.DataFrame, adapter: str | None
                           ) -> tuple[str | None, dict, dict | None, dict[str, float]]:
        """(adapter, train summary, evaluation, timings) of one stage. With no examples
        gathered yet, the student stays as it was (no training)."""
        from rebase_ray.evaluate import evaluate
        from rebase_ray.train import train_student

        sdir, timing = self.stage_dir(stage), {}
        training: dict[str, Any] = {"skipped": "no examples gathered yet"}
        if len(gathered):
            t0 = time.time()
            table = pa.Table.from_pandas(gathered[EXAMPLE_COLUMNS], preserve_index=False)
            training = train_student(table, self.task, self.train, self.st.join(sdir, "train"),
                                     s3=self.s3)
            adapter = training["adapter"]
            timing["train_s"] = round(time.time() - t0, 2)
        evaluation = None
        if self.eval_records and self.cfg.evaluate_stages:
            t0 = time.time()
            cfg = self.evaluate if stage == 1 else self.evaluate.model_copy(
                update={"baseline": False})
            evaluation = evaluate(self.task, self.eval_records, self.train.model, adapter, cfg,
                                  s3=self.s3)
            self.st.write_json(self.st.join(sdir, "eval.json"), evaluation)
            timing["eval_s"] = round(time.time() - t0, 2)
        return adapter, training, evaluation, timing


@dataclass
class Progress:
    """What the stages so far gathered and report."""

    gathered: pd.DataFrame
    used: set[str] = field(default_factory=set)  # pool examples given to the teacher
    adapter: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict | None = None
    stage_rows: list[dict] = field(default_factory=list)
    domain_rows: list[dict] = field(default_factory=list)
    metrics: dict[int, dict] = field(default_factory=dict)
    resumed: list[int] = field(default_factory=list)

    def add(self, record: dict[str, Any], calls: pd.DataFrame, gathered: pd.DataFrame) -> None:
        """Take in one finished stage's record (stage.json), calls and examples."""
        self.gathered = gathered
        self.used |= set(calls.loc[calls["kind"].isin(POOL_KINDS), "example_id"])
        self.adapter = record["summary"]["adapter"]
        self.stage_rows.append(record["summary"])
        self.domain_rows += record["domains"]
        self.metrics[record["summary"]["stage"]] = record["metrics"]


def _new_examples(calls: pd.DataFrame) -> pd.DataFrame:
    kept = calls[calls["status"] == "kept"]
    origin = np.where(kept["kind"].isin(POOL_KINDS), "pool", "synthesized")
    return kept.assign(origin=origin)[EXAMPLE_COLUMNS].reset_index(drop=True)


def _resume(run: Run, stage: int, progress: Progress) -> None:
    """Take in a stage finished by an earlier run."""
    st, sdir = run.st, run.stage_dir(stage)
    st.verify(sdir)
    record = st.read_json(st.join(sdir, "stage.json"))
    progress.add(record, st.read_parquet(st.join(sdir, "calls.parquet")).to_pandas(),
                 st.read_parquet(st.join(sdir, "examples.parquet")).to_pandas())
    run.spent = record["summary"]["spent_total"]
    run.calls = record["summary"].get("calls_total", run.calls)
    if st.exists(st.join(sdir, "eval.json")):
        progress.evaluation = st.read_json(st.join(sdir, "eval.json"))
    if st.exists(st.join(sdir, "train", "train_summary.json")):
        progress.training = st.read_json(st.join(sdir, "train", "train_summary.json"))
    progress.resumed.append(stage)


def _run_stage(run: Run, stage: int, plan: dict[str, Any], progress: Progress) -> None:
    """One stage: its teacher phase (or the calls an interrupted run wrote), then training and
    evaluation; writes stage.json and the manifest."""
    st, sdir, cfg = run.st, run.stage_dir(stage), run.cfg
    t0 = time.time()
    quotas = plan["quotas"][stage - 1]
    phase = TeacherPhase(run, stage, quotas, progress.gathered, progress.used, progress.adapter)
    roles = phase.roles()
    left = {d: int(n) for d, n in phase.unused()["domain"].value_counts().items()}
    calls_uri = st.join(sdir, "calls.parquet")
    if st.exists(calls_uri):  # the teacher phase finished before an interruption
        calls = st.read_parquet(calls_uri).to_pandas()
        teacher = st.read_json(st.join(sdir, "teacher.json"))
    else:
        calls, teacher = phase.run_teacher()
        teacher["timing"] = phase.timing
        teacher["ifd_resources"] = phase.ifd_resources
        st.write_json(st.join(sdir, "teacher.json"), teacher)
        st.write_parquet(calls_uri, pa.Table.from_pandas(calls, preserve_index=False))
    gathered = pd.concat([progress.gathered, _new_examples(calls)], ignore_index=True)
    st.write_parquet(st.join(sdir, "examples.parquet"),
                     pa.Table.from_pandas(gathered, preserve_index=False))
    kept, requests = int((calls["status"] == "kept").sum()), int(teacher["requests"])
    run.spent += kept
    run.calls += requests

    adapter, training, evaluation, timing = run.train_and_evaluate(stage, gathered,
                                                                   progress.adapter)
    metrics = stage_metrics(evaluation)
    student = metrics.get("trained") or metrics.get("base") or {}
    summary = {"stage": stage, "budget": run.budgets[stage - 1], "spent": kept,
               "spent_total": run.spent, "remaining": cfg.budget - run.spent,
               "calls": requests, "calls_total": run.calls, "call_limit": teacher["limit"],
               "rounds": teacher["rounds"], "kept": kept,
               "dropped": int((calls["status"] != "kept").sum()),
               "examples": len(gathered), "macro": student.get("macro"),
               "micro": student.get("micro"), "train_steps": training.get("steps"),
               "final_loss": training.get("final_loss"),
               **teacher.get("timing", {}), **timing,
               "ifd_resources": teacher.get("ifd_resources", {}),
               "wall_s": round(time.time() - t0, 2), "adapter": adapter}
    rows = domain_rows(stage, quotas, {d: r for d, (r, _) in roles.items()}, calls, metrics,
                       left)
    record = {"summary": summary, "domains": rows, "metrics": metrics,
              "reasons": calls["reason"].value_counts().to_dict(), "teacher": teacher}
    st.write_json(st.join(sdir, "stage.json"), record)
    st.write_manifest(sdir, {"stage": stage, "plan_hash": plan["plan_hash"], "spent": kept,
                             "spent_total": run.spent, "calls": requests},
                      ["calls.parquet", "examples.parquet", "stage.json"])
    progress.add(record, calls, gathered)
    progress.training, progress.evaluation = training, evaluation


def run(task: TaskConfig, examples: str | pa.Table, out: str, cfg: DistillConfig,
        train: TrainConfig, evaluate: EvaluateConfig, teacher_url: str,
        api_key: str | None = None, s3: S3Config | None = None,
        teacher_model: str | None = None) -> dict[str, Any]:
    """Run BalDistill's K stages on an example pool with the teacher at `teacher_url` (an
    OpenAI-compatible base URL); resumes at the first unfinished stage. Returns the summary
    (also written to `<out>/distill.json`)."""
    t_start = time.time()
    pool, rejects = clean_pool(read_pool(examples, s3), cfg)
    if pool.empty:
        raise ConfigError(f"no usable examples in the distill pool ({len(rejects)} rejected: "
                          f"{rejects['reason'].value_counts().to_dict()})")
    run_ = Run(task, pool, out, cfg, train, evaluate, teacher_url, api_key, s3, teacher_model)
    st = run_.st
    plan = run_.check_plan()
    if len(rejects):
        st.write_parquet(st.join(run_.out, "pool_rejects.parquet"),
                         pa.Table.from_pandas(rejects, preserve_index=False))
    progress = Progress(task_examples(task, cfg) if cfg.task_examples
                        else pd.DataFrame(columns=EXAMPLE_COLUMNS))
    for stage in range(1, cfg.stages + 1):
        if st.read_manifest(run_.stage_dir(stage)) is not None:
            _resume(run_, stage, progress)
        else:
            _run_stage(run_, stage, plan, progress)
    result = run_summary(run_, rejects, progress.stage_rows, progress.domain_rows,
                         progress.metrics, progress.resumed, progress.adapter,
                         time.time() - t_start)
    st.write_json(st.join(run_.out, "distill.json"), result)
    result["report"] = write_distill_report(run_, result, progress.gathered, progress.training,
                                            progress.evaluation)[1]
    return result
