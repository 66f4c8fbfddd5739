"""ReBase transformation as a Ray Data pipeline:

    hits.parquet → prompts → teacher endpoint (TeacherClient, bounded concurrency; replies
    constrained to a JSON schema built from the task) → judge (parse, filters) →
    [annotate: second teacher call for a rationale] → [label check: the teacher labels the
    generated input again] → parts → dedup → examples

With `transform.input: row` the retrieved row's own text is the input, and the teacher only
answers it (the label check's classification prompt, greedy, constrained to the labels).

Every hit ends as exactly one example or one reject (with its reason). Results are written in
parts as they stream in, so an interrupted run resumes where it stopped: a hit whose result is
already written costs no teacher call on rerun (failed and budget-refused hits are retried).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
import zlib
from collections import Counter
from typing import Any

import pandas as pd
import pyarrow as pa

from rebase_ray import progress
from rebase_ray.config import S3Config, SourceConfig, TaskConfig, TransformConfig
from rebase_ray.storage import Storage, open_storage
from rebase_ray.tasks import load_eval_set
from rebase_ray.teacher.client import BudgetExceeded, TeacherClient, request_seed
from rebase_ray.text import NgramIndex
from rebase_ray.transform.datacard import data_card
from rebase_ray.transform.filters import REASONS, Deduplicator, FilterContext
from rebase_ray.transform.judge import judge_answer, judge_example, judge_rationale
from rebase_ray.transform.label_check import check_labels
from rebase_ray.transform.prompts import (
    CLASSIFY_VERSION,
    RATIONALE_VERSION,
    TRANSFORM_VERSION,
    classify_messages,
    cut,
    rationale_messages,
    transformation_messages,
)
from rebase_ray.transform.schema import label_choice, reply_formats

RETRYABLE = {"teacher_error", "budget_exhausted"}
RESULT_COLUMNS = ["example_id", "row_key", "dataset", "domain", "rank", "status", "reason",
                  "detail", "input", "output", "rationale", "teacher", "prompt_version", "flags",
                  "reply", "requests", "prompt_tokens", "completion_tokens", "score", "input_score",
                  "output_score", "dataset_score", "row"]


def example_id(task: str, row_key: str) -> str:
    return hashlib.sha256(f"{task}\x1f{row_key}\x1f{TRANSFORM_VERSION}".encode()).hexdigest()[:16]


def best_columns(hit: dict[str, Any], row: dict[str, str]) -> list[str]:
    """The row's best-matching input and output columns (retrieval's), once each, in order."""
    return list(dict.fromkeys(c for c in (hit.get("best_input_column"),
                                          hit.get("best_output_column")) if c in row))


def row_for_prompt(hit: dict[str, Any], cfg: TransformConfig) -> tuple[dict[str, str], bool]:
    """The retrieved row as {column: value}; a row longer than `max_row_chars` (after cutting
    each value) falls back to its best-matching input and output cells. Returns (row, cut)."""
    row = {k: str(v) for k, v in json.loads(hit["row"]).items() if str(v).strip()}
    if sum(len(cut(v, cfg.max_value_chars)) for v in row.values()) <= cfg.max_row_chars:
        return row, False
    return {c: row[c] for c in best_columns(hit, row)} or dict(list(row.items())[:2]), True


def row_input(hit: dict[str, Any], row: dict[str, str], max_chars: int) -> str:
    """The retrieved row's own text as a task input (transform.input: row): its values, the
    best-matching input and output cells first, cut to `max_chars`."""
    first = best_columns(hit, row)
    ordered = [*first, *(c for c in row if c not in first)]
    return cut(" ".join(row[c] for c in ordered), max_chars)


class TeacherWorker:
    """Ray Data actor: prompts a batch of hits through the teacher endpoint, parses and
    filters the replies, and (cot: annotate) asks for a rationale for each kept example."""

    def __init__(self, task: dict, cfg: dict, base_url: str, api_key: str | None,
                 max_requests: int | None, eval_index: NgramIndex, model: str | None = None):
        self.task = TaskConfig.model_validate(task)
        self.cfg = TransformConfig.model_validate(cfg)
        self.client = TeacherClient(base_url, api_key=api_key, model=model,
                                    concurrency=self.cfg.concurrency, max_requests=max_requests)
        self.ctx = FilterContext(self.task, self.cfg.max_output_chars,
                                 self.cfg.reply.min_input_chars, eval_index)
        # each request seeded by its row (request_seed): a rerun gets the same replies
        self.sampling = {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p,
                         "max_tokens": self.cfg.max_tokens}
        self.formats = reply_formats(self.task, self.cfg.reply)
        # transform.input: row: the teacher answers the row's text, greedy; a label task's
        # answer is constrained to the label set
        self.answer_sampling = {"temperature": 0.0, "max_tokens": self.cfg.max_tokens}
        if self.task.labels and self.cfg.reply.structured:
            self.answer_sampling["structured_outputs"] = label_choice(self.task)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        hits = batch.to_dict(orient="records")
        rows = [row_for_prompt(h, self.cfg) for h in hits]
        if self.cfg.input == "row":
            inputs = [row_input(h, r, self.cfg.reply.max_input_chars)
                      for h, (r, _) in zip(hits, rows)]
            replies = self.client.chat_many([classify_messages(self.task, x) for x in inputs],
                                            **self.answer_sampling)
        else:
            inputs = [None] * len(hits)
            prompts = [transformation_messages(self.task, r, self.cfg.max_value_chars,
                                               variant=zlib.crc32(h["row_key"].encode()))
                       for h, (r, _) in zip(hits, rows)]
            replies = self.client.chat_many(prompts, **self.sampling, **self.formats["example"],
                                            per_request=self._seeds("example", hits))
        results = [self._result(h, reply, was_cut, given) for h, reply, (_, was_cut), given
                   in zip(hits, replies, rows, inputs)]
        if self.task.labels:  # before annotation: a rationale argues the confirmed label
            self._check_labels([r for r in results if r["status"] == "kept"])
        if self.task.cot == "annotate" and self.cfg.annotate:
            self._annotate([r for r in results if r["status"] == "kept"])
        return pd.DataFrame(results, columns=RESULT_COLUMNS)

    def _seeds(self, kind: str, rows: list[dict[str, Any]]) -> list[dict[str, int]]:
        """Each row's request seed, from transform.seed, the request's kind and its row key."""
        return [{"seed": request_seed(self.cfg.seed, kind, r["row_key"])} for r in rows]

    def _result(self, hit: dict, reply: Any, was_cut: bool,
                given_input: str | None) -> dict[str, Any]:
        """One hit's result; `given_input` (transform.input: row): the input the reply
        answers, else the reply is a whole generated example."""
        res = {c: hit.get(c) for c in ("row_key", "dataset", "domain", "rank", "score",
                                       "input_score", "output_score", "dataset_score", "row")}
        res.update(example_id=example_id(self.task.name, hit["row_key"]), status="rejected",
                   reason=None, detail="", input="", output="", rationale="",
                   teacher=self.client.model or "",
                   prompt_version=TRANSFORM_VERSION if given_input is None else CLASSIFY_VERSION,
                   flags=json.dumps(["row_cut_to_best_cells"] if was_cut else []), reply="",
                   requests=0 if isinstance(reply, BudgetExceeded) else 1, prompt_tokens=0,
                   completion_tokens=0)
        if isinstance(reply, Exception):
            res["reason"] = "budget_exhausted" if isinstance(reply, BudgetExceeded) else (
                "teacher_error")
            res["detail"] = f"{type(reply).__name__}: {reply}"[:500]
            return res
        res.update(reply=reply.text[:4000], prompt_tokens=reply.prompt_tokens,
                   completion_tokens=reply.completion_tokens, teacher=self.client.model or "")
        v = (judge_example(reply, self.ctx) if given_input is None
             else judge_answer(reply, given_input, self.ctx))
        res.update(input=v.input, output=v.output, rationale=v.rationale, detail=v.detail)
        if v.reason:
            res["reason"] = v.reason
        else:
            res["status"] = "kept"
        return res

    def _annotate(self, kept: list[dict[str, Any]]) -> None:
        """BalDistill's rationale: the teacher explains the gold answer; a rationale whose own
        final answer disagrees is dropped with its example."""
        prompts = [rationale_messages(self.task, r["input"], r["output"]) for r in kept]
        replies = self.client.chat_many(prompts, **self.sampling, **self.formats["rationale"],
                                        per_request=self._seeds("rationale", kept))
        for r, reply in zip(kept, replies):
            r["requests"] += 0 if isinstance(reply, BudgetExceeded) else 1
            if isinstance(reply, Exception):
                r.update(status="rejected", detail=f"rationale: {type(reply).__name__}: {reply}",
                         reason="budget_exhausted" if isinstance(reply, BudgetExceeded)
                         else "teacher_error")
                continue
            r["prompt_tokens"] += reply.prompt_tokens
            r["completion_tokens"] += reply.completion_tokens
            v = judge_rationale(reply, r["output"], self.task.labels)
            if v.reason:
                r.update(status="rejected", reason=v.reason, detail=f"rationale: {v.detail}")
                continue
            r["rationale"] = v.rationale
            r["prompt_version"] = f"{TRANSFORM_VERSION}+{RATIONALE_VERSION}"

    def _check_labels(self, kept: list[dict[str, Any]]) -> None:
        """The label check (transform.label_check): a kept example whose label the teacher
        does not confirm is rejected; a vote may relabel it. With transform.input: row the
        label already is the teacher's greedy classification, which roundtrip would repeat."""
        if self.cfg.input == "row" and self.cfg.label_check.mode == "roundtrip":
            return
        verdicts = check_labels(self.client, self.task, self.ctx,
                                [(r["input"], r["output"]) for r in kept],
                                self.cfg.label_check, self.cfg.seed)
        for r, v in zip(kept, verdicts):
            r["requests"] += v.requests
            r["prompt_tokens"] += v.prompt_tokens
            r["completion_tokens"] += v.completion_tokens
            if v.label is None:
                r.update(status="rejected", reason=v.reason, detail=v.detail)
            elif v.label != r["output"]:
                r["flags"] = json.dumps([*json.loads(r["flags"]), "relabelled"])
                r.update(output=v.label, rationale="")  # a generated one argued the old label


