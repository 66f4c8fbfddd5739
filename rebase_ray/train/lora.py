"""LoRA fine-tuning of the student on Ray Train: the whole recipe in one file.

Flow (like torchtune's lora_finetune_single_device, spread over Ray Train workers):

1. Driver: read the examples table (input, output, optional rationale and domain), render each
   one with the tokenizer's chat template (`formats.training_chats`: the prompt, the answer,
   and with `rationale: multitask` a second prompt asking for the rationale), tokenize, and put
   the encoded rows in the object store once. Rows without input or output are rejected with
   their reason, never dropped silently; prompts too long for `max_seq_len` lose their oldest
   tokens (the answer is kept).
2. Workers (`TorchTrainer`, DDP: gloo on CPU, nccl on GPU, via `prepare_model`): a fixed,
   seeded schedule of global batches. Every worker knows the whole schedule, so the step,
   token and example budgets are reached on the same step on every worker; the wall-time
   budget is agreed on with one all-reduce per step. The loss covers the answer tokens only
   (prompt labels are -100).
3. Every `checkpoint_every` steps and at the end, rank 0 reports a checkpoint (the adapter, the
   optimizer state, the counters and the loss curve) to the run storage (`<out>/checkpoints`,
   local or S3). When a worker dies, `FailureConfig(max_failures)` restarts the group and the
   loop resumes from the latest checkpoint: same step counter, same position in the schedule.
4. Driver: copy the adapter of the final checkpoint to `<out>/adapter` (peft format), write
   `<out>/train_summary.json` and return the summary.
"""

from __future__ import annotations

import json
import logging
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
from rebase_ray.formats import training_chats
from rebase_ray.runtime import init_ray
from rebase_ray.storage import Storage, split_uri

IGNORE = -100
STATE = "state.json"
OPTIMIZER = "optimizer.pt"
ADAPTER = "adapter"
POLL_S = 0.5  # how often the driver reads the step counter while training runs

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- driver: data


def read_examples(examples: pa.Table | str, s3: S3Config | None = None) -> list[dict]:
    """Rows of an examples table, a parquet URI, or a folder holding examples.parquet."""
    if isinstance(examples, str):
        st = Storage.for_uri(examples, s3)
        if not examples.endswith(".parquet"):
            examples = st.join(examples, "examples.parquet")
        examples = st.read_parquet(examples)
    missing = {"input", "output"} - set(examples.column_names)
    if missing:
        raise ValueError(f"examples table lacks column(s) {sorted(missing)}; "
                         f"it has {examples.column_names}")
    return examples.to_pylist()


def encode(rows: list[dict], instruction: str, tokenizer, max_seq_len: int,
           rationale: str = "multitask") -> tuple[list[dict], list[dict], int]:
    """(encoded sequences with `input_ids`, `n_prompt` and their `row`, rejects, number of
    truncated prompts). A row teaches one sequence, or two with `rationale: multitask`
    (`formats.training_chats`)."""
    encoded, rejects, truncated = [], [], 0
    for i, row in enumerate(rows):
        text_in, text_out = (row.get("input") or "").strip(), (row.get("output") or "").strip()
        if not text_in or not text_out:
            rejects.append({"index": i, "reason": "empty input or output",
                            "input": text_in[:200], "output": text_out[:200]})
            continue
        for messages, answer in training_chats(instruction, text_in, text_out,
                                               row.get("rationale"), rationale):
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=False)
            full = tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": answer}], tokenize=False)
            if not full.startswith(prompt):
                raise ValueError("the tokenizer's chat template does not extend the prompt "
                                 "with the answer; cannot mask the prompt tokens")
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
            if len(a_ids) >= max_seq_len:
                rejects.append({"index": i, "reason": f"answer is {len(a_ids)} tokens, "
                                f"max_seq_len is {max_seq_len}", "input": text_in[:200],
                                "output": text_out[:200]})
                continue
            if len(p_ids) + len(a_ids) > max_seq_len:
                p_ids = p_ids[len(p_ids) + len(a_ids) - max_seq_len:]
                truncated += 1
            encoded.append({"input_ids": p_ids + a_ids, "n_prompt": len(p_ids), "row": i})
    return encoded, rejects, truncated


# ----------------------------------------------------------------------------- schedule


def batch_indices(step: int, n: int, global_batch: int, steps_per_epoch: int, seed: int
                  ) -> list[int]:
    """The example indices of global step `step` (0-based): a seeded permutation per epoch,
    cut into global batches; the last batch of an epoch wraps around to stay full."""
    import numpy as np

    epoch, k = divmod(step, steps_per_epoch)
    perm = np.random.default_rng(seed + epoch).permutation(n)
    return [int(perm[(k * global_batch + j) % n]) for j in range(global_batch)]


def budget_stop(step: int, tokens: int, examples: int, cfg: dict) -> str | None:
    """The first budget reached after `step` steps (1-based count), or None."""
    if cfg["max_steps"] and step >= cfg["max_steps"]:
        return "max_steps"
    if cfg["max_tokens"] and tokens >= cfg["max_tokens"]:
        return "max_tokens"
    if cfg["max_examples"] and examples >= cfg["max_examples"]:
        return "max_examples"
    if step >= cfg["total_steps"]:
        return "epochs"
    return None


def collate(rows: list[dict], pad_id: int):
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, r["n_prompt"]:n] = ids[i, r["n_prompt"]:n]
    return ids, mask, labels


