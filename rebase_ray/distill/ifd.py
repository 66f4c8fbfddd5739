"""Instruction-following difficulty (IFD) of head-domain candidates, BalDistill's selection score:

    IFD(x, ŷ) = PPL(ŷ | x) / PPL(ŷ)

where ŷ is what the current student (the previous stage's adapter on the base model; the base
model at stage 1) answers to the candidate's input x, PPL(ŷ | x) is the perplexity of ŷ's
tokens after the student's prompt for x, and PPL(ŷ) their perplexity after a single start token
(BOS, or EOS when the tokenizer has none) — the same tokens are scored in both, so the ratio
says how much the input helps the student. A high IFD marks an example the student has not
learned to follow yet; the highest are selected.

On Ray Data: the candidates flow through `IFDScorer` actors (the model loads once per actor);
each batch is one `generate` call (left padding) and one forward pass over the 2·batch
scored sequences (right padding, so positions match the unbatched computation).
"""

from __future__ import annotations

import math

import pandas as pd

from rebase_ray.config import S3Config
from rebase_ray.formats import student_messages

IFD_COLUMNS = ["student_output", "ppl_conditional", "ppl_alone", "ifd"]


def load_student(model_ref: str, adapter: str | None = None, s3: S3Config | None = None,
                 device: str | None = None):
    """(model, tokenizer): the base model with the LoRA adapter (a folder or s3:// URI)
    merged in, in eval mode."""
    from rebase_ray.models import load_adapter, load_causal_lm

    model, tok = load_causal_lm(model_ref, device=device)
    if adapter:
        model = load_adapter(model, adapter, s3, merge=True)
    return model, tok


def render_prompt(tok, instruction: str, input_text: str) -> str:
    return tok.apply_chat_template(student_messages(instruction, input_text),
                                   add_generation_prompt=True, tokenize=False)


def generate(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of the student to rendered prompts (one batched call)."""
    import torch

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    return tok.batch_decode(new, skip_special_tokens=True)


def _start_id(tok) -> int:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def perplexities(model, tok, prompts: list[str], answers: list[str], max_seq_len: int = 512
                 ) -> list[tuple[float, float]]:
    """[(PPL(answer | prompt), PPL(answer))] in one forward pass; NaN for an empty answer."""
    import torch

    seqs: list[tuple[list[int], int]] = []  # (ids, number of unscored leading tokens)
    for prompt, answer in zip(prompts, answers):
        a_ids = tok(answer, add_special_tokens=False)["input_ids"][: max_seq_len - 1]
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        p_ids = p_ids[max(0, len(p_ids) + len(a_ids) - max_seq_len):]
        seqs.append((p_ids + a_ids, len(p_ids)))
        seqs.append(([_start_id(tok)] + a_ids, 1))
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    scored = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, n_skip) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        scored[i, n_skip: len(s)] = True
    with torch.inference_mode():
        logits = model(input_ids=ids.to(model.device),
                       attention_mask=mask.to(model.device)).logits.float().cpu()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    keep = scored[:, 1:]
    ppl = []
    for i in range(len(seqs)):
        n = int(keep[i].sum())
        ppl.append(math.exp(float(nll[i][keep[i]].sum()) / n) if n else float("nan"))
    return [(ppl[2 * j], ppl[2 * j + 1]) for j in range(len(prompts))]


class IFDScorer:
    """Ray Data actor: the student answers each candidate's input, then both perplexities of
    its answer give the candidate's IFD."""

    def __init__(self, model: str, adapter: str | None, instruction: str, max_new_tokens: int,
                 max_seq_len: int, s3: dict | None = None, threads: int | None = None):
        from rebase_ray.models import set_torch_threads

        set_torch_threads(1, threads)
        self.model, self.tok = load_student(model, adapter,
                                            S3Config.model_validate(s3) if s3 else None)
        self.instruction = instruction
        self.max_new_tokens = max_new_tokens
        self.max_seq_len = max_seq_len

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        prompts = [render_prompt(self.tok, self.instruction, x) for x in batch["input"]]
        answers = generate(self.model, self.tok, prompts, self.max_new_tokens)
        ppls = perplexities(self.model, self.tok, prompts, answers, self.max_seq_len)
        batch = batch.copy()
        batch["student_output"] = answers
        batch["ppl_conditional"] = [c for c, _ in ppls]
        batch["ppl_alone"] = [a for _, a in ppls]
        batch["ifd"] = [c / a if a and not math.isnan(a) else float("nan") for c, a in ppls]
        return batch


def score_ifd(candidates: pd.DataFrame, model: str, adapter: str | None, instruction: str,
              batch_size: int = 8, max_new_tokens: int = 64, max_seq_len: int = 512,
              actors: int = 1, num_cpus: float = 1, num_gpus: float = 0,
              s3: S3Config | None = None) -> pd.DataFrame:
    """`candidates` (with an `input` column) plus the columns of IFD_COLUMNS, in input order."""
    import ray

    if candidates.empty:
        return candidates.assign(**{c: pd.Series(dtype=object if c == "student_output"
                                                 else float) for c in IFD_COLUMNS})
    import numpy as np

    frame = candidates.reset_index(drop=True).assign(_order=range(len(candidates)))
    # blocks made here, not by a repartition task: that task would need a free CPU, which the
    # teacher replica and the scorer actors may hold between them
    blocks = max(1, min(len(frame) // batch_size, actors * 4))
    ds = ray.data.from_pandas([frame.iloc[idx] for idx in np.array_split(range(len(frame)),
                                                                         blocks)])
    scored = ds.map_batches(
        IFDScorer, batch_size=batch_size, batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=num_cpus, num_gpus=num_gpus,
        fn_constructor_kwargs={"model": model, "adapter": adapter, "instruction": instruction,
                               "max_new_tokens": max_new_tokens, "max_seq_len": max_seq_len,
                               "s3": s3.model_dump() if s3 else None,
                               "threads": max(1, int(num_cpus))})
    out = scored.to_pandas().sort_values("_order").drop(columns="_order")
    return out.reset_index(drop=True)
