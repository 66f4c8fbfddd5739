"""Batched generation: rendered prompts → completions, decoded together (see the package
docstring); sampling with one seeded random stream per row."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rebase_ray.generation.grammar import Constraint, grammar_mask_class
from rebase_ray.generation.lm import LM, Generated, cache_of


def _seeded_sampler_class():
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    class SeededSampler:
        """Sampling with one random stream per row (the Gumbel-max trick): the warped logits
        plus Gumbel noise drawn from the row's own generator, so that the argmax of the result
        samples from softmax(logits / temperature) cut to top_p. A row's sample depends on its
        prompt and its seed only, not on the rows batched with it; a row without a seed draws
        its generator's seed from torch's global RNG."""

        def __init__(self, temperature: float, top_p: float, seeds: list[int | None]):
            self.warpers = [TemperatureLogitsWarper(temperature)]
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))
            self.generators = [torch.Generator().manual_seed(
                int(torch.randint(2**62, ())) if s is None else s) for s in seeds]

        def __call__(self, active: list[int], scores):
            for warp in self.warpers:
                scores = warp(None, scores)
            uniform = torch.stack([torch.rand(scores.shape[1], generator=self.generators[r])
                                   for r in active]).to(scores.device)
            gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1 - 1e-7)))
            return scores + gumbel

    return SeededSampler


def generate(lm: LM, prompts: list[str], *, max_new_tokens: int | Sequence[int],
             temperature: float = 0.0, top_p: float = 1.0, n: int = 1,
             seeds: Sequence[int | None] | None = None, stop: Sequence[str] = (),
             constraints: Sequence[Constraint | None] | None = None,
             cancelled: Sequence[Callable[[], bool] | None] | None = None,
             ) -> list[list[Generated]]:
    """`n` completions per rendered prompt, decoded together (`_decode`).

    `max_new_tokens` is one limit or one per prompt; `seeds`, `constraints` and `cancelled` one
    per prompt: a prompt's k-th completion samples with seed + k (None: unseeded), whatever
    else is in the batch; a constraint None is free text; `cancelled` is polled after every
    token. Greedy decoding (temperature 0) decodes once and repeats the answer n times."""
    if not prompts:
        return []
    limits = ([int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int)
              else [int(m) for m in max_new_tokens])
    sample = temperature > 0
    per_prompt = n if sample else 1

    def rows(values: Sequence[Any] | None) -> list[Any]:
        """One value per decoded row: a prompt's completions are consecutive rows."""
        values = list(values) if values is not None else [None] * len(prompts)
        return [v for v in values for _ in range(per_prompt)]

    ids = lm.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    grammar = sampler = None
    if constraints is not None and any(c is not None for c in constraints):
        grammar = grammar_mask_class()(
            [None if c is None else lm.grammars.compile(c) for c in rows(constraints)],
            lm.model.config.vocab_size, lm.grammars.control_tokens)
    if sample:  # after the grammar mask: the noise never revives a masked token
        row_seeds = [None if s is None else s + k
                     for s in (seeds if seeds is not None else [None] * len(prompts))
                     for k in range(per_prompt)]
        sampler = _seeded_sampler_class()(temperature, top_p, row_seeds)
    row_cancel = rows(cancelled)
    new_tokens = _decode(lm, rows(ids), rows(limits), grammar, sampler, row_cancel, stop)
    results: list[list[Generated]] = []
    for i, prompt in enumerate(ids):
        comps = [_completion(lm, new_tokens[r], len(prompt), limits[i], stop, row_cancel[r])
                 for r in range(i * per_prompt, (i + 1) * per_prompt)]
        results.append(comps if sample else comps * n)
    return results