def _read_parts(st: Storage, out: str) -> pd.DataFrame:
    parts = st.ls(st.join(out, "parts"), "*.parquet")
    if not parts:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    frames = [st.read_parquet(p).to_pandas() for p in parts]
    # later parts win: a retried hit replaces its earlier teacher_error / budget reject
    return pd.concat(frames, ignore_index=True).drop_duplicates("row_key", keep="last")


def run(task: TaskConfig, hits: str, teacher_url: str, out: str, cfg: TransformConfig,
        s3: S3Config | None = None, api_key: str | None = None,
        sources: list[SourceConfig] | None = None,
        teacher_model: str | None = None) -> dict[str, Any]:
    """Turn retrieved rows (`hits`: a hits.parquet URI or the folder holding it) into task
    examples through the teacher at `teacher_url` (an OpenAI-compatible base URL), asking for
    `teacher_model` (None: the first model the endpoint lists)."""
    import ray

    t0 = time.time()
    st, out = open_storage(out, s3)
    hits_uri = hits if hits.endswith(".parquet") else Storage.join(hits, "hits.parquet")
    hits_table = Storage.for_uri(hits_uri, s3).read_parquet(hits_uri).to_pandas()
    done = _read_parts(st, out)
    finished = set(done.loc[~done["reason"].isin(RETRYABLE), "row_key"])
    todo = hits_table[~hits_table["row_key"].isin(finished)]

    stats_new = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    if len(todo):
        eval_set = load_eval_set(task, s3)
        eval_index = NgramIndex([r["input"] for r in eval_set.records], n=13)
        budget = None  # the hard budget counts the calls earlier runs already made
        if cfg.max_requests is not None:
            budget = max(0, cfg.max_requests - int(done["requests"].sum()))
        # blocks are cut on the driver: a repartition task could find no free CPU while the
        # teacher replica and the worker actor hold them
        size = cfg.concurrency * 4
        ds = ray.data.from_pandas([todo.iloc[i: i + size] for i in range(0, len(todo), size)])
        results = ds.map_batches(
            TeacherWorker, batch_size=size, batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25,
            fn_constructor_kwargs={"task": task.model_dump(mode="json"),
                                   "cfg": cfg.model_dump(mode="json"), "base_url": teacher_url,
                                   "api_key": api_key, "max_requests": budget,
                                   "model": teacher_model,
                                   "eval_index": eval_index})
        # progress counts results on the driver as they come back (the teacher calls run in
        # the Ray Data actor, another process)
        with progress.task("transform: rows", total=len(todo)) as advance:
            for batch in results.iter_batches(batch_size=size, batch_format="pandas"):
                st.write_parquet(st.join(out, "parts", f"part-{time.time_ns()}-"
                                         f"{uuid.uuid4().hex[:6]}.parquet"),
                                 pa.Table.from_pandas(batch, preserve_index=False))
                stats_new["requests"] += int(batch["requests"].sum())
                stats_new["prompt_tokens"] += int(batch["prompt_tokens"].sum())
                stats_new["completion_tokens"] += int(batch["completion_tokens"].sum())
                advance(len(batch))
        done = _read_parts(st, out)

    examples, rejects = _finalize(done, task, cfg)
    wall = time.time() - t0
    summary = _summary(task, hits_table, examples, rejects, stats_new, wall, len(todo))
    summary["teacher"]["requests_total"] = int(done["requests"].sum())  # earlier runs too
    st.write_parquet(st.join(out, "examples.parquet"), pa.Table.from_pandas(
        examples, preserve_index=False))
    st.write_parquet(st.join(out, "rejects.parquet"), pa.Table.from_pandas(
        rejects, preserve_index=False))
    st.write_json(st.join(out, "stats.json"), summary)
    st.write_text(st.join(out, "README.md"), data_card(task, summary, examples, sources))
    st.write_manifest(out, {"stage": "transform", "task": task.name, "hits": hits_uri,
                            "prompt_version": TRANSFORM_VERSION, "counts": summary["counts"]},
                      ["examples.parquet", "rejects.parquet", "stats.json", "README.md"])
    return summary


