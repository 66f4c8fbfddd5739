"""Batched log-likelihood (lm-evaluation-harness's `loglikelihood`), and the choices after a
context scored with the context's KV cache shared."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rebase_ray.generation.lm import LM, cache_of


def loglikelihood(lm: LM, contexts: Sequence[str], continuations: Sequence[str],
                  batch_size: int = 16, max_seq_len: int = 1024) -> list[tuple[float, int]]:
    """[(log P(continuation | context), continuation tokens)] per pair, as lm-evaluation-harness
    computes it: spaces at the end of the context move to the continuation, the continuation's
    tokens are those of context + continuation after the context's, and contexts are cut from
    the left to fit `max_seq_len`. Pairs are scored longest first in right-padded batches."""
    import torch

    tok, model = lm.tokenizer, lm.model
    seqs: list[tuple[list[int], int]] = []  # (ids, number of continuation tokens at the end)
    for context, cont in zip(contexts, continuations):
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, cont = context[:-spaces], context[-spaces:] + cont
        ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
        whole = tok(context + cont, add_special_tokens=False)["input_ids"]
        n_cont = max(1, len(whole) - len(ctx_ids))
        seqs.append((whole[-max_seq_len:], min(n_cont, max_seq_len - 1)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        width = len(seqs[chunk[0]][0])
        ids = torch.full((len(chunk), width), lm.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            s = seqs[i][0]
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device),
                           attention_mask=mask.to(model.device)).logits.float().cpu()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        token_lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for row, i in enumerate(chunk):
            length, n_cont = len(seqs[i][0]), seqs[i][1]
            out[i] = (float(token_lp[row, length - 1 - n_cont: length - 1].sum()), n_cont)
    return out


def choice_loglikelihood(lm: LM, contexts: Sequence[str], choices: Sequence[str],
                         max_seq_len: int = 1024, batch_size: int = 16
                         ) -> list[list[tuple[float, int]]]:
    """[[(log P(choice | context), choice tokens) per choice] per context]: `loglikelihood`'s
    values, computed with one forward pass over `batch_size` left-padded contexts (positions
    counted from each one's first real token, as if unpadded) whose KV cache the choices then
    share. A context whose tokens are not a prefix of its choices' (a tokenizer merging across
    the boundary) is scored pair by pair with `loglikelihood`."""
    tok = lm.tokenizer
    out: list[list[tuple[float, int]] | None] = [None] * len(contexts)
    shared: list[tuple[int, list[int], list[list[int]]]] = []  # (index, context ids, choices)
    for i, context in enumerate(contexts):
        spaces = len(context) - len(context.rstrip(" "))
        ctx_ids = tok(context[:-spaces] if spaces else context,
                      add_special_tokens=False)["input_ids"]
        conts = []
        for choice in choices:
            whole = tok(context + choice, add_special_tokens=False)["input_ids"]
            conts.append(whole[len(ctx_ids):] if whole[: len(ctx_ids)] == ctx_ids else [])
        if all(conts):
            width = max(len(c) for c in conts)
            shared.append((i, ctx_ids[-max(1, max_seq_len - width):], conts))
        else:
            out[i] = loglikelihood(lm, [context] * len(choices), list(choices),
                                   batch_size=len(choices), max_seq_len=max_seq_len)
    shared.sort(key=lambda item: -len(item[1]))  # similar lengths share a batch: less padding
    for start in range(0, len(shared), batch_size):
        chunk = shared[start: start + batch_size]
        for (i, _, _), scores in zip(chunk, _shared_prefix_scores(lm, chunk)):
            out[i] = scores
    return out  # type: ignore[return-value]


def _shared_prefix_scores(lm: LM, chunk: list[tuple[int, list[int], list[list[int]]]]
                          ) -> list[list[tuple[float, int]]]:
    import torch

    model, k = lm.model, len(chunk[0][2])
    length = max(len(ctx) for _, ctx, _ in chunk)
    width = max(len(c) for _, _, conts in chunk for c in conts)
    ids = torch.full((len(chunk), length), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), length), dtype=torch.long)
    for row, (_, ctx, _) in enumerate(chunk):
        ids[row, length - len(ctx):] = torch.tensor(ctx)
        mask[row, length - len(ctx):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cont = torch.full((len(chunk) * k, width), lm.pad_id, dtype=torch.long)
    cont_mask = torch.zeros((len(chunk) * k, width), dtype=torch.long)
    for row, (_, _, conts) in enumerate(chunk):
        for j, c in enumerate(conts):
            cont[row * k + j, : len(c)] = torch.tensor(c)
            cont_mask[row * k + j, : len(c)] = 1
    lengths = mask.sum(-1).repeat_interleave(k)
    device = model.device
    with torch.inference_mode():
        first = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                      position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
        cache = cache_of(first)
        cache.batch_repeat_interleave(k)
        rest = model(input_ids=cont.to(device),
                     attention_mask=torch.cat([mask.repeat_interleave(k, 0), cont_mask],
                                              -1).to(device),
                     position_ids=(lengths.unsqueeze(1) + torch.arange(width)).to(device),
                     use_cache=True, **{lm.cache_arg: cache}).logits.float().cpu()
    # the first choice token is predicted by the context's last position, token j by j-1
    last = first.logits[:, -1:].float().cpu().repeat_interleave(k, 0)
    logits = torch.cat([last, rest[:, :-1]], dim=1)
    token_lp = torch.log_softmax(logits, dim=-1).gather(-1, cont.unsqueeze(-1)).squeeze(-1)
    return [[(float(token_lp[row * k + j, : len(c)].sum()), len(c))
             for j, c in enumerate(conts)] for row, (_, _, conts) in enumerate(chunk)]


def perplexity(logprob: float, tokens: int) -> float:
    """exp(−mean token log-probability); NaN for no tokens."""
    return math.exp(-logprob / tokens) if tokens else float("nan")
