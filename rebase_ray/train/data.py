"""The student's training data: examples → tokenized rows (step 1 of `train.stage`), and the
seeded schedule of global batches that every worker follows (step 2)."""

from __future__ import annotations

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


