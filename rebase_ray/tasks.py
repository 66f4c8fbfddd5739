"""A task's held-out eval set: read the file named by `task.eval` into records with `input`,
`output` and `domain`, used by evaluation, decontamination and the BalDistill domains.

`eval.input` / `eval.output` / `eval.domain` are column names or templates such as
"{question}\\nA. {choice0}\\nB. {choice1}"; a row that lacks a field the template needs is
returned in `rejects` with its reason rather than dropped.
"""

from __future__ import annotations

import io
import json
import string
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from rebase_ray.config import EvalSetConfig, S3Config, TaskConfig
from rebase_ray.formats import split_answer
from rebase_ray.storage import Storage, StorageError


@dataclass
class EvalSet:
    records: list[dict[str, str]]  # input, output, domain
    rejects: list[dict[str, Any]] = field(default_factory=list)  # row, reason


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def render(template: str, row: dict[str, Any]) -> str:
    """A column name, or a `{column}` template filled from the row."""
    names = _fields(template)
    if not names:
        if template not in row:
            raise KeyError(template)
        return _text(row[template])
    return template.format(**{n: _text(row[n]) for n in names})


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def read_records(uri: str, fmt: str = "auto", s3: S3Config | None = None) -> list[dict]:
    """Rows of one small csv / jsonl / json / parquet file (or every file of a glob)."""
    st = Storage.for_uri(uri, s3)
    rows: list[dict] = []
    for file in st.glob(uri):
        kind = fmt if fmt != "auto" else file.rsplit(".", 1)[-1].lower()
        data = st.read_bytes(file)
        if kind == "csv":
            frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        elif kind == "jsonl":
            frame = pd.read_json(io.BytesIO(data), lines=True, dtype=False)
        elif kind == "json":
            obj = json.loads(data)
            frame = pd.DataFrame(obj["examples"] if isinstance(obj, dict) and "examples" in obj
                                 else obj)
        elif kind == "parquet":
            frame = pd.read_parquet(io.BytesIO(data))
        else:
            raise StorageError(f"{file}: unknown eval file format {kind!r} "
                               "(expected csv, jsonl, json or parquet)")
        rows.extend(frame.to_dict(orient="records"))
    return rows


def load_eval_set(task: TaskConfig, s3: S3Config | None = None) -> EvalSet:
    if task.eval is None:
        return EvalSet([])
    cfg: EvalSetConfig = task.eval
    rows = read_records(cfg.path, cfg.format, s3)
    if cfg.max_rows and len(rows) > cfg.max_rows:
        step = len(rows) / cfg.max_rows
        rows = [rows[int(i * step)] for i in range(cfg.max_rows)]
    out = EvalSet([])
    for i, row in enumerate(rows):
        try:
            rec = {"input": render(cfg.input, row), "output": render(cfg.output, row),
                   "domain": render(cfg.domain, row) if cfg.domain else task.name}
        except KeyError as exc:
            out.rejects.append({"row": i, "reason": f"missing field {exc.args[0]!r}"})
            continue
        if not rec["input"].strip() or not rec["output"].strip():
            out.rejects.append({"row": i, "reason": "empty input or output"})
            continue
        out.records.append(rec)
    return out


def fewshot_rows(task: TaskConfig) -> list[dict[str, str]]:
    """The task's few-shot examples as training examples (ids `fewshot-<i>`): what the fewshot
    baseline trains on, and what the distilled student trains on besides. With `cot: fewshot`
    an output carries its rationale ("... so the answer is X"): it is split into the rationale
    and the final answer, as a generated example's is."""
    rows = []
    for i, e in enumerate(task.examples):
        rationale, output = split_answer(e.output) if task.cot == "fewshot" else ("", e.output)
        rows.append({"example_id": f"fewshot-{i}", "input": e.input, "output": output,
                     "rationale": rationale})
    return rows
