"""Decontamination: keep the task's own benchmark out of the retrieved rows.

Two checks, each dropped row reported with its reason:
- by source: sources named in the task's `exclude_datasets`, or whose name contains the task
  name, are never retrieved;
- by content: a row sharing a word n-gram (13 by default) with the task's eval set, or equal to
  a short eval input, is dropped. Eval outputs shorter than n words (labels such as "sport")
  are not matched, since they are not contamination.
"""

from __future__ import annotations

import json

from rebase_ray.config import S3Config, TaskConfig
from rebase_ray.tasks import load_eval_set
from rebase_ray.text import NgramIndex, normalize

LISTED = "listed in exclude_datasets"
NAMED = "source name contains the task name"


def excluded_sources(names: list[str], task: TaskConfig) -> dict[str, str]:
    """{source name: reason} for the sources this task must not retrieve from."""
    out = {}
    for name in names:
        if name in task.exclude_datasets:
            out[name] = LISTED
        elif task.name.lower() in name.lower():
            out[name] = NAMED
    return out


def eval_ngrams(task: TaskConfig, n: int, s3: S3Config | None = None) -> NgramIndex:
    """The n-grams of the task's eval inputs (and of its outputs of at least n words)."""
    records = load_eval_set(task, s3).records
    texts = [r["input"] for r in records]
    texts += [r["output"] for r in records if len(normalize(r["output"]).split()) >= n]
    return NgramIndex(texts, n)


def contamination_reason(row: dict, index: NgramIndex) -> str | None:
    """Why a rebuilt row ({column: value}) overlaps the eval set, or None."""
    if not len(index):
        return None
    values = [v if isinstance(v, str) else json.dumps(v) for v in row.values()]
    if any(index.overlaps(v) for v in values) or index.overlaps("\n".join(values)):
        return f"shares a {index.n}-gram with, or equals, an eval-set example"
    return None
