"""LoRA fine-tuning of the student on Ray Train: the recipe: data.py, loop.py and this driver.

Flow (like torchtune's lora_finetune_single_device, spread over Ray Train workers):

1. Driver: read the examples table (input, output, optional rationale and domain), render each
   one with the tokenizer's chat template (`formats.training_chats`: the prompt, the answer,
   and with `rationale: multitask` a second prompt asking for the rationale), tokenize, and put
   the encoded rows in a Ray Dataset. Rows without input or output are rejected with
   their reason, never dropped silently; prompts too long for `max_seq_len` lose their oldest
   tokens (the answer is kept).
2. Workers (`TorchTrainer`, DDP: gloo on CPU, nccl on GPU, via `prepare_model`): the encoded
   rows reach them through Ray Data: one Ray Dataset, in a seeded order, split equally
   (`datasets=`, `DataConfig`, `streaming_split(equal=True)` with `preserve_order`, so the
   split is the same on every run); each worker reads its shard
   (`get_dataset_shard("train")`) once per epoch in a seeded order of that epoch and pads
   each batch. Every worker has as many rows, so as many steps; one all-reduce per step sums
   the loss, the tokens and the examples, so every budget stops every worker on the same
   step. The loss covers the answer tokens only (prompt labels are -100).
3. Every `checkpoint_every` steps and at the end, rank 0 reports a checkpoint (the adapter, the
   optimizer state, the counters and the loss curve) to the run storage (`<out>/checkpoints`,
   local or S3). When a worker dies, `FailureConfig(max_failures)` restarts the group and the
   loop resumes from the latest checkpoint: same step counter, and the same batches from
   there on (it reads the epoch's batches already done and skips them).
4. Driver: copy the adapter of the final checkpoint to `<out>/adapter` (peft format), write
   `<out>/train_summary.json` and return the summary.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from rebase_ray import progress
from rebase_ray.config import S3Config, TaskConfig, TrainConfig
from rebase_ray.runtime import init_ray, resolve_resources
from rebase_ray.storage import Storage, split_uri
from rebase_ray.train.data import encode, read_examples, training_dataset
from rebase_ray.train.loop import ADAPTER, STATE, train_loop

POLL_S = 0.5  # how often the driver reads the step counter while training runs
# Ray Train's controller checks on its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S seconds
# (2 by default) and sees the end of training only at a check: a 2-step stage on the tiny model
# took 15.0-15.6 s with the default and 11.6-12.7 s at 0.2 (the distillation loop trains once
# per stage). A value set in the environment is kept.
HEALTH_CHECK_S = "0.2"


# ----------------------------------------------------------------------------- driver: run


class StepCounter:
    """The latest step rank 0 finished, for the driver's progress display: a Ray actor that
    needs no CPU (`ray.remote(num_cpus=0)(StepCounter)`); rank 0 sets it after every step,
    the driver reads it while `trainer.fit()` runs."""

    def __init__(self) -> None:
        self.step = 0

    def set(self, step: int) -> None:
        self.step = step

    def get(self) -> int:
        return self.step


def fit_reporting_steps(trainer, counter, advance: Callable[[int], None],
                        every_s: float = POLL_S):
    """`trainer.fit()` in this thread while a helper thread reads `counter` every `every_s`
    seconds and feeds the new steps to `advance`; returns fit's result."""
    import ray

    seen = 0
    lock = threading.Lock()

    def poll() -> None:
        nonlocal seen
        try:
            step = ray.get(counter.get.remote(), timeout=max(every_s * 4, 2.0))
        except Exception:  # noqa: BLE001 - progress is best effort, training is not
            return
        with lock:
            if step > seen:
                advance(step - seen)
                seen = step

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            poll()

    thread = threading.Thread(target=loop, name="train-steps", daemon=True)
    thread.start()
    try:
        return trainer.fit()
    finally:
        stop.set()
        thread.join()
        poll()


