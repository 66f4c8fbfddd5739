"""Batched generation (optionally grammar-constrained) and batched log-likelihood: the one place
the teacher backend, evaluation and IFD run a causal LM.

- `generate(lm, prompts, ...)`: rendered prompts → completions, decoded together. The prefix
  that a batch's prompts share is run once and its KV cache repeated for every row, and a row
  leaves the batch as soon as it ends. Per row: its own `max_new_tokens`, its own compiled
  grammar or none (a batch may mix schemas and free rows), and an optional `cancelled()`
  callable that stops that row early (a request that timed out or whose client went away).
  finish_reason is "stop" (end of sequence or a stop string), "length" (cut by its
  max_new_tokens) or "abort" (cancelled).
- `loglikelihood(lm, contexts, continuations)`: log P(continuation | context) summed over the
  continuation's tokens, batched with right padding — lm-evaluation-harness's `loglikelihood`
  (the continuation's tokens are those of context + continuation after the context's).
- `choice_loglikelihood(lm, contexts, choices)`: the same for every choice after each context,
  the contexts run once, in batches, and each one's KV cache shared by its choices (a label
  set ranked after a long prompt costs about one prompt, not one per label).
- `Grammars`: xgrammar compilation per tokenizer, each schema compiled once (cached), with a
  check that names any JSON-schema feature xgrammar would silently ignore.

xgrammar masks logits on CPU through `GrammarMask`, built on xgrammar's matcher and bitmask
primitives: unlike `xgrammar.contrib.hf.LogitsProcessor`, it leaves rows without a grammar
unmasked, so one batch serves constrained and free requests, and it follows the rows that are
still in the batch.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# JSON-schema keywords that the grammar enforces (or that only annotate). Anything else would
# be ignored by xgrammar without a word, so it is refused with its name.
SUPPORTED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "enum",
    "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "minLength",
    "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minItems", "maxItems", "minProperties", "maxProperties",
    # annotations
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly",
})
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # {name: schema}
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")  # [schema]
_SCHEMA_VALUES = ("items", "additionalProperties")  # schema (or bool)


class UnsupportedSchema(ValueError):
    """A response format the grammar engine cannot enforce; the message names the feature."""


def check_schema(schema: Any, path: str = "$") -> None:
    """Raise UnsupportedSchema naming the first keyword the engine would not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"{path}: a JSON schema must be an object, got "
                                f"{type(schema).__name__}")
    for key, value in schema.items():
        if key not in SUPPORTED_KEYWORDS:
            raise UnsupportedSchema(f"the JSON-schema keyword {key!r} (at {path}) is not "
                                    "supported by the grammar engine")
        if key == "pattern" and "(?" in str(value):
            raise UnsupportedSchema(f"the pattern at {path} uses a group construct '(?...)' "
                                    "(lookaround, named or flagged groups), which the grammar "
                                    "engine does not support")
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                check_schema(sub, f"{path}.{key}.{name}")
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                check_schema(sub, f"{path}.{key}[{i}]")
        elif key in _SCHEMA_VALUES:
            check_schema(value, f"{path}.{key}")


@dataclass(frozen=True)
class Constraint:
    """What one row's output must be: a JSON schema, any JSON object, or one of `choices`."""

    kind: str  # "json_schema" | "json_object" | "choice"
    spec: str = ""  # the schema or the choices as JSON

    @classmethod
    def json_schema(cls, schema: dict) -> Constraint:
        check_schema(schema)
        # keys keep their order: the grammar writes properties in the schema's order
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object")

    @classmethod
    def choice(cls, choices: Sequence[str]) -> Constraint:
        choices = [str(c) for c in choices]
        if not choices or any(not c for c in choices):
            raise UnsupportedSchema("a choice list needs at least one non-empty string")
        return cls("choice", json.dumps(choices))