def _finalize(done: pd.DataFrame, task: TaskConfig, cfg: TransformConfig
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop exact and near duplicates among kept examples (best-ranked first), and near copies
    of the task's few-shot inputs, and split the results into examples and rejects."""
    done = done.sort_values("rank", kind="stable").reset_index(drop=True)
    dedup = Deduplicator(cfg.near_duplicate_threshold)
    for j, example in enumerate(task.examples):
        dedup.check(f"fewshot:{j}", example.input)
    for i in done.index[done["status"] == "kept"]:
        reason = dedup.check(done.at[i, "row_key"], done.at[i, "input"])
        if reason:
            done.loc[i, ["status", "reason", "detail"]] = ["rejected", reason, ""]
    kept = done[done["status"] == "kept"]
    examples = kept[["example_id", "row_key", "dataset", "domain", "input", "output",
                     "rationale", "teacher", "prompt_version", "flags", "score", "input_score",
                     "output_score", "dataset_score", "row"]].reset_index(drop=True)
    rejects = done[done["status"] != "kept"][["row_key", "dataset", "reason", "detail", "input",
                                              "output", "reply"]].reset_index(drop=True)
    return examples, rejects


def _summary(task: TaskConfig, hits: pd.DataFrame, examples: pd.DataFrame,
             rejects: pd.DataFrame, new: dict[str, int], wall: float, processed: int) -> dict:
    reasons = Counter(rejects["reason"])
    per_source = []
    for name in sorted(set(hits["dataset"])):
        per_source.append({"dataset": name, "retrieved": int((hits["dataset"] == name).sum()),
                           "kept": int((examples["dataset"] == name).sum()),
                           "rejected": int((rejects["dataset"] == name).sum())})
    retrieved = len(hits)
    return {
        "task": task.name,
        "counts": {"retrieved": retrieved, "kept": len(examples), "rejected": len(rejects),
                   "yield": round(len(examples) / retrieved, 4) if retrieved else 0.0},
        "rejects_by_reason": {r: reasons.get(r, 0) for r in REASONS if reasons.get(r, 0)},
        "per_source": per_source,
        "per_label": dict(Counter(examples["output"]).most_common(20)) if task.labels else {},
        "teacher": {**new, "tokens_per_example": round(
            (new["prompt_tokens"] + new["completion_tokens"]) / max(1, processed), 1)},
        "processed_this_run": processed,
        "wall_s": round(wall, 2),
        "seconds_per_example": round(wall / processed, 3) if processed else 0.0,
        "prompt_version": TRANSFORM_VERSION,
    }
