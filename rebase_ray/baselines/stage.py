"""The baselines stage: students trained exactly like the distilled one (the same base model,
`train` config and, later, evaluation pass) on data that rebase-ray's method does not make, so
the report can say whether retrieval + distillation beat the simple ways to the same goal.

- `fewshot`: the task's few-shot examples alone (what a user has without any tool);
- `synthetic`: examples the teacher writes from the instruction and few-shot examples alone,
  with no retrieved row (Prompt2Model-style): the transform stage itself (same prompts minus
  the record, same reply schema, filters, label check and rationales) over as many prompts as
  rows were retrieved, capped at the teacher requests that rebase-ray's transform and distill
  stages spent together. Each prompt shows the few-shot examples in its own order. With
  `transform.input: row` the teacher still writes the inputs here: there is no row to keep.

Writes, per baseline, `OUT/<name>/examples.parquet` (what it trained on; `synthetic/` also
holds the transform stage's rejects, stats and data card) and `OUT/<name>/train/`, then
`OUT/baselines.json` and the manifest. A baseline whose training finished is not redone. A
baseline left with no example is not trained (adapter None): it is the base model, and the
evaluation scores it so, so that the comparison keeps its column.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa

from rebase_ray.config import S3Config, TaskConfig, TrainConfig, TransformConfig
from rebase_ray.storage import open_storage
from rebase_ray.tasks import fewshot_rows

SUMMARY = "baselines.json"


def synthetic_hits(task: TaskConfig, n: int) -> pa.Table:
    """`n` empty "retrieved rows": the transform stage prompts from the instruction alone."""
    return pa.Table.from_pylist([{
        "task": task.name, "row_key": f"synthetic:{i}", "dataset": "", "config": "",
        "split": "", "row_idx": i, "domain": None, "score": 0.0, "input_score": 0.0,
        "output_score": 0.0, "dataset_score": 0.0, "rank": i, "row": json.dumps({}),
        "best_input_column": None, "best_output_column": None} for i in range(n)])


def run(task: TaskConfig, out: str, baselines: list[str], train: TrainConfig,
        transform: TransformConfig, teacher_url: str | None, prompts: int, requests: int,
        api_key: str | None = None, s3: S3Config | None = None,
        teacher_model: str | None = None) -> dict[str, Any]:
    """Train each baseline in `baselines`; `prompts` and `requests` size the synthetic one
    (the rows rebase-ray retrieved, the teacher requests it spent). Returns the summary."""
    from rebase_ray.train import train_student
    from rebase_ray.transform import transform as transform_stage

    t0 = time.time()
    st, out = open_storage(out, s3)
    rows = []
    for name in baselines:
        folder = st.join(out, name)
        row: dict[str, Any] = {"baseline": name}
        if name == "fewshot":
            examples = pa.Table.from_pylist(fewshot_rows(task))
            st.write_parquet(st.join(folder, "examples.parquet"), examples)
        else:
            if teacher_url is None:
                raise ValueError("the synthetic baseline needs a teacher")
            hits_uri = st.join(folder, "hits.parquet")
            if not st.exists(hits_uri):
                st.write_parquet(hits_uri, synthetic_hits(task, prompts))
            # no row to keep: the teacher writes every input, whatever transform.input says
            cfg = transform.model_copy(update={"max_requests": max(1, requests),
                                               "input": "teacher"})
            made = transform_stage(task, hits_uri, teacher_url, folder, cfg, s3=s3,
                                   api_key=api_key, teacher_model=teacher_model)
            row.update(prompts=prompts, requests=made["teacher"]["requests_total"],
                       request_budget=requests,
                       rejects_by_reason=made["rejects_by_reason"],
                       per_label=made["per_label"])
            examples = st.read_parquet(st.join(folder, "examples.parquet"))
        row["examples"] = examples.num_rows
        if examples.num_rows == 0:
            # not trained: evaluation scores it as the base model, which it is
            row.update(adapter=None, skipped="no example to train on: scored as the base model")
            rows.append(row)
            continue
        summary_uri = st.join(folder, "train", "train_summary.json")
        trained = (st.read_json(summary_uri) if st.exists(summary_uri) else
                   train_student(examples, task, train, st.join(folder, "train"), s3=s3))
        row.update(adapter=trained["adapter"], train_steps=trained["steps"],
                   final_loss=trained.get("final_loss"))
        rows.append(row)
    summary = {"task": task.name, "baselines": rows, "wall_s": round(time.time() - t0, 2)}
    st.write_json(st.join(out, SUMMARY), summary)
    st.write_manifest(out, {"stage": "baselines", "task": task.name}, [SUMMARY])
    return summary
