"""Batch inference with the student over an eval set: Ray Data `map_batches` on an actor pool,
the base model and every adapter loaded once per actor (peft named adapters on one copy of the
base weights). Each input is rendered into the student's prompt once; for every run — the base
model (adapters switched off) and each named adapter — the greedy reply is generated
(`generation.generate`) and, for a label task, every label is scored as a continuation of that
prompt (`generation.choice_loglikelihood`). So all runs are evaluated on the same prompts by
the same code in the same pass.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pyarrow as pa

from rebase_ray import progress
from rebase_ray.config import EvaluateConfig, S3Config
from rebase_ray.formats import student_messages
from rebase_ray.runtime import init_ray, resolve_resources

BASE = "base"


class Predictor:
    """A Ray Data callable class: per input, the greedy reply and (with `labels`) the
    log-likelihood of each label after the prompt, in columns `<run>_reply` and
    `<run>_logprobs`, for each run of `runs` (`base`, or the name of an adapter)."""

    def __init__(self, model: str, adapters: dict[str, str], runs: list[str],
                 instruction: str, labels: list[str] | None, max_new_tokens: int,
                 max_seq_len: int, batch_size: int, dtype: str = "auto",
                 s3: S3Config | None = None, threads: int = 1, generative: bool = True):
        from rebase_ray.generation import LM
        from rebase_ray.models import set_torch_threads

        set_torch_threads(1, threads)
        self.lm = LM.load(model, s3=s3, dtype=dtype, adapters=adapters)
        self.runs, self.has_adapters = runs, bool(adapters)
        self.instruction, self.labels = instruction, labels
        self.max_new_tokens, self.max_seq_len = max_new_tokens, max_seq_len
        self.batch_size = batch_size
        self.generative = generative or not labels  # without labels, the reply is the answer

    def _answer(self, prompts: list[str]) -> dict[str, np.ndarray]:
        from rebase_ray.generation import choice_loglikelihood, generate

        out = {}
        if self.generative:
            replies = [g[0].text for g in generate(self.lm, prompts,
                                                   max_new_tokens=self.max_new_tokens)]
            out["reply"] = np.array(replies, dtype=object)
        if self.labels:
            scored = choice_loglikelihood(self.lm, prompts, self.labels,
                                          max_seq_len=self.max_seq_len,
                                          batch_size=self.batch_size)
            out["logprobs"] = np.array([[lp for lp, _ in row] for row in scored],
                                       dtype=np.float64)
        return out

    def _as(self, run: str) -> contextlib.AbstractContextManager:
        if not self.has_adapters:
            return contextlib.nullcontext()
        if run == BASE:
            return self.lm.model.disable_adapter()
        self.lm.model.set_adapter(run)
        return contextlib.nullcontext()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [self.lm.render(student_messages(self.instruction, str(x)))
                   for x in batch["input"]]
        out = {"idx": batch["idx"]}
        for run in self.runs:
            with self._as(run):
                columns = self._answer(prompts)
            out.update({f"{run}_{name}": values for name, values in columns.items()})
        return out


def predict(inputs: list[str], instruction: str, labels: list[str] | None, model: str,
            adapters: dict[str, str], cfg: EvaluateConfig, s3: S3Config | None = None,
            base: bool = True) -> tuple[dict[str, list[dict]], dict]:
    """{run: [{'reply'[, 'logprobs']} per input, in the order of `inputs`]} for the base model
    (when `base`, or when there is no adapter) and each named adapter of `adapters`;
    'logprobs' holds one value per label, in the order of `labels`; 'reply' is None when a
    label task is not generated (`cfg.generative` off). And the actor pool's resources,
    resolved from those free now (`runtime.resolve_resources`), at most one actor per batch."""
    import ray

    runs = ([BASE] if base or not adapters else []) + list(adapters)
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
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model": model, "adapters": adapters, "runs": runs,
                               "instruction": instruction, "labels": labels,
                               "max_new_tokens": cfg.max_new_tokens,
                               "max_seq_len": cfg.max_seq_len, "batch_size": cfg.batch_size,
                               "dtype": cfg.dtype, "s3": s3,
                               "threads": pool.threads,
                               "generative": cfg.generative},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus, num_gpus=pool.gpus,
    )
    rows = []
    with progress.task(f"evaluate: examples × {len(runs)} model(s)", total=len(inputs)) as advance:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(batch["idx"])
            rows += [{k: v[i] for k, v in batch.items()} for i in range(n)]
            advance(n)
    rows.sort(key=lambda r: int(r["idx"]))
    out: dict[str, list[dict]] = {}
    for run in runs:
        out[run] = [{"reply": str(r[f"{run}_reply"]) if f"{run}_reply" in r else None}
                    for r in rows]
        if labels:
            for answer, r in zip(out[run], rows):
                answer["logprobs"] = [float(lp) for lp in r[f"{run}_logprobs"]]
    return out, pool.summary()
