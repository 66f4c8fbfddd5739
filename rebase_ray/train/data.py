"""The student's training data: examples → tokenized rows → a Ray Dataset (step 1 of
`train.stage`), and each worker's seeded batches of its shard of it (step 2)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from rebase_ray.config import S3Config
from rebase_ray.formats import training_chats
from rebase_ray.storage import Storage

IGNORE = -100

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


def training_dataset(data: list[dict], world: int, seed: int) -> tuple[Any, int]:
    """(Ray Dataset of the sequences, rows per worker). The sequences go in a seeded order, so
    that each worker's shard is a random part of them, and the first ones again at the end
    where their number does not divide by `world` (like torch's DistributedSampler): the
    equal split (`streaming_split(equal=True)`) then drops none and gives every worker as many
    rows, hence as many batches. Each row keeps its index in `data` as `seq`."""
    import numpy as np
    import ray

    order = np.random.default_rng(seed).permutation(len(data))
    order = np.resize(order, len(data) + (-len(data)) % world)
    items = [{"seq": int(i), "input_ids": data[i]["input_ids"],
              "n_prompt": data[i]["n_prompt"]} for i in order]
    return ray.data.from_items(items), len(items) // world


# ----------------------------------------------------------------------------- workers


def shard_batches(shard, step: int, steps_per_epoch: int, shard_rows: int, batch_size: int,
                  seed: int) -> Iterator[list[dict]]:
    """This worker's batches from global step `step` (0-based) on, epoch after epoch: each
    epoch reads the shard (`ray.train.get_dataset_shard`) anew in an order of its own, seeded
    by `seed + epoch` (a local shuffle over the whole shard), cut into batches of
    `batch_size`, the last one of an epoch smaller. The same step gives the same rows on every
    run, so a resumed run reads the batches it has done and skips them."""
    epoch, skip = divmod(step, steps_per_epoch)
    while True:
        batches = shard.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                     local_shuffle_buffer_size=shard_rows,
                                     local_shuffle_seed=seed + epoch)
        for batch in itertools.islice(batches, skip, None):
            yield batch.to_pylist()
        epoch, skip = epoch + 1, 0


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


