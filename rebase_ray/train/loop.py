"""The training loop that runs on every Ray Train worker (step 2 and 3 of `train.stage`)."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rebase_ray.train.data import IGNORE, budget_stop, collate, shard_batches

STATE = "state.json"
OPTIMIZER = "optimizer.pt"
ADAPTER = "adapter"

logger = logging.getLogger(__name__)

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

    batches = shard_batches(ray.train.get_dataset_shard("train"), state["step"],
                            config["steps_per_epoch"], config["shard_rows"],
                            config["batch_size"], config["seed"])
    on_step: Callable[[int, int, list[int]], None] | None = config["on_step"]
    started, elapsed_before = time.time(), state["elapsed_s"]
    stop = budget_stop(state["step"], state["tokens"], state["examples"], config)
    while stop is None:
        t0 = time.time()
        rows = next(batches)
        ids, mask, labels = collate(rows, config["pad_id"])
        # bfloat16: mixed precision, the weights and the optimizer stay in float32
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=mixed):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        labels=labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

        n_answer = float((labels[:, 1:] != IGNORE).sum())
        state["train_s"] += time.time() - t0
        state["elapsed_s"] = elapsed_before + time.time() - started
        over_wall = bool(config["max_wall_s"] and state["elapsed_s"] >= config["max_wall_s"])
        agreed = torch.tensor([out.loss.item() * n_answer, n_answer, float(over_wall),
                               float(mask.sum()), float(len(rows))],
                              dtype=torch.float64, device=device)  # nccl: on the GPU
        if world > 1:
            # the global loss, tokens and examples; every worker stops on the same step
            dist.all_reduce(agreed)
        loss = agreed[0].item() / max(agreed[1].item(), 1.0)
        state["step"] += 1
        state["tokens"] += int(agreed[3].item())
        state["examples"] += int(agreed[4].item())
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
            on_step(state["step"], rank, [r["seq"] for r in rows])


