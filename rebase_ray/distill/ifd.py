"""Instruction-following difficulty (IFD) of head-domain candidates, BalDistill's selection score:

    IFD(x, ŷ) = PPL(ŷ | x) / PPL(ŷ)

where ŷ is what the current student (the previous stage's adapter on the base model; the base
model at stage 1) answers to the candidate's input x, PPL(ŷ | x) is the perplexity of ŷ's
tokens after the student's prompt for x, and PPL(ŷ) their perplexity after a single start token
(BOS, or EOS when the tokenizer has none) — the same answer is scored in both (its tokens
split from the context's as lm-evaluation-harness splits a continuation), so the ratio says how
much the input helps the student. A high IFD marks an example the student has not
learned to follow yet; the highest are selected.

On Ray Data: the candidates flow through `score_batch` tasks, the student kept in the worker
process for the run's next IFD pass or evaluation (`generation.resident`); each batch is one
`generation.generate` call and one `generation.loglikelihood` call over the 2·batch
(context, answer) pairs: (prompt, ŷ) and (start token, ŷ).
"""

from __future__ import annotations

import math

import pandas as pd

from rebase_ray.config import Resources, S3Config
from rebase_ray.formats import student_messages
from rebase_ray.runtime import resolve_resources

IFD_COLUMNS = ["student_output", "ppl_conditional", "ppl_alone", "ifd"]


def start_text(tok) -> str:
    """The single start token PPL(ŷ) is conditioned on, as text: BOS, else EOS."""
    return tok.bos_token if tok.bos_token is not None else tok.eos_token


def perplexities(lm, prompts: list[str], answers: list[str], max_seq_len: int = 512
                 ) -> list[tuple[float, float]]:
    """[(PPL(answer | prompt), PPL(answer | start token))]; NaN for an empty answer."""
    from rebase_ray.generation import loglikelihood, perplexity

    scored = [i for i, answer in enumerate(answers) if answer]
    start = start_text(lm.tokenizer)
    contexts = [c for i in scored for c in (prompts[i], start)]
    pairs = loglikelihood(lm, contexts, [answers[i] for i in scored for _ in range(2)],
                          batch_size=max(1, len(contexts)), max_seq_len=max_seq_len)
    out = [(math.nan, math.nan)] * len(answers)
    for j, i in enumerate(scored):
        out[i] = (perplexity(*pairs[2 * j]), perplexity(*pairs[2 * j + 1]))
    return out


def score_batch(batch: pd.DataFrame, *, model: str, adapter: tuple[str, str] | None,
                instruction: str,
                max_new_tokens: int, max_seq_len: int, s3: S3Config | None = None,
                threads: int | None = None, dtype: str = "auto") -> pd.DataFrame:
    """A Ray Data batch function: the student answers each candidate's input, then both
    perplexities of its answer give the candidate's IFD; and the model loads
    (`resident.LOADED`). `adapter`: (peft name, URI), see `generation.resident`."""
    from rebase_ray.generation import generate
    from rebase_ray.generation.resident import LOADED, loaded_marks, resident_lm, using
    from rebase_ray.models import set_torch_threads

    set_torch_threads(1, threads)
    lm, loaded = resident_lm(model, dtype, {adapter[0]: adapter[1]} if adapter else None, s3)
    prompts = [lm.render(student_messages(instruction, x)) for x in batch["input"]]
    with using(lm, adapter[0] if adapter else None):
        answers = [g[0].text for g in generate(lm, prompts, max_new_tokens=max_new_tokens)]
        ppls = perplexities(lm, prompts, answers, max_seq_len)
    batch = batch.copy()
    batch["student_output"] = answers
    batch["ppl_conditional"] = [c for c, _ in ppls]
    batch["ppl_alone"] = [a for _, a in ppls]
    batch["ifd"] = [c / a if a and not math.isnan(a) else float("nan") for c, a in ppls]
    batch[LOADED] = loaded_marks(len(batch), loaded)
    return batch


def score_ifd(candidates: pd.DataFrame, model: str, adapter: str | None, instruction: str,
              batch_size: int = 8, max_new_tokens: int = 64, max_seq_len: int = 512,
              resources: Resources | None = None, s3: S3Config | None = None,
              dtype: str = "auto") -> tuple[pd.DataFrame, dict]:
    """`candidates` (with an `input` column) plus the columns of IFD_COLUMNS, in input order,
    and the scorers' resources (`resources` resolved from those free now, at most one
    worker per batch, with `model_loads` as in `evaluate.infer.predict`; {} when there is
    nothing to score)."""
    import ray

    from rebase_ray.generation.resident import LOADED, fingerprint, map_resident

    if candidates.empty:
        return candidates.assign(**{c: pd.Series(dtype=object if c == "student_output"
                                                 else float) for c in IFD_COLUMNS}), {}
    import numpy as np

    pool = resolve_resources(resources or Resources(), most=math.ceil(len(candidates) / batch_size))
    frame = candidates.reset_index(drop=True).assign(_order=range(len(candidates)))
    # blocks made here, not by a repartition task: that task would need a free CPU, which the
    # teacher replica and the scorer actors may hold between them
    blocks = max(1, min(len(frame) // batch_size, pool.actors * 4))
    ds = ray.data.from_pandas([frame.iloc[idx] for idx in np.array_split(range(len(frame)),
                                                                         blocks)])
    scored = map_resident(  # as in `evaluate.infer.predict`
        ds, score_batch,
        {"model": model, "instruction": instruction,
         "adapter": (fingerprint(adapter, s3), adapter) if adapter else None,
         "max_new_tokens": max_new_tokens, "max_seq_len": max_seq_len, "s3": s3,
         "threads": pool.threads, "dtype": dtype},
        pool, batch_size=batch_size, batch_format="pandas")
    out = scored.to_pandas().sort_values("_order")
    loads = int(out[LOADED].sum())
    out = out.drop(columns=["_order", LOADED]).reset_index(drop=True)
    return out, {**pool.summary(), "model_loads": loads}
