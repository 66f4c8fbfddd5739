"""BalDistill's example pool: read it, reject what cannot be used (never dropped silently),
and the task's own few-shot examples as gathered examples."""

from __future__ import annotations

import hashlib

import pandas as pd
import pyarrow as pa

from rebase_ray.config import ConfigError, DistillConfig, S3Config, TaskConfig
from rebase_ray.distill.domains import assign_domains
from rebase_ray.storage import Storage
from rebase_ray.tasks import fewshot_rows

EXAMPLE_COLUMNS = ["example_id", "domain", "input", "output", "rationale", "origin", "stage",
                   "teacher", "prompt_version"]


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
