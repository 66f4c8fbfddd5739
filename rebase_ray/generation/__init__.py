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

from rebase_ray.generation.decode import generate
from rebase_ray.generation.grammar import Constraint, Grammars, UnsupportedSchema, check_schema
from rebase_ray.generation.lm import LM, Generated
from rebase_ray.generation.loglik import choice_loglikelihood, loglikelihood, perplexity

__all__ = ["LM", "Constraint", "Generated", "Grammars", "UnsupportedSchema", "check_schema",
           "choice_loglikelihood", "generate", "loglikelihood", "perplexity"]
