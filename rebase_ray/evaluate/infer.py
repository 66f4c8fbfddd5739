"""Batch inference with the student over an eval set: Ray Data `map_batches` tasks, the base
model and every adapter kept in the worker process (`generation.resident`: peft named adapters
on one copy of the base weights, there for the next evaluation or IFD pass of the same run).
Each input is rendered into the student's prompt once; for every run — the base model
(adapters switched off) and each named adapter — the greedy reply is generated
(`generation.generate`) and, for a label task, every label is scored as a continuation of that
prompt (`generation.choice_loglikelihood`). So all runs are evaluated on the same prompts by
the same code in the same pass.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from rebase_ray import progress
from rebase_ray.config import EvaluateConfig, S3Config
from rebase_ray.formats import student_messages
from rebase_ray.runtime import init_ray, resolve_resources

BASE = "base"


def answer_batch(batch: dict[str, np.ndarray], *, model: str, adapters: dict[str, str],
                 runs: dict[str, str | None], instruction: str, labels: list[str] | None,
                 max_new_tokens: int, max_seq_len: int, batch_size: int, dtype: str = "auto",
                 s3: S3Config | None = None, threads: int = 1, generative: bool = True
                 ) -> dict[str, np.ndarray]:
    """A Ray Data batch function: per input, the greedy reply and (with `labels`) the
    log-likelihood of each label after the prompt, in columns `<run>_reply` and
    `<run>_logprobs`, for each run of `runs` ({run: its adapter's peft name, None for the
    base model}; `adapters`: {peft name: URI}, see `generation.resident`); and the
    model loads (`resident.LOADED`)."""
    from rebase_ray.generation import choice_loglikelihood, generate
    from rebase_ray.generation.resident import LOADED, loaded_marks, resident_lm, using
    from rebase_ray.models import set_torch_threads

    set_torch_threads(1, threads)
    lm, loaded = resident_lm(model, dtype, adapters, s3)
    generative = generative or not labels  # without labels, the reply is the answer
    prompts = [lm.render(student_messages(instruction, str(x))) for x in batch["input"]]
    out = {"idx": batch["idx"], LOADED: np.array(loaded_marks(len(prompts), loaded))}
    for run, adapter in runs.items():
        with using(lm, adapter):
            if generative:
                replies = [g[0].text for g in generate(lm, prompts,
                                                       max_new_tokens=max_new_tokens)]
                out[f"{run}_reply"] = np.array(replies, dtype=object)
            if labels:
                scored = choice_loglikelihood(lm, prompts, labels, max_seq_len=max_seq_len,
                                              batch_size=batch_size)
                out[f"{run}_logprobs"] = np.array([[lp for lp, _ in row] for row in scored],
                                                  dtype=np.float64)
    return out


def predict(inputs: list[str], instruction: str, labels: list[str] | None, model: str,
            adapters: dict[str, str], cfg: EvaluateConfig, s3: S3Config | None = None,
            base: bool = True) -> tuple[dict[str, list[dict]], dict]:
    """{run: [{'reply'[, 'logprobs']} per input, in the order of `inputs`]} for the base model
    (when `base`, or when there is no adapter) and each named adapter of `adapters`;
    'logprobs' holds one value per label, in the order of `labels`; 'reply' is None when a
    label task is not generated (`cfg.generative` off). And the workers' resources, resolved
    from those free now (`runtime.resolve_resources`, an "actor" being one worker task at a
    time), at most one per batch, with `model_loads`: the batches that had to load the
    model, 0 when every worker kept it from an earlier evaluation or IFD pass."""
    import ray

    from rebase_ray.generation.resident import LOADED, fingerprint, map_resident

    named = {run: fingerprint(uri, s3) for run, uri in adapters.items()}  # once, here
    runs = {**({BASE: None} if base or not adapters else {}), **named}
    init_ray()
    batches = math.ceil(len(inputs) / cfg.batch_size)
    pool = resolve_resources(cfg.resources, most=batches)
    # one block per batch, `batch_size` consecutive inputs each: batches do not depend on what
    # the cluster has free (Ray Data sizes `from_items` blocks from it), so neither do the
    # scores, which padding with other rows can move in the last float bits
    step = cfg.batch_size
    ds = ray.data.from_arrow([pa.table({"idx": list(range(i, min(i + step, len(inputs)))),
                                        "input": inputs[i:i + step]})
                              for i in range(0, len(inputs), step)])
    # on CPU, tasks: the worker processes, and the model in them, outlive this evaluation for
    # the next one of the run (`generation.resident`)
    ds = map_resident(
        ds, answer_batch,
        {"model": model, "runs": runs,
         "adapters": {named[run]: uri for run, uri in adapters.items()},
         "instruction": instruction, "labels": labels, "max_new_tokens": cfg.max_new_tokens,
         "max_seq_len": cfg.max_seq_len, "batch_size": cfg.batch_size, "dtype": cfg.dtype,
         "s3": s3, "threads": pool.threads, "generative": cfg.generative},
        pool, batch_size=cfg.batch_size)
    rows, loads = [], 0
    with progress.task(f"evaluate: examples × {len(runs)} model(s)", total=len(inputs)) as advance:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(batch["idx"])
            rows += [{k: v[i] for k, v in batch.items()} for i in range(n)]
            loads += int(batch[LOADED].sum())
            advance(n)
    rows.sort(key=lambda r: int(r["idx"]))
    out: dict[str, list[dict]] = {}
    for run in runs:
        out[run] = [{"reply": str(r[f"{run}_reply"]) if f"{run}_reply" in r else None}
                    for r in rows]
        if labels:
            for answer, r in zip(out[run], rows):
                answer["logprobs"] = [float(lp) for lp in r[f"{run}_logprobs"]]
    return out, {**pool.summary(), "model_loads": loads}
