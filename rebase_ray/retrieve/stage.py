"""The retrieve stage: task.yaml + datastore → `<out>/hits.parquet`, `dropped.parquet` and
`manifest.json` (with the summary); `run_many` retrieves for several tasks with one start of
Ray and the shard actors. Resumable: an output whose manifest has the same config hash and
intact files is kept and its summary returned."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from rebase_ray.config import ConfigError, RetrieveConfig, S3Config, TaskConfig, config_hash
from rebase_ray.retrieve.decontam import eval_ngrams, excluded_sources
from rebase_ray.retrieve.retriever import Retrieval, Retriever
from rebase_ray.runtime import init_ray
from rebase_ray.storage import Storage, open_storage

HITS = "hits.parquet"
DROPPED = "dropped.parquet"
HITS_SCHEMA = pa.schema([
    ("task", pa.string()), ("row_key", pa.string()), ("dataset", pa.string()),
    ("config", pa.string()), ("split", pa.string()), ("row_idx", pa.int64()),
    ("domain", pa.string()), ("score", pa.float32()), ("input_score", pa.float32()),
    ("output_score", pa.float32()), ("dataset_score", pa.float32()), ("rank", pa.int64()),
    ("row", pa.string()), ("best_input_column", pa.string()),
    ("best_output_column", pa.string())])
DROPPED_SCHEMA = pa.schema([("row_key", pa.string()), ("dataset", pa.string()),
                            ("score", pa.float32()), ("reason", pa.string())])


def run(task: TaskConfig, datastore: str, out: str, cfg: RetrieveConfig,
        s3: S3Config | None = None, force: bool = False) -> dict:
    """Retrieve the task's top rows from the datastore; returns the stage summary."""
    return _retrieve([(task, out)], datastore, cfg, s3, force)[0]


def run_many(tasks: list[TaskConfig], datastore: str, out: str, cfg: RetrieveConfig,
             s3: S3Config | None = None, force: bool = False) -> dict:
    """Several tasks in one call: Ray and the shard actors start once, and each task's rows
    go to `<out>/<task name>/` as `run` writes them. Returns {"tasks": [each task's summary],
    "startup_s", "wall_s"}."""
    start = time.time()
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"tasks named {repeated} are given more than once: each task's rows "
                          "go to a folder named after it")
    st, out = open_storage(out, s3)
    timing: dict[str, float] = {}
    summaries = _retrieve([(t, st.join(out, t.name)) for t in tasks], datastore, cfg, s3, force,
                          timing)
    return {"datastore": summaries[0]["datastore"], "out": out, "tasks": summaries,
            "startup_s": timing.get("startup_s", 0.0), "wall_s": round(time.time() - start, 2)}


def _retrieve(jobs: list[tuple[TaskConfig, str]], datastore: str, cfg: RetrieveConfig,
              s3: S3Config | None, force: bool, timing: dict[str, float] | None = None
              ) -> list[dict]:
    """(task, out) → its summary, in order. A task whose output is complete for the same
    config is kept (`skipped`); the others share one Retriever, started only if needed."""
    _, datastore = open_storage(datastore, s3)
    store_manifest = Storage.for_uri(datastore, s3).read_manifest(datastore)
    if store_manifest is None:
        raise FileNotFoundError(f"no datastore at {datastore} (manifest.json missing): "
                                "build one with `rebase-ray index`")
    summaries: dict[int, dict] = {}
    todo = []
    for i, (task, out) in enumerate(jobs):
        st, out = open_storage(out, s3)
        key = config_hash(task, cfg.what(), datastore,
                          [store_manifest.get("files"), store_manifest.get("shards")])
        previous = st.read_manifest(out)
        if previous is not None and previous.get("config_hash") == key and not force:
            st.verify(out, previous)
            summaries[i] = {**previous["summary"], "skipped": True}
        else:
            todo.append((i, task, st, out, key))
    if todo:
        t0 = time.time()
        init_ray(dashboard=False)  # a Ray already up (`run`, a caller) is kept as it is
        retriever = Retriever(datastore, cfg, s3)
        if timing is not None:
            timing["startup_s"] = round(time.time() - t0, 2)
        try:
            for i, task, st, out, key in todo:
                summaries[i] = _retrieve_one(retriever, task, datastore, st, out, key, cfg, s3,
                                             time.time() - t0 if i == todo[0][0] else 0.0)
        finally:
            retriever.close()
    return [summaries[i] for i in range(len(jobs))]


