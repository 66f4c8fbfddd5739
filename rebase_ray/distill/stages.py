"""BalDistill's stage loop: K stages spend the teacher budget B on the domains of a long-tailed
example pool, then fine-tune and evaluate the student.

Stage i (1..K), for every domain d with quota q = quota_d(i) (planner.py):
- head (the unused pool of d holds at least q examples): the current student answers up to
  `ifd_candidates`·q unused candidates, which are ranked by IFD (ifd.py); the top q go to the
  teacher for a rationale given the gold answer (an example that has one from transform's
  annotation keeps it, at no cost);
- tail (fewer than q unused): the rest of d's pool goes to the teacher for rationales (the
  same way), and the teacher synthesizes the missing examples from a few of d's examples
  (versioned prompt; when domains are labels, the example's output is the domain's label, by
  prompt and schema), filtered like transform's examples (parse, label set, copies,
  contamination, duplicates).
A rationale whose own final answer disagrees with the gold answer is dropped with its example;
every teacher call counts against the budget, kept or not. The student is then fine-tuned (Ray
Train LoRA, from the base model) on all examples gathered so far and evaluated per domain.

Files under `out`: plan.json; stage-i/{calls.parquet (one row per teacher call: kept or the
reason it was not), examples.parquet (all examples gathered up to stage i), teacher.json,
train/, eval.json, stage.json, manifest.json}; distill.json and report.{json,html}. A stage with
a manifest is finished and skipped on rerun; a stage whose teacher calls are written resumes at
training, so no call is ever made twice.
"""

from __future__ import annotations

import hashlib
import time
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
from rebase_ray.distill.domains import assign_domains, expected_domains, long_tail_stats
from rebase_ray.distill.ifd import score_ifd
from rebase_ray.distill.planner import stage_budgets, stage_quotas
from rebase_ray.distill.prompts import SYNTHESIS_VERSION, synthesis_messages
from rebase_ray.formats import student_target
from rebase_ray.storage import Storage, open_storage
from rebase_ray.tasks import fewshot_rows, load_eval_set
from rebase_ray.teacher.client import BudgetExceeded, TeacherClient, request_seed
from rebase_ray.text import NgramIndex, normalize
from rebase_ray.transform.filters import Deduplicator, FilterContext
from rebase_ray.transform.judge import judge_example, judge_rationale
from rebase_ray.transform.label_check import check_labels
from rebase_ray.transform.prompts import RATIONALE_VERSION, rationale_messages
from rebase_ray.transform.schema import reply_formats

CALL_COLUMNS = ["stage", "domain", "role", "kind", "example_id", "status", "reason", "detail",
                "input", "output", "rationale", "ifd", "student_output", "teacher",
                "prompt_version", "prompt_tokens", "completion_tokens"]
POOL_KINDS = ("annotate", "select")  # calls that use up a pool example
EXAMPLE_COLUMNS = ["example_id", "domain", "input", "output", "rationale", "origin", "stage",
                   "teacher", "prompt_version"]


# ----------------------------------------------------------------------------- pool


def read_pool(examples: str | pa.Table, s3: S3Config | None = None) -> pd.DataFrame:
    """The example pool (a table, an examples.parquet URI or the folder holding one)."""
    if isinstance(examples, pa.Table):
        return examples.to_pandas()
    uri = examples if examples.endswith(".parquet") else Storage.join(examples, "examples.parquet")
    return Storage.for_uri(uri, s3).read_parquet(uri).to_pandas()


