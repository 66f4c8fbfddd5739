"""A causal LM and its tokenizer, with the KV-cache keyword of its transformers version."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from rebase_ray.generation.grammar import Grammars


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "abort"


def cache_arg(model) -> str:
    """The forward keyword that takes a KV cache: `cache` since transformers 5.x renamed it
    (`past_key_values` is deprecated there), `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def cache_of(output) -> Any:
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
        self.cache_arg = cache_arg(model)
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()

    @classmethod
    def load(cls, ref: str, adapter: str | None = None, s3=None, device: str | None = None,
             dtype: str = "auto") -> LM:
        """The model, with one LoRA `adapter` on top. Evaluation and IFD
        keep theirs in the worker process instead (`generation.resident`)."""
        from rebase_ray.models import load_adapter, load_causal_lm

        model, tok = load_causal_lm(ref, device=device, dtype=dtype)
        if adapter:
            model = load_adapter(model, adapter, s3)
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
