"""BalDistill domains: which domain each example of the pool belongs to, and how long-tailed
the pool is (counts per domain, imbalance ratio, Gini coefficient).

`domain_from` (DistillConfig):
- `eval_domain`: the examples' `domain` column (transform fills it from the sources' `domain`
  tag); it should name the same domains as the task's eval set (`task.eval.domain`);
- `column`: `domain_column`, a column of the examples table or a key of the retrieved `row`;
- `dataset`: the source dataset the example was made from;
- `label`: the example's answer (`output`), for label-imbalanced classification.

An example with no domain is not dropped silently: it comes back as a reject ("no_domain").
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from rebase_ray.config import ConfigError, DistillConfig, TaskConfig


def _from_row(row_json: Any, key: str) -> str:
    if not isinstance(row_json, str) or not row_json:
        return ""
    try:
        row = json.loads(row_json)
    except json.JSONDecodeError:
        return ""
    value = row.get(key) if isinstance(row, dict) else None
    return "" if value is None else str(value)


def domain_values(pool: pd.DataFrame, cfg: DistillConfig) -> pd.Series:
    """The domain of each row of `pool` ("" where it has none)."""
    if cfg.domain_from == "column":
        if not cfg.domain_column:
            raise ConfigError("distill.domain_column is required when distill.domain_from is "
                              "'column'")
        if cfg.domain_column in pool.columns:
            values = pool[cfg.domain_column]
        elif "row" in pool.columns:
            values = pool["row"].map(lambda r: _from_row(r, cfg.domain_column))
        else:
            raise ConfigError(f"distill.domain_column: the examples have no column (or row key) "
                              f"{cfg.domain_column!r}; columns: {list(pool.columns)}")
    else:
        column = {"eval_domain": "domain", "dataset": "dataset", "label": "output"}[cfg.domain_from]
        if column not in pool.columns:
            raise ConfigError(f"distill.domain_from={cfg.domain_from!r} needs an examples column "
                              f"{column!r}; columns: {list(pool.columns)}")
        values = pool[column]
    return values.map(lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v))
                      else str(v).strip())


def assign_domains(pool: pd.DataFrame, cfg: DistillConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pool with a `domain` column, rejects with `example_id` and `reason`)."""
    pool = pool.copy()
    pool["domain"] = domain_values(pool, cfg).to_numpy()
    missing = pool["domain"] == ""
    rejects = pool.loc[missing, ["example_id"]].assign(reason="no_domain")
    return pool[~missing].reset_index(drop=True), rejects.reset_index(drop=True)


def gini(counts: list[int]) -> float:
    """Gini coefficient of the counts: 0 = perfectly balanced, → 1 = all in one domain."""
    values = sorted(counts)
    n, total = len(values), sum(values)
    if n == 0 or total == 0:
        return 0.0
    weighted = sum((i + 1) * v for i, v in enumerate(values))
    return (2 * weighted) / (n * total) - (n + 1) / n


def long_tail_stats(domains: pd.Series) -> dict[str, Any]:
    """Counts per domain (largest first), imbalance ratio (largest / smallest) and Gini."""
    counts = domains.value_counts()
    counts = counts.sort_index().sort_values(ascending=False, kind="stable")
    values = [int(c) for c in counts]
    return {
        "domains": len(values),
        "examples": sum(values),
        "counts": {str(d): int(c) for d, c in counts.items()},
        "imbalance_ratio": round(values[0] / values[-1], 3) if values else 0.0,
        "gini": round(gini(values), 4),
    }


def expected_domains(task: TaskConfig, cfg: DistillConfig) -> list[str]:
    """Domains the task defines even where the pool has no example of them: the labels when
    domains are labels, the eval set's domains when domains come from the eval set."""
    if cfg.domain_from == "label":
        return list(task.labels or [])
    if cfg.domain_from == "eval_domain" and task.eval is not None and task.eval.domain:
        from rebase_ray.tasks import load_eval_set

        return sorted({r["domain"] for r in load_eval_set(task).records})
    return []
