"""Batch inference with the student over an eval set: Ray Data `map_batches` on an actor pool,
the model (and its LoRA adapter) loaded once per actor. With `baseline`, each batch is also
answered with the adapter switched off, so the base model is evaluated on the same prompts by
the same code in the same pass.
"""

from __future__ import annotations

import math

import numpy as np

from rebase_ray.config import EvaluateConfig, S3Config
from rebase_ray.formats import student_messages


class Predictor:
    """A Ray Data callable class: greedy answers for a batch of inputs."""

    def __init__(self, model: str, adapter: str | None, instruction: str, max_new_tokens: int,
                 baseline: bool, dtype: str = "auto", s3: S3Config | None = None,
                 threads: int = 1):
        from rebase_ray.models import load_adapter, load_causal_lm, set_torch_threads

        set_torch_threads(1, threads)
        self.model, self.tok = load_causal_lm(model, dtype=dtype)
        self.instruction, self.max_new_tokens = instruction, max_new_tokens
        self.baseline = baseline and adapter is not None
        self.has_adapter = adapter is not None
        if adapter is not None:
            self.model = load_adapter(self.model, adapter, s3)

    def _generate(self, inputs: list[str]) -> list[str]:
        import torch

        prompts = [self.tok.apply_chat_template(student_messages(self.instruction, x),
                                                add_generation_prompt=True, tokenize=False)
                   for x in inputs]
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        return self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [str(x) for x in batch["input"]]
        run = "trained" if self.has_adapter else "base"
        out = {"idx": batch["idx"], run: np.array(self._generate(inputs), dtype=object)}
        if self.baseline:
            with self.model.disable_adapter():
                out["base"] = np.array(self._generate(inputs), dtype=object)
        return out


def predict(inputs: list[str], instruction: str, model: str, adapter: str | None,
            cfg: EvaluateConfig, s3: S3Config | None = None) -> dict[str, list[str]]:
    """{'base': [...], 'trained': [...]} (the runs that apply), in the order of `inputs`."""
    import ray

    if not ray.is_initialized():
        ray.init()
    ds = ray.data.from_items([{"idx": i, "input": x} for i, x in enumerate(inputs)])
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model": model, "adapter": adapter, "instruction": instruction,
                               "max_new_tokens": cfg.max_new_tokens, "baseline": cfg.baseline,
                               "dtype": cfg.dtype, "s3": s3,
                               "threads": cfg.torch_threads or math.ceil(cfg.num_cpus_per_actor)},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor,
    )
    rows = sorted(ds.take_all(), key=lambda r: int(r["idx"]))
    runs = [r for r in ("base", "trained") if rows and r in rows[0]]
    return {run: [str(r[run]) for r in rows] for run in runs}