def clean_pool(pool: pd.DataFrame, cfg: DistillConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(usable pool with `domain`, rejects with `example_id` and `reason`): rows without input
    or output, repeated example ids and rows without a domain are rejected, never dropped."""
    missing = {"input", "output"} - set(pool.columns)
    if missing:
        raise ConfigError(f"the distill examples lack column(s) {sorted(missing)}; they have "
                          f"{list(pool.columns)}")
    pool = pool.copy()
    for col in ("input", "output"):
        pool[col] = pool[col].fillna("").astype(str).str.strip()
    if "example_id" not in pool.columns:
        pool["example_id"] = [hashlib.sha256(f"{i}\x1f{o}".encode()).hexdigest()[:16]
                              for i, o in zip(pool["input"], pool["output"])]
    empty = (pool["input"] == "") | (pool["output"] == "")
    repeated = pool["example_id"].duplicated() & ~empty
    rejects = [pool.loc[empty, ["example_id"]].assign(reason="empty"),
               pool.loc[repeated, ["example_id"]].assign(reason="duplicate_id")]
    pool, no_domain = assign_domains(pool[~empty & ~repeated], cfg)
    rejects = pd.concat(rejects + [no_domain], ignore_index=True)
    return pool, rejects


def task_examples(task: TaskConfig, cfg: DistillConfig) -> pd.DataFrame:
    """The task's few-shot examples as gathered examples (origin "task", stage 0, no teacher
    call); their domain is their label when domains are labels, else "(task)"."""
    rows = [{**r, "domain": r["output"].strip() if cfg.domain_from == "label" else "(task)",
             "origin": "task", "stage": 0, "teacher": "", "prompt_version": ""}
            for r in fewshot_rows(task)]
    return pd.DataFrame(rows, columns=EXAMPLE_COLUMNS)


def _rng(seed: int, *parts: Any) -> np.random.Generator:
    key = "\x1f".join(str(p) for p in (seed, *parts))
    return np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:12], 16))


# ----------------------------------------------------------------------------- one stage


class Stage:
    """The teacher phase of one stage: roles, IFD selection, annotation and synthesis."""

    def __init__(self, run: Run, stage: int, quotas: dict[str, int], gathered: pd.DataFrame,
                 used: set[str], adapter: str | None):
        self.run, self.stage, self.quotas = run, stage, quotas
        self.gathered, self.used, self.adapter = gathered, used, adapter
        self.timing: dict[str, float] = {}

    def unused(self) -> pd.DataFrame:
        """The pool's examples not given to the teacher in an earlier stage."""
        return self.run.pool[~self.run.pool["example_id"].isin(self.used)]

    def roles(self) -> dict[str, tuple[str, pd.DataFrame]]:
        """{domain: (head | tail, its unused pool)} for the domains with a quota."""
        unused = self.unused()
        out = {}
        for domain, q in self.quotas.items():
            if q <= 0:
                continue
            left = unused[unused["domain"] == domain]
            out[domain] = ("head" if len(left) >= q else "tail", left)
        return out

    def select_head(self, roles: dict[str, tuple[str, pd.DataFrame]]) -> pd.DataFrame:
        """The top-q IFD candidates of every head domain (with their IFD columns)."""
        cfg = self.run.cfg
        samples = []
        for domain, (role, left) in roles.items():
            if role != "head":
                continue
            n = min(len(left), cfg.ifd_candidates * self.quotas[domain])
            idx = _rng(cfg.seed, "ifd", self.stage, domain).choice(len(left), n, replace=False)
            samples.append(left.iloc[np.sort(idx)])
        if not samples:
            return self.run.pool.iloc[:0].assign(ifd=pd.Series(dtype=float), student_output="")
        t0 = time.time()
        scored = score_ifd(
            pd.concat(samples, ignore_index=True), self.run.train.model, self.adapter,
            self.run.task.instruction, batch_size=cfg.ifd_batch_size,
            max_new_tokens=cfg.ifd_max_new_tokens, max_seq_len=self.run.train.max_seq_len,
            actors=cfg.ifd_actors, num_cpus=cfg.ifd_num_cpus, num_gpus=cfg.ifd_num_gpus,
            s3=self.run.s3, threads=cfg.ifd_torch_threads, dtype=cfg.ifd_dtype)
        self.timing["ifd_s"] = round(time.time() - t0, 2)
        scored["_rank_key"] = scored["ifd"].fillna(-np.inf)
        picked = pd.concat([g.sort_values(["_rank_key", "example_id"], ascending=[False, True],
                                          kind="stable").head(self.quotas[d])
                            for d, g in scored.groupby("domain", sort=True)], ignore_index=True)
        scored = scored.assign(selected=scored["example_id"].isin(picked["example_id"]))
        st = self.run.st
        columns = ["example_id", "domain", "input", "student_output", "ppl_conditional",
                   "ppl_alone", "ifd", "selected"]
        st.write_parquet(st.join(self.run.stage_dir(self.stage), "ifd.parquet"),
                         pa.Table.from_pandas(scored[columns], preserve_index=False))
        return picked.drop(columns="_rank_key")

    def shots(self, domain: str, k: int) -> list[dict[str, str]]:
        """A few examples of the domain for one synthesis prompt: gathered ones (they carry
        the teacher's rationale) first, then pool ones."""
        cfg = self.run.cfg
        rng = _rng(cfg.seed, "shots", self.stage, domain, k)
        chosen: list[dict[str, str]] = []
        for frame in (self.gathered, self.run.pool):
            rows = frame[frame["domain"] == domain]
            need = cfg.synth_shots - len(chosen)
            if need <= 0 or rows.empty:
                continue
            idx = rng.choice(len(rows), min(need, len(rows)), replace=False)
            for r in rows.iloc[np.sort(idx)].to_dict(orient="records"):
                chosen.append({"input": r["input"],
                               "output": student_target(r["output"], r.get("rationale"))})
        if not chosen:  # a domain nothing was retrieved for: the task's own few-shot examples
            fewshot = self.run.task.examples
            matching = [e for e in fewshot if normalize(e.output) == normalize(domain)]
            chosen = [{"input": e.input, "output": e.output}
                      for e in (matching or fewshot)[: cfg.synth_shots]]
        return chosen

    def run_teacher(self) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Every teacher call of the stage as one row of CALL_COLUMNS, and the client stats."""
        run, cfg = self.run, self.run.cfg
        roles = self.roles()
        head = self.select_head(roles)
        jobs: list[dict[str, Any]] = []  # one per teacher call
        # a pool example needs a teacher rationale only when the task uses chain of thought
        # and it has none yet (transform's annotation may have written it); otherwise it is
        # selected as it is, at no teacher cost
        def use(r: dict) -> str:
            has = isinstance(r.get("rationale"), str) and r["rationale"].strip()
            return "annotate" if run.task.cot != "none" and not has else "select"

        for r in head.to_dict(orient="records"):
            jobs.append({"kind": use(r), "role": "head", "row": r})
        for domain, (role, left) in sorted(roles.items()):
            if role != "tail":
                continue
            for r in left.to_dict(orient="records"):
                jobs.append({"kind": use(r), "role": "tail", "row": r})
            for k in range((self.quotas[domain] - len(left)) // self._synthesis_cost()):
                jobs.append({"kind": "synthesize", "role": "tail", "domain": domain,
                             "shots": self.shots(domain, k), "k": k})
        limit = max(0, min(run.budgets[self.stage - 1], run.cfg.budget - run.spent))
        client = TeacherClient(run.teacher_url, api_key=run.api_key, model=run.teacher_model,
                               concurrency=cfg.concurrency, max_requests=limit)
        sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p,
                    "max_tokens": cfg.max_tokens}
        formats = reply_formats(run.task, cfg.reply, synthesis=True)
        t0 = time.time()
        replies: dict[int, Any] = {}
        # domains that are labels: a domain's synthesized example has that label, by prompt
        # and by schema (its `output` an enum of the one label)
        by_label = cfg.domain_from == "label" and bool(run.task.labels)
        for kind, fmt, messages in (
                ("annotate", "rationale", lambda j: rationale_messages(
                    run.task, j["row"]["input"], j["row"]["output"])),
                ("synthesize", "example", lambda j: synthesis_messages(
                    run.task, j["domain"], j["shots"], label=j["domain"] if by_label else None))):
            asks = [i for i, j in enumerate(jobs) if j["kind"] == kind]
            if asks:
                own = [{"seed": self._seed(jobs[i])} for i in asks]
                if kind == "synthesize" and by_label:
                    for o, i in zip(own, asks):
                        o.update(reply_formats(run.task, cfg.reply, synthesis=True,
                                               label=jobs[i]["domain"])["example"])
                out = client.chat_many([messages(jobs[i]) for i in asks], per_request=own,
                                       **sampling, **formats[fmt])
                replies.update(zip(asks, out))
        dedup = self._deduplicator(roles)
        calls = [self._call(j, replies.get(i), client.model or "", dedup)
                 for i, j in enumerate(jobs)]
        self._check_labels(client, calls)
        self.timing["teacher_s"] = round(time.time() - t0, 2)
        stats = {**client.summary(), "limit": limit}
        return pd.DataFrame(calls, columns=CALL_COLUMNS), stats

    def _seed(self, job: dict[str, Any]) -> int:
        """The job's request seed: a rerun of the stage gets the same replies."""
        what = job["row"]["example_id"] if "row" in job else (job["domain"], job["k"])
        return request_seed(self.run.cfg.seed, self.stage, job["kind"], what)

    def _synthesis_cost(self) -> int:
        """Teacher calls per synthesized example: the synthesis and its label requests."""
        check = self.run.cfg.label_check
        if not self.run.task.labels or check.mode == "none":
            return 1
        return 1 + (1 if check.mode == "roundtrip" else check.votes)

    def _check_labels(self, client: TeacherClient, calls: list[dict[str, Any]]) -> None:
        """The label check on kept synthesized examples (label tasks): the teacher labels each
        generated input again; its extra requests are spent from the same budget."""
        run = self.run
        kept = [c for c in calls if c["kind"] == "synthesize" and c["status"] == "kept"]
        if not run.task.labels or not kept:
            return
        verdicts = check_labels(client, run.task, run.filters,
                                [(c["input"], c["output"]) for c in kept],
                                run.cfg.label_check, run.cfg.seed)
        for c, v in zip(kept, verdicts):
            if v.label is None:
                c.update(status="rejected", reason=v.reason, detail=v.detail)
            elif v.label != c["output"]:
                c.update(output=v.label, rationale="")  # a generated one argued the old label

    def _deduplicator(self, roles: dict[str, tuple[str, pd.DataFrame]]) -> Deduplicator:
        """Knows every gathered input and the pool inputs of the tail domains, so that a
        synthesized copy of an existing example is rejected."""
        dedup = Deduplicator(self.run.cfg.near_duplicate_threshold)
        tails = [d for d, (role, _) in roles.items() if role == "tail"]
        known = pd.concat([self.gathered[["example_id", "input"]],
                           self.run.pool.loc[self.run.pool["domain"].isin(tails),
                                             ["example_id", "input"]]])
        for key, text in zip(known["example_id"], known["input"]):
            dedup.check(f"known:{key}", text)
        return dedup

    def _call(self, job: dict, reply: Any, teacher: str, dedup: Deduplicator) -> dict[str, Any]:
        row = job.get("row") or {}
        call = {"stage": self.stage, "domain": row.get("domain", job.get("domain")),
                "role": job["role"], "kind": job["kind"], "example_id": row.get("example_id", ""),
                "status": "rejected", "reason": None, "detail": "",
                "input": row.get("input", ""), "output": row.get("output", ""), "rationale": "",
                "ifd": float(row.get("ifd", np.nan)) if row.get("ifd") is not None else np.nan,
                "student_output": row.get("student_output", "") or "", "teacher": teacher,
                "prompt_version": RATIONALE_VERSION if job["kind"] == "annotate"
                else SYNTHESIS_VERSION, "prompt_tokens": 0, "completion_tokens": 0}
        if job["kind"] == "select":
            call.update(status="kept", rationale=row.get("rationale") or "",
                        prompt_version=row.get("prompt_version") or "", teacher="")
            return call
        if isinstance(reply, Exception):
            call["reason"] = "budget_exhausted" if isinstance(reply, BudgetExceeded) else (
                "teacher_error")
            call["detail"] = f"{type(reply).__name__}: {reply}"[:500]
            return call
        call.update(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
        if job["kind"] == "annotate":
            v = judge_rationale(reply, call["output"], self.run.task.labels)
            call.update(reason=v.reason, detail=v.detail, rationale=v.rationale,
                        status="rejected" if v.reason else "kept")
            return call
        v = judge_example(reply, self.run.filters)
        call.update(input=v.input, output=v.output, rationale=v.rationale, detail=v.detail,
                    example_id=hashlib.sha256(
                        f"{self.run.task.name}\x1f{call['domain']}\x1f{self.stage}\x1f{job['k']}"
                        f"\x1f{SYNTHESIS_VERSION}\x1f{v.input}".encode()).hexdigest()[:16])
        reason = v.reason or dedup.check(call["example_id"], v.input)
        call.update(reason=reason, status="rejected" if reason else "kept")
        return call


# ----------------------------------------------------------------------------- the run


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
        self.spent = 0
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
                "train_hash": config_hash(self.train.model_dump(exclude={
                    "num_workers", "use_gpu", "cpus_per_worker", "torch_threads",
                    "checkpoint_every", "max_failures"})),
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


def _metrics(evaluation: dict | None) -> dict[str, Any]:
    """{run: {'domains': {d: value}, 'macro', 'micro'}} of the metric's main key."""
    if not evaluation:
        return {}
    key = evaluation["keys"][0]
    return {run: {"domains": {d: m[key] for d, m in agg["domains"].items()},
                  "macro": agg["macro"][key], "micro": agg["micro"][key]}
            for run, agg in evaluation["runs"].items()}


def _stage_rows(stage: int, quotas: dict[str, int], roles: dict[str, str], calls: pd.DataFrame,
                metrics: dict[str, Any], left: dict[str, int]) -> list[dict[str, Any]]:
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


def _new_examples(calls: pd.DataFrame) -> pd.DataFrame:
    kept = calls[calls["status"] == "kept"]
    origin = np.where(kept["kind"].isin(POOL_KINDS), "pool", "synthesized")
    return kept.assign(origin=origin)[EXAMPLE_COLUMNS].reset_index(drop=True)


def distill(task: TaskConfig, examples: str | pa.Table, out: str, cfg: DistillConfig,
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
    run = Run(task, pool, out, cfg, train, evaluate, teacher_url, api_key, s3, teacher_model)
    st = run.st
    plan = run.check_plan()
    if len(rejects):
        st.write_parquet(st.join(run.out, "pool_rejects.parquet"),
                         pa.Table.from_pandas(rejects, preserve_index=False))

    gathered = (task_examples(task, cfg) if cfg.task_examples
                else pd.DataFrame(columns=EXAMPLE_COLUMNS))
    used: set[str] = set()
    adapter: str | None = None
    stage_rows, domain_rows, metrics_by_stage, resumed = [], [], {}, []
    training: dict[str, Any] = {}
    evaluation: dict | None = None
    for stage in range(1, cfg.stages + 1):
        sdir = run.stage_dir(stage)
        if st.read_manifest(sdir) is not None:
            st.verify(sdir)
            done = st.read_json(st.join(sdir, "stage.json"))
            calls = st.read_parquet(st.join(sdir, "calls.parquet")).to_pandas()
            gathered = st.read_parquet(st.join(sdir, "examples.parquet")).to_pandas()
            used |= set(calls.loc[calls["kind"].isin(POOL_KINDS), "example_id"])
            run.spent, adapter = done["summary"]["spent_total"], done["summary"]["adapter"]
            if st.exists(st.join(sdir, "eval.json")):
                evaluation = st.read_json(st.join(sdir, "eval.json"))
            if st.exists(st.join(sdir, "train", "train_summary.json")):
                training = st.read_json(st.join(sdir, "train", "train_summary.json"))
            stage_rows.append(done["summary"])
            domain_rows += done["domains"]
            metrics_by_stage[stage] = done["metrics"]
            resumed.append(stage)
            continue

        t0 = time.time()
        quotas = plan["quotas"][stage - 1]
        worker = Stage(run, stage, quotas, gathered, used, adapter)
        roles = worker.roles()
        left = {d: int(n) for d, n in worker.unused()["domain"].value_counts().items()}
        calls_uri = st.join(sdir, "calls.parquet")
        if st.exists(calls_uri):  # the teacher phase finished before an interruption
            calls = st.read_parquet(calls_uri).to_pandas()
            teacher = st.read_json(st.join(sdir, "teacher.json"))
        else:
            calls, teacher = worker.run_teacher()
            teacher["timing"] = worker.timing
            st.write_json(st.join(sdir, "teacher.json"), teacher)
            st.write_parquet(calls_uri, pa.Table.from_pandas(calls, preserve_index=False))
        gathered = pd.concat([gathered, _new_examples(calls)], ignore_index=True)
        st.write_parquet(st.join(sdir, "examples.parquet"),
                         pa.Table.from_pandas(gathered, preserve_index=False))
        used |= set(calls.loc[calls["kind"].isin(POOL_KINDS), "example_id"])
        spent = int(teacher["requests"])
        run.spent += spent

        adapter, training, evaluation, timing = run.train_and_evaluate(stage, gathered, adapter)
        metrics = _metrics(evaluation)
        student = metrics.get("trained") or metrics.get("base") or {}
        summary = {"stage": stage, "budget": run.budgets[stage - 1], "spent": spent,
                   "spent_total": run.spent, "remaining": cfg.budget - run.spent,
                   "kept": int((calls["status"] == "kept").sum()),
                   "dropped": int((calls["status"] != "kept").sum()),
                   "examples": len(gathered), "macro": student.get("macro"),
                   "micro": student.get("micro"), "train_steps": training.get("steps"),
                   "final_loss": training.get("final_loss"),
                   **teacher.get("timing", {}), **timing,
                   "wall_s": round(time.time() - t0, 2), "adapter": adapter}
        rows = _stage_rows(stage, quotas, {d: r for d, (r, _) in roles.items()}, calls, metrics,
                           left)
        st.write_json(st.join(sdir, "stage.json"),
                      {"summary": summary, "domains": rows, "metrics": metrics,
                       "reasons": calls["reason"].value_counts().to_dict(), "teacher": teacher})
        st.write_manifest(sdir, {"stage": stage, "plan_hash": plan["plan_hash"],
                                 "spent": spent, "spent_total": run.spent},
                          ["calls.parquet", "examples.parquet", "stage.json"])
        stage_rows.append(summary)
        domain_rows += rows
        metrics_by_stage[stage] = metrics

    result = _summary(run, plan, rejects, stage_rows, domain_rows, metrics_by_stage, resumed,
                      adapter, time.time() - t_start)
    st.write_json(st.join(run.out, "distill.json"), result)
    result["report"] = _write_report(run, result, gathered, training, evaluation)[1]
    return result


def _curves(metrics_by_stage: dict[int, dict]) -> list[dict[str, Any]]:
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


def _summary(run: Run, plan: dict, rejects: pd.DataFrame, stage_rows: list[dict],
             domain_rows: list[dict], metrics_by_stage: dict[int, dict], resumed: list[int],
             adapter: str | None, wall_s: float) -> dict[str, Any]:
    return {
        "task": run.task.name, "mode": run.cfg.mode, "num_stages": run.cfg.stages,
        "budget": run.cfg.budget, "spent": run.spent, "remaining": run.cfg.budget - run.spent,
        "task_examples": len(run.task.examples) if run.cfg.task_examples else 0,
        "pool": {"examples": len(run.pool), "rejected": len(rejects),
                 **{f"rejected_{k}": int(v) for k, v in rejects["reason"].value_counts().items()}},
        "long_tail": long_tail_stats(run.pool["domain"]),
        "stages": stage_rows,
        "domains": domain_rows,
        "curves": _curves(metrics_by_stage),
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


def _write_report(run: Run, result: dict, gathered: pd.DataFrame, training: dict,
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