class Grammars:
    """Compiles constraints for one tokenizer with xgrammar; each constraint once."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]):
        try:
            import xgrammar as xgr
        except ImportError as exc:  # pragma: no cover - the Makefile installs it
            raise ImportError("structured outputs need xgrammar: pip install --no-deps "
                              "'xgrammar>=0.2.8,<0.3' 'apache-tvm-ffi>=0.1.11'") from exc
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info)
        # Tokens holding a control byte (U+0000..U+001F). Constrained output never needs one
        # (JSON is compiled without free whitespace; choices are plain strings), but xgrammar
        # 0.2.9 lets them into strings with minLength/maxLength, which breaks strict JSON
        # parsers: they are masked for every constrained row.
        stops = set(stop_token_ids)
        self.control_tokens = [i for i, b in enumerate(info.decoded_vocab)
                               if i not in stops and any(c < 0x20 for c in b)]
        self._cache: dict[Constraint, Any] = {}
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint):
        with self._lock:
            grammar = self._cache.get(constraint)
            if grammar is None:
                grammar = self._compile(constraint)
                self._cache[constraint] = grammar
            return grammar

    def _compile(self, c: Constraint):
        if c.kind == "json_object":  # OpenAI's json_object: any JSON object (not an array)
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if c.kind == "choice":
            options = " | ".join(json.dumps(s) for s in json.loads(c.spec))
            return self.compiler.compile_grammar(f"root ::= {options}")
        try:
            return self.compiler.compile_json_schema(c.spec, any_whitespace=False)
        except Exception as exc:  # xgrammar raises RuntimeError / InvalidJSONError subclasses
            raise UnsupportedSchema(f"the grammar engine cannot compile this schema: {exc}"
                                    ) from exc

    @property
    def cached(self) -> int:
        return len(self._cache)


def _grammar_mask_class():
    """GrammarMask, built on xgrammar, imported on first use."""
    import torch
    import xgrammar as xgr

    class GrammarMask:
        """Per-row xgrammar matchers over the original rows; rows whose grammar is None are
        not masked. `mask(active, scores)` masks the scores of the rows now in the batch (row
        `active[b]` in batch position b); `accept(row, token)` advances a row's matcher."""

        def __init__(self, grammars: list[Any], vocab_size: int, banned: list[int]):
            self.matchers = [None if g is None else xgr.GrammarMatcher(g) for g in grammars]
            self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
            self.banned = torch.tensor(banned, dtype=torch.long)

        def accept(self, row: int, token: int) -> None:
            m = self.matchers[row]
            if m is not None and not m.is_terminated():
                m.accept_token(token)

        def mask(self, active: list[int], scores):
            batch = [b for b, r in enumerate(active)
                     if self.matchers[r] is not None and not self.matchers[r].is_terminated()]
            if not batch:
                return scores
            for b in batch:
                self.matchers[active[b]].fill_next_token_bitmask(self.bitmask, b)
            xgr.apply_token_bitmask_inplace(scores, self.bitmask[: len(active)].to(scores.device),
                                            indices=batch)
            rows = torch.tensor(batch, device=scores.device)
            scores[rows.unsqueeze(1), self.banned.to(scores.device)] = float("-inf")
            return scores

    return GrammarMask


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


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "abort"


def _cache_arg(model) -> str:
    """The forward keyword that takes a KV cache: `cache` since transformers 5.x renamed it
    (`past_key_values` is deprecated there), `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(output) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class LM:
    """A causal LM and its tokenizer, ready for batched generation and scoring."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.pad_id = tokenizer.pad_token_id
        self.cache_arg = _cache_arg(model)
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()

    @classmethod
    def load(cls, ref: str, adapter: str | None = None, s3=None, device: str | None = None,
             dtype: str = "auto", merge: bool = False,
             adapters: dict[str, str] | None = None) -> LM:
        """The model, with one LoRA `adapter` (optionally merged) or several named `adapters`
        (switched with `model.set_adapter(name)`)."""
        from rebase_ray.models import load_adapter, load_adapters, load_causal_lm

        model, tok = load_causal_lm(ref, device=device, dtype=dtype)
        if adapter:
            model = load_adapter(model, adapter, s3, merge=merge)
        elif adapters:
            model = load_adapters(model, adapters, s3)
        return cls(model, tok)

    @property
    def grammars(self) -> Grammars:
        """The grammar compiler for this tokenizer, made on first use (once, under a lock:
        a server compiles while another batch generates)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.model.config.vocab_size,
                                          sorted(self.eos_ids))
            return self._grammars

    def render(self, messages: list[dict[str, str]]) -> str:
        """A chat as the prompt text that generation continues (generation prompt added)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)


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
        grammar = _grammar_mask_class()(
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
            cache, scores = _cache_of(step), step.logits[:, -1].float()
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
    text = lm.tokenizer.decode(tokens, skip_special_tokens=True)
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
            cache = _cache_of(model(input_ids=ids[:1, :shared].to(model.device),
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
        cache = _cache_of(first)
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