def _decode(lm: LM, rows: list[list[int]], limits: list[int], grammar: Any, sampler: Any,
            cancelled: list[Callable[[], bool] | None], stop: Sequence[str]) -> list[list[int]]:
    """The new tokens of each row: one forward pass per step over the rows still decoding.
    A row leaves the batch (and its part of the KV cache is dropped) as soon as it ends: an
    end-of-sequence token, its limit, a stop string, or `cancelled`. transformers' `generate`
    runs every row until the batch's last one ends; a batch of structured replies, whose
    lengths vary a lot, would then spend most of its steps on rows that are done."""
    import torch

    model, device = lm.model, lm.model.device
    ids, mask, shared, cache = _padded_with_prefix_cache(lm, rows)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids, step_pos = ids[:, shared:], positions[:, shared:]
    active = list(range(len(rows)))  # the row in each batch position
    out: list[list[int]] = [[] for _ in rows]
    with torch.inference_mode():
        while True:
            step = model(input_ids=step_ids.to(device), attention_mask=mask.to(device),
                         position_ids=step_pos.to(device), use_cache=True, logits_to_keep=1,
                         **{lm.cache_arg: cache})
            cache, scores = cache_of(step), step.logits[:, -1].float()
            if grammar is not None:
                scores = grammar.mask(active, scores)
            if sampler is not None:
                scores = sampler(active, scores)
            chosen = scores.argmax(-1).tolist()
            keep = []
            for b, (r, t) in enumerate(zip(active, chosen)):
                out[r].append(t)
                if grammar is not None:
                    grammar.accept(r, t)
                ended = (t in lm.eos_ids or len(out[r]) >= limits[r]
                         or bool(cancelled[r] and cancelled[r]())
                         or bool(stop and _has_stop(lm, out[r], stop)))
                if not ended:
                    keep.append(b)
            if not keep:
                return out
            if len(keep) < len(active):
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index.to(device))
                mask, step_pos = mask[index], step_pos[index]
                active = [active[b] for b in keep]
            step_ids = torch.tensor([[chosen[b]] for b in keep], dtype=torch.long)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype)], dim=1)


def _has_stop(lm: LM, tokens: list[int], stop: Sequence[str]) -> bool:
    """Whether the reply now holds a stop string. It is checked after every token, so a stop
    string can only be new at the end: the last tokens are decoded, enough for the longest
    (a character is at most 4 bytes, a token at least one), not the whole reply each time."""
    window = 4 * max(len(s) for s in stop) + 8
    text = lm.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
    return any(s in text for s in stop)


MIN_SHARED_PREFIX = 32  # tokens: below this, computing a prefix once saves little


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens every row shares."""
    first, n = rows[0], min(len(r) for r in rows)
    for r in rows[1:]:
        n = next((j for j in range(n) if r[j] != first[j]), n)
    return n


def _padded_with_prefix_cache(lm: LM, rows: list[list[int]]) -> tuple[Any, Any, int, Any]:
    """The batch's input ids and attention mask (on CPU), the length of the prefix all rows
    share, and that prefix's KV cache (None, and length 0, when shorter than
    MIN_SHARED_PREFIX tokens or for one row). Each row is laid out as
    [shared prefix][padding][its own suffix], the mask 0 on the padding: the model's positions,
    counted from the mask as `generate` does, are those of the unpadded row, and the prefix's
    keys and values, computed once for one row and repeated, are those of every row. Without a
    shared prefix this is left padding. The prompt part of a batch of ReBase requests is mostly
    the same instruction, examples and schema, so its prefill runs about once, not per row."""
    import torch

    model = lm.model
    shared = common_prefix_len(rows) if len(rows) > 1 else 0
    shared = min(shared, min(len(r) for r in rows) - 1)  # every row keeps a token to run
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :shared] = torch.tensor(r[:shared], dtype=torch.long)
        ids[i, width - len(r) + shared:] = torch.tensor(r[shared:], dtype=torch.long)
        mask[i, :shared] = 1
        mask[i, width - len(r) + shared:] = 1
    cache = None
    if shared:
        with torch.inference_mode():
            cache = cache_of(model(input_ids=ids[:1, :shared].to(model.device),
                                    use_cache=True, logits_to_keep=1))
        cache.batch_repeat_interleave(len(rows))
    return ids, mask, shared, cache


def _completion(lm: LM, tokens: list[int], prompt_tokens: int, limit: int, stop: Sequence[str],
                cancelled: Callable[[], bool] | None) -> Generated:
    aborted = cancelled is not None and cancelled()
    count, ended = min(len(tokens), limit), False
    for j, t in enumerate(tokens[:limit]):
        if t in lm.eos_ids or t == lm.pad_id:
            # the reply ends at an end-of-sequence or pad token, which is counted unless the
            # row was cancelled
            count, ended = (j, False) if aborted else (j + 1, t in lm.eos_ids)
            break
    text = lm.tokenizer.decode(tokens[:count], skip_special_tokens=True)
    hits = [text.find(s) for s in stop if s in text]
    if hits:
        text, ended = text[:min(hits)], True
    if aborted:
        reason = "abort"
    elif ended:
        reason = "stop"
    else:
        reason = "length" if count >= limit else "stop"
    return Generated(text=text, prompt_tokens=prompt_tokens, completion_tokens=count,
                     finish_reason=reason)
