"""Batch inference with the student over an eval set: Ray Data `map_batches` on an actor pool,
the model (and its LoRA adapter) loaded once per actor. Each input is rendered into the
student's prompt once; the greedy reply is generated (`generation.generate`) and, for a label
task, every label is scored as a continuation of that prompt (`generation.loglikelihood`).
With `baseline`, each batch is also answered and scored with the adapter switched off, so the
base model is evaluated on the same prompts by the same code in the same pass.
"""

from __future__ import annotations

import math

import numpy as np

from rebase_ray.config import EvaluateConfig, S3Config
from rebase_ray.formats import student_messages
from rebase_ray.runtime import init_ray


class Predictor:
    """A Ray Data callable class: per input, the greedy reply and (with `labels`) the
    log-likelihood of each label after the prompt, in columns `<run>_reply` and
    `<run>_logprobs` for the runs `trained` (with an adapter) and `base`."""

    def __init__(self, model: str, adapter: str | None, instruction: str,
                 labels: list[str] | None, max_new_tokens: int, max_seq_len: int,
                 batch_size: int, baseline: bool, dtype: str = "auto",
                 s3: S3Config | None = None, threads: int = 1):
        from rebase_ray.generation import LM
        from rebase_ray.models import set_torch_threads

        set_torch_threads(1, threads)
        self.lm = LM.load(model, adapter, s3, dtype=dtype)
        self.instruction, self.labels = instruction, labels
        self.max_new_tokens, self.max_seq_len = max_new_tokens, max_seq_len
        self.batch_size = batch_size
        self.has_adapter = adapter is not None
        self.baseline = baseline and self.has_adapter

    def _answer(self, prompts: list[str]) -> dict[str, np.ndarray]:
        from rebase_ray.generation import generate, loglikelihood

        replies = [g[0].text for g in generate(self.lm, prompts,
                                               max_new_tokens=self.max_new_tokens)]
        out = {"reply": np.array(replies, dtype=object)}
        if self.labels:
            k = len(self.labels)
            scored = loglikelihood(self.lm, [p for p in prompts for _ in range(k)],
                                   self.labels * len(prompts), batch_size=self.batch_size,
                                   max_seq_len=self.max_seq_len)
            out["logprobs"] = np.array([lp for lp, _ in scored], dtype=np.float64).reshape(-1, k)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [self.lm.render(student_messages(self.instruction, str(x)))
                   for x in batch["input"]]
        runs = {"trained" if self.has_adapter else "base": self._answer(prompts)}
        if self.baseline:
            with self.lm.model.disable_adapter():
                runs["base"] = self._answer(prompts)
        out = {"idx": batch["idx"]}
        for run, columns in runs.items():
            out.update({f"{run}_{name}": values for name, values in columns.items()})
        return out


def predict(inputs: list[str], instruction: str, labels: list[str] | None, model: str,
            adapter: str | None, cfg: EvaluateConfig, s3: S3Config | None = None
            ) -> dict[str, list[dict]]:
    """{'base': [...], 'trained': [...]} (the runs that apply), one {'reply'} per input in the
    order of `inputs`, with 'logprobs' (one per label, in the order of `labels`) when `labels`
    is given."""
    import ray

    init_ray()
    ds = ray.data.from_items([{"idx": i, "input": x} for i, x in enumerate(inputs)])
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model": model, "adapter": adapter, "instruction": instruction,
                               "labels": labels, "max_new_tokens": cfg.max_new_tokens,
                               "max_seq_len": cfg.max_seq_len, "batch_size": cfg.batch_size,
                               "baseline": cfg.baseline, "dtype": cfg.dtype, "s3": s3,
                               "threads": cfg.torch_threads or math.ceil(cfg.num_cpus_per_actor)},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor,
    )
    rows = sorted(ds.take_all(), key=lambda r: int(r["idx"]))
    runs = [run for run in ("base", "trained") if rows and f"{run}_reply" in rows[0]]
    out: dict[str, list[dict]] = {}
    for run in runs:
        out[run] = [{"reply": str(r[f"{run}_reply"])} for r in rows]
        if labels:
            for answer, r in zip(out[run], rows):
                answer["logprobs"] = [float(lp) for lp in r[f"{run}_logprobs"]]
    return out