# ----------------------------------------------------------------------------- worker loop


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import AutoModelForCausalLM

    from rebase_ray.models import native_bf16, resolve, set_torch_threads

    set_torch_threads(config["cpus_per_worker"], config["torch_threads"])

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"])

    # the weights train in float32 on a CPU (bfloat16 is autocast, below), bfloat16 on CUDA
    model = AutoModelForCausalLM.from_pretrained(
        resolve(config["model"]),
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    mixed = config["dtype"] == "bfloat16" or (config["dtype"] == "auto"
                                              and native_bf16(str(device)))
    lora = config["lora"]
    model = get_peft_model(model, LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config["learning_rate"])

    state = {"step": 0, "tokens": 0, "examples": 0, "train_s": 0.0, "elapsed_s": 0.0,
             "loss_curve": [],
             "restarts": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = json.loads(Path(folder, STATE).read_text())
            state["restarts"] += 1
            set_peft_model_state_dict(model, load_peft_weights(str(Path(folder, ADAPTER)),
                                                               device="cpu"))
            optimizer.load_state_dict(torch.load(Path(folder, OPTIMIZER), map_location="cpu"))
    model = ray.train.torch.prepare_model(model)  # moves to device; DDP when world > 1
    model.train()
    peft_model = model.module if world > 1 else model

    data = ray.get(config["data_ref"])
    n, batch = len(data), config["batch_size"]
    global_batch = batch * world
    on_step: Callable[[int, int], None] | None = config["on_step"]
    started, elapsed_before = time.time(), state["elapsed_s"]
    stop = budget_stop(state["step"], state["tokens"], state["examples"], config)
    while stop is None:
        t0 = time.time()
        indices = batch_indices(state["step"], n, global_batch, config["steps_per_epoch"],
                                config["seed"])
        step_tokens = sum(len(data[i]["input_ids"]) for i in indices)
        ids, mask, labels = collate([data[i] for i in indices[rank::world]],
                                    config["pad_id"])
        # bfloat16: mixed precision, the weights and the optimizer stay in float32
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=mixed):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        labels=labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

        n_answer = float((labels[:, 1:] != IGNORE).sum())
        state["step"] += 1
        state["tokens"] += step_tokens
        state["examples"] += global_batch
        state["train_s"] += time.time() - t0
        state["elapsed_s"] = elapsed_before + time.time() - started
        over_wall = bool(config["max_wall_s"] and state["elapsed_s"] >= config["max_wall_s"])
        agreed = torch.tensor([out.loss.item() * n_answer, n_answer, float(over_wall)])
        if world > 1:
            dist.all_reduce(agreed)  # global loss, and stop together on the wall budget
        loss = agreed[0].item() / max(agreed[1].item(), 1.0)
        state["loss_curve"].append([state["step"], round(loss, 5)])
        stop = budget_stop(state["step"], state["tokens"], state["examples"], config)
        if stop is None and agreed[2].item() > 0:
            stop = "max_wall_s"
        state["stop_reason"] = stop
        if rank == 0 and (state["step"] % config["log_every"] == 0 or stop):
            logger.info("step %d/%d loss %.4f tokens %d (%s)", state["step"],
                        config["total_steps"], loss, state["tokens"], stop or "training")
        if rank == 0 and config.get("step_counter") is not None:
            # the driver's progress display; waited for, so the last step is in before fit ends
            ray.get(config["step_counter"].set.remote(state["step"]))

        metrics = {"step": state["step"], "loss": loss, "tokens": state["tokens"]}
        if stop or state["step"] % config["checkpoint_every"] == 0:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    peft_model.save_pretrained(str(Path(tmp, ADAPTER)))
                    torch.save(optimizer.state_dict(), Path(tmp, OPTIMIZER))
                    Path(tmp, STATE).write_text(json.dumps(state))
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
        if on_step is not None:
            on_step(state["step"], rank)


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


def train_student(examples: pa.Table | str, task: TaskConfig, cfg: TrainConfig, out: str,
                  s3: S3Config | None = None,
                  on_step: Callable[[int, int], None] | None = None) -> dict:
    """Fine-tune `cfg.model` with LoRA on the examples; returns the summary.

    Writes `<out>/adapter/` (peft), `<out>/train_summary.json`, `<out>/checkpoints/` (Ray
    Train run storage) and `<out>/train_rejects.jsonl` when rows were rejected. Rerunning with
    the same `out` resumes from the run's latest checkpoint. `on_step(step, rank)` is called on
    every worker after each step (instrumentation, fault injection in tests).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
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

    global_batch = cfg.batch_size * cfg.num_workers
    steps_per_epoch = math.ceil(len(data) / global_batch)
    loop_config = {
        "model": cfg.model, "lora": cfg.lora.model_dump(), "learning_rate": cfg.learning_rate,
        "batch_size": cfg.batch_size, "seed": cfg.seed, "pad_id": tokenizer.pad_token_id,
        "dtype": cfg.dtype, "cpus_per_worker": cfg.cpus_per_worker,
        "torch_threads": cfg.torch_threads,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": math.ceil(cfg.epochs * steps_per_epoch),
        "max_steps": cfg.max_steps, "max_tokens": cfg.max_tokens,
        "max_examples": cfg.max_examples, "max_wall_s": cfg.max_wall_s,
        "checkpoint_every": cfg.checkpoint_every,
        "log_every": max(1, min(cfg.checkpoint_every, 10)),
        "data_ref": ray.put(data), "on_step": on_step,
        "step_counter": ray.remote(num_cpus=0)(StepCounter).remote(),
    }
    storage_path, storage_fs = _run_storage(out, s3)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
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
        "truncated_prompts": truncated, "workers": cfg.num_workers,
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