def _run_storage(out: str, s3: S3Config | None) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig. With a pyarrow filesystem the path
    must not carry `s3://` (STACK_NOTES: "Invalid bucket name 's3:'")."""
    scheme, path = split_uri(out)
    if scheme == "file":
        return path, None
    return path, Storage("s3", s3).pa_fs


def run(examples: pa.Table | str, task: TaskConfig, cfg: TrainConfig, out: str,
        s3: S3Config | None = None,
        on_step: Callable[[int, int], None] | None = None) -> dict:
    """Fine-tune `cfg.model` with LoRA on the examples; returns the summary.

    Writes `<out>/adapter/` (peft), `<out>/train_summary.json`, `<out>/checkpoints/` (Ray
    Train run storage) and `<out>/train_rejects.jsonl` when rows were rejected. Rerunning with
    the same `out` resumes from the run's latest checkpoint. `on_step(step, rank, seqs)` is
    called on every worker after each step with the indices of the sequences of its batch
    (instrumentation, fault injection in tests).
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rebase_ray.models import load_tokenizer

    st = Storage.for_uri(out, s3)
    rows = read_examples(examples, s3)
    tokenizer = load_tokenizer(cfg.model)
    data, rejects, truncated = encode(rows, task.instruction, tokenizer, cfg.max_seq_len,
                                      cfg.rationale)
    if rejects:
        st.write_text(st.join(out, "train_rejects.jsonl"),
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    if not data:
        raise ValueError(f"no trainable examples: all {len(rows)} rows were rejected "
                         f"(see {st.join(out, 'train_rejects.jsonl')})")
    init_ray()

    # the workers' resources; a CPU left to the tasks that feed them (Ray Data)
    pool = resolve_resources(cfg.resources, reserve=1)
    dataset, shard_rows = training_dataset(data, pool.actors, cfg.seed)
    steps_per_epoch = math.ceil(shard_rows / cfg.batch_size)
    loop_config = {
        "model": cfg.model, "lora": cfg.lora.model_dump(), "learning_rate": cfg.learning_rate,
        "batch_size": cfg.batch_size, "seed": cfg.seed, "pad_id": tokenizer.pad_token_id,
        "dtype": cfg.dtype, "cpus_per_worker": pool.cpus, "torch_threads": pool.threads,
        "steps_per_epoch": steps_per_epoch, "shard_rows": shard_rows,
        "total_steps": math.ceil(cfg.epochs * steps_per_epoch),
        "max_steps": cfg.max_steps, "max_tokens": cfg.max_tokens,
        "max_examples": cfg.max_examples, "max_wall_s": cfg.max_wall_s,
        "checkpoint_every": cfg.checkpoint_every,
        "log_every": max(1, min(cfg.checkpoint_every, 10)),
        "on_step": on_step,
        "step_counter": ray.remote(num_cpus=0)(StepCounter).remote(),
    }
    storage_path, storage_fs = _run_storage(out, s3)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_S)  # read by fit()
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same split on every run: a resumed run is exact
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest),
        torch_config=TorchConfig(backend="nccl" if pool.gpus else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=pool.actors, use_gpu=pool.gpus > 0,
            resources_per_worker={"CPU": pool.cpus, **({"GPU": pool.gpus} if pool.gpus else {})}),
        run_config=RunConfig(
            name="checkpoints", storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    t0 = time.time()
    planned = loop_config["total_steps"]
    if cfg.max_steps:
        planned = min(planned, cfg.max_steps)
    try:
        with progress.task("train: steps", total=planned) as advance:
            result = fit_reporting_steps(trainer, loop_config["step_counter"], advance)
    finally:
        ray.kill(loop_config["step_counter"])
    wall_s = time.time() - t0

    adapter_uri = st.join(out, ADAPTER)
    with result.checkpoint.as_directory() as folder:
        state = json.loads(Path(folder, STATE).read_text())
        st.upload_dir(str(Path(folder, ADAPTER)), adapter_uri)
    if cfg.merge:
        _merge(cfg.model, adapter_uri, st.join(out, "merged"), st)

    curve = state["loss_curve"]
    summary = {
        "model": cfg.model, "adapter": adapter_uri, "checkpoints": st.join(out, "checkpoints"),
        "examples_in": len(rows), "examples_used": len({d["row"] for d in data}),
        "sequences": len(data), "rejected": len(rejects),
        "truncated_prompts": truncated, "workers": pool.actors,
        "resources": pool.summary(),
        "steps": state["step"], "tokens": state["tokens"], "examples": state["examples"],
        "stop_reason": state["stop_reason"], "restarts": state["restarts"],
        "first_loss": curve[0][1], "final_loss": curve[-1][1],
        "train_s": round(state["train_s"], 2), "wall_s": round(wall_s, 2),
        "s_per_step": round(state["train_s"] / max(state["step"], 1), 4),
        "examples_per_s": round(state["examples"] / max(state["train_s"], 1e-9), 3),
        "tokens_per_s": round(state["tokens"] / max(state["train_s"], 1e-9), 1),
        "loss_curve": curve,
    }
    st.write_json(st.join(out, "train_summary.json"), summary)
    return summary


def _merge(model_ref: str, adapter_uri: str, merged_uri: str, st: Storage) -> None:
    """Write base + adapter merged into one transformers folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rebase_ray.models import load_tokenizer, resolve

    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = st.download_dir(adapter_uri, os.path.join(tmp, "adapter"))
        base = AutoModelForCausalLM.from_pretrained(resolve(model_ref))
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(os.path.join(tmp, "merged"))
        load_tokenizer(model_ref).save_pretrained(os.path.join(tmp, "merged"))
        st.upload_dir(os.path.join(tmp, "merged"), merged_uri)
