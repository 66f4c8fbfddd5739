"""The teacher phase of one BalDistill stage: which pool examples and syntheses fill each
domain's quota, asked for in rounds until the quotas are filled.

A domain is head when its unused pool can fill its quota q, else tail.
- head: the current student answers up to `ifd_candidates`·q unused candidates, ranked by IFD
  (ifd.py); the top q go to the teacher for a rationale given the gold answer;
- tail: the rest of its pool goes to the teacher the same way, and the teacher synthesizes the
  missing examples from a few of the domain's examples (when domains are labels, the
  synthesized output is the domain's label, by prompt and schema), filtered like transform's
  examples, then label-checked.
An example that already has a rationale (transform's annotation) is selected at no teacher
cost. A rationale whose own final answer disagrees with the gold answer is dropped with its
example. Each round asks again for what the last one left missing: a head domain the next
candidates of its IFD ranking, a tail domain new syntheses; the stage stops when every quota is
filled, after `rounds` rounds, or when its teacher calls (`max_calls_per_example` per example
of its budget, rejected calls included) are spent.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from rebase_ray.distill.ifd import score_ifd
from rebase_ray.distill.prompts import SYNTHESIS_VERSION, synthesis_messages
from rebase_ray.formats import student_target
from rebase_ray.teacher.client import BudgetExceeded, TeacherClient, request_seed
from rebase_ray.text import normalize
from rebase_ray.transform.filters import Deduplicator
from rebase_ray.transform.judge import judge_example, judge_rationale
from rebase_ray.transform.label_check import check_labels
from rebase_ray.transform.prompts import RATIONALE_VERSION, rationale_messages
from rebase_ray.transform.schema import reply_formats

if TYPE_CHECKING:
    from rebase_ray.distill.stage import Run

CALL_COLUMNS = ["stage", "round", "domain", "role", "kind", "example_id", "status", "reason",
                "detail", "input", "output", "rationale", "ifd", "student_output", "teacher",
                "prompt_version", "prompt_tokens", "completion_tokens"]
POOL_KINDS = ("annotate", "select")  # calls that use up a pool example
IFD_COLUMNS = ["example_id", "domain", "input", "student_output", "ppl_conditional",
               "ppl_alone", "ifd", "selected"]


def seeded_rng(seed: int, *parts: Any) -> np.random.Generator:
    key = "\x1f".join(str(p) for p in (seed, *parts))
    return np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:12], 16))


class TeacherPhase:
    """Roles, IFD ranking, and the rounds of teacher calls of one stage."""

    def __init__(self, run: Run, stage: int, quotas: dict[str, int], gathered: pd.DataFrame,
                 used: set[str], adapter: str | None):
        self.run, self.stage, self.quotas = run, stage, quotas
        self.gathered, self.used, self.adapter = gathered, used, adapter
        self.timing: dict[str, float] = {}
        self.ifd_resources: dict = {}  # the IFD pool's, resolved when it starts

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

    def call_limit(self) -> int:
        """The teacher calls this stage may make."""
        return math.ceil(self.run.budgets[self.stage - 1] * self.run.cfg.max_calls_per_example)

    def rank_head(self, roles: dict[str, tuple[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
        """{head domain: its scored candidates, best IFD first}."""
        cfg = self.run.cfg
        samples = []
        for domain, (role, left) in roles.items():
            if role != "head":
                continue
            n = min(len(left), cfg.ifd_candidates * self.quotas[domain])
            idx = seeded_rng(cfg.seed, "ifd", self.stage, domain).choice(len(left), n,
                                                                         replace=False)
            samples.append(left.iloc[np.sort(idx)])
        if not samples:
            return {}
        t0 = time.time()
        scored, self.ifd_resources = score_ifd(
            pd.concat(samples, ignore_index=True), self.run.train.model, self.adapter,
            self.run.task.instruction, batch_size=cfg.ifd_batch_size,
            max_new_tokens=cfg.ifd_max_new_tokens, max_seq_len=self.run.train.max_seq_len,
            resources=cfg.ifd_resources, s3=self.run.s3, dtype=cfg.ifd_dtype)
        self.timing["ifd_s"] = round(time.time() - t0, 2)
        scored["_rank_key"] = scored["ifd"].fillna(-np.inf)
        return {d: g.sort_values(["_rank_key", "example_id"], ascending=[False, True],
                                 kind="stable").drop(columns="_rank_key")
                for d, g in scored.groupby("domain", sort=True)}

    def shots(self, domain: str, k: int) -> list[dict[str, str]]:
        """A few examples of the domain for one synthesis prompt: gathered ones (they carry
        the teacher's rationale) first, then pool ones."""
        cfg = self.run.cfg
        rng = seeded_rng(cfg.seed, "shots", self.stage, domain, k)
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
        ranked = self.rank_head(roles)
        limit = self.call_limit()
        client = TeacherClient(run.teacher_url, api_key=run.api_key, model=run.teacher_model,
                               concurrency=cfg.concurrency, max_requests=limit)
        dedup = self._deduplicator(roles)
        t0 = time.time()
        calls: list[dict[str, Any]] = []
        asked: dict[str, int] = {}  # per domain: head candidates asked, or syntheses asked
        rounds = 0
        for round_ in range(1, cfg.rounds + 1):
            room = limit - client.stats.requests
            jobs = self._jobs(roles, ranked, calls, asked, first=round_ == 1)[:room]
            if not jobs:
                break
            rounds = round_
            replies = self._ask(client, jobs)
            new = [self._call(j, replies.get(i), client.model or "", dedup, round_)
                   for i, j in enumerate(jobs)]
            self._check_labels(client, new)
            calls += new
        self.timing["teacher_s"] = round(time.time() - t0, 2)
        if ranked:
            self._write_ifd(ranked, calls)
        stats = {**client.summary(), "limit": limit, "rounds": rounds}
        return pd.DataFrame(calls, columns=CALL_COLUMNS), stats

    def _jobs(self, roles: dict[str, tuple[str, pd.DataFrame]], ranked: dict[str, pd.DataFrame],
              calls: list[dict[str, Any]], asked: dict[str, int], first: bool
              ) -> list[dict[str, Any]]:
        """The teacher jobs that would fill what the quotas still miss (on the first round,
        a tail domain's whole unused pool too)."""
        run = self.run
        kept = pd.Series([c["domain"] for c in calls if c["status"] == "kept"],
                         dtype=object).value_counts()

        # a pool example needs a teacher rationale only when the task uses chain of thought
        # and it has none yet (transform's annotation may have written it); otherwise it is
        # selected as it is, at no teacher cost
        def use(r: dict) -> str:
            has = isinstance(r.get("rationale"), str) and r["rationale"].strip()
            return "annotate" if run.task.cot != "none" and not has else "select"

        jobs: list[dict[str, Any]] = []
        for domain, (role, left) in sorted(roles.items()):
            missing = self.quotas[domain] - int(kept.get(domain, 0))
            if missing <= 0:
                continue
            if role == "head":
                start = asked.get(domain, 0)
                rows = ranked[domain].iloc[start: start + missing]
                asked[domain] = start + len(rows)
                jobs += [{"kind": use(r), "role": "head", "row": r}
                         for r in rows.to_dict(orient="records")]
                continue
            if first:
                jobs += [{"kind": use(r), "role": "tail", "row": r}
                         for r in left.to_dict(orient="records")]
                missing -= len(left)
            start = asked.get(domain, 0)
            asked[domain] = start + max(0, missing)
            jobs += [{"kind": "synthesize", "role": "tail", "domain": domain,
                      "shots": self.shots(domain, k), "k": k}
                     for k in range(start, start + max(0, missing))]
        return jobs

    def _ask(self, client: TeacherClient, jobs: list[dict[str, Any]]) -> dict[int, Any]:
        """{job index: reply or exception} for the jobs that need the teacher."""
        run, cfg = self.run, self.run.cfg
        sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p,
                    "max_tokens": cfg.max_tokens}
        formats = reply_formats(run.task, cfg.reply, synthesis=True)
        # domains that are labels: a domain's synthesized example has that label, by prompt
        # and by schema (its `output` an enum of the one label)
        by_label = cfg.domain_from == "label" and bool(run.task.labels)
        replies: dict[int, Any] = {}
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
        return replies

    def _seed(self, job: dict[str, Any]) -> int:
        """The job's request seed: a rerun of the stage gets the same replies."""
        what = job["row"]["example_id"] if "row" in job else (job["domain"], job["k"])
        return request_seed(self.run.cfg.seed, self.stage, job["kind"], what)

    def _check_labels(self, client: TeacherClient, calls: list[dict[str, Any]]) -> None:
        """The label check on kept synthesized examples (label tasks): the teacher labels each
        generated input again; its extra requests are spent from the same calls."""
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

    def _write_ifd(self, ranked: dict[str, pd.DataFrame], calls: list[dict[str, Any]]) -> None:
        """ifd.parquet: every scored candidate, `selected` when it went to the teacher."""
        asked = {c["example_id"] for c in calls if c["role"] == "head"}
        scored = pd.concat(ranked.values(), ignore_index=True)
        scored = scored.assign(selected=scored["example_id"].isin(asked))
        st = self.run.st
        st.write_parquet(st.join(self.run.stage_dir(self.stage), "ifd.parquet"),
                         pa.Table.from_pandas(scored[IFD_COLUMNS], preserve_index=False))

    def _call(self, job: dict, reply: Any, teacher: str, dedup: Deduplicator,
              round_: int) -> dict[str, Any]:
        row = job.get("row") or {}
        call = {"stage": self.stage, "round": round_,
                "domain": row.get("domain", job.get("domain")),
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