def _retrieve_one(retriever: Retriever, task: TaskConfig, datastore: str, st: Storage, out: str,
                  key: str, cfg: RetrieveConfig, s3: S3Config | None, startup_s: float) -> dict:
    """One task's search, written to `out`; its wall time includes the start-up it waited
    for (the first task of a call)."""
    start = time.time() - startup_s
    query = retriever.query(task.instruction, [e.input for e in task.examples],
                            [e.output for e in task.examples])
    exclude = excluded_sources(retriever.source_names, task)
    contamination = eval_ngrams(task, cfg.ngram, s3) if task.eval else None
    result = retriever.search(query, cfg.top_n, exclude, contamination)
    hits = [{**h, "task": task.name, "row": json.dumps(h["row"], ensure_ascii=False)}
            for h in result.hits]
    st.write_parquet(st.join(out, HITS), pa.Table.from_pylist(hits, schema=HITS_SCHEMA))
    st.write_parquet(st.join(out, DROPPED),
                     pa.Table.from_pylist(result.dropped, schema=DROPPED_SCHEMA))
    summary = _summary(task, datastore, out, result, exclude, retriever, time.time() - start)
    st.write_manifest(out, {"stage": "retrieve", "config_hash": key, "task": task.name,
                            "datastore": datastore, "config": cfg.model_dump(mode="json"),
                            "summary": summary}, [HITS, DROPPED])
    return summary


def _summary(task: TaskConfig, datastore: str, out: str, result: Retrieval,
             exclude: dict[str, str], retriever: Retriever, wall_s: float) -> dict:
    hits = pd.DataFrame(result.hits, columns=HITS_SCHEMA.names)
    dropped = pd.DataFrame(result.dropped, columns=DROPPED_SCHEMA.names)
    scores = hits["score"].to_numpy(dtype=np.float64)
    quantiles = dict(zip(["min", "p25", "median", "p75", "max"],
                         np.quantile(scores, [0, .25, .5, .75, 1]).tolist())) if len(hits) else {}
    per_dataset = hits.groupby("dataset", sort=False).agg(
        rows=("row_key", "size"), mean_score=("score", "mean"),
        dataset_score=("dataset_score", "first")).reset_index().sort_values(
        "rows", ascending=False, kind="stable")  # the top sources first
    unknown = sorted(set(task.exclude_datasets) - set(retriever.source_names))
    return {
        "task": task.name,
        "datastore": datastore,
        "out": out,
        "rows": len(hits),
        "cells_searched": retriever.num_cells,
        "shards": len(retriever.shard_info),
        "resources": retriever.resources,
        "candidate_rows_scored": result.candidates,
        "rounds": result.rounds,
        "score": quantiles,
        "rows_per_dataset": [
            {"dataset": r.dataset, "rows": int(r.rows), "mean_score": float(r.mean_score),
             "dataset_score": float(r.dataset_score)} for r in per_dataset.itertuples()],
        "excluded_sources": [{"dataset": d, "reason": why} for d, why in sorted(exclude.items())],
        "unknown_exclude_datasets": unknown,
        "dropped": _counts(dropped),
        "wall_s": round(wall_s, 2),
    }


def _counts(dropped: pd.DataFrame) -> list[dict]:
    if dropped.empty:
        return []
    counts = dropped.groupby(["dataset", "reason"]).size().reset_index(name="rows")
    return [{"dataset": r.dataset, "reason": r.reason, "rows": int(r.rows)}
            for r in counts.itertuples()]
