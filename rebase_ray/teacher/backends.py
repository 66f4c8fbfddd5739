"""The teacher backend interface and the transformers backend.

A backend turns a batch of chat conversations plus one set of sampling parameters into
completions with token counts: `generate(conversations, params, max_tokens=, formats=,
cancelled=) -> list[list[Completion]]`, `params.n` completions per conversation; each
conversation may have its own max_tokens, its own structured output (`OutputFormat`, None:
free text) and a `cancelled()` callable that stops its generation early. Backends:
- `TransformersBackend` (this module): `rebase_ray.generation` (one batched `generate` call,
  grammar-constrained rows next to free ones), CPU or CUDA, optionally with a peft LoRA adapter
  on top of the base model (the student is served this way);
- `OpenAIBackend` (`openai_backend.py`): any OpenAI-compatible server;
- vLLM is not a backend object: on GPUs the whole endpoint is Ray Serve LLM's OpenAI app
  (`vllm_backend.py`), so vLLM's own continuous batching serves the requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rebase_ray.config import TeacherConfig
from rebase_ray.generation import LM, Constraint, generate

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling fields. temperature 0 means greedy decoding; `seed` seeds torch's RNG
    before the batch's generate call (so a batch is reproducible, not each row on its own)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class OutputFormat:
    """A request's structured output. `fields`: the request fields as the client sent them
    (`response_format`, vLLM's `structured_outputs`), which a remote backend forwards unchanged;
    `constraint`: what they mean to the grammar engine (None: free text)."""

    fields: dict[str, Any]
    constraint: Constraint | None


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    # "stop" (end of sequence or a stop string), "length" (cut by max_tokens) or "abort"
    # (its cancelled() became true)
    finish_reason: str


class Backend(Protocol):
    def prepare(self, fmt: OutputFormat) -> None:
        """Get `fmt` ready before its request is queued; raises UnsupportedSchema (naming the
        feature) when this backend cannot enforce it."""

    def generate(self, conversations: list[Messages], params: SamplingParams, *,
                 max_tokens: Sequence[int] | None = None,
                 formats: Sequence[OutputFormat | None] | None = None,
                 cancelled: Sequence[Callable[[], bool] | None] | None = None,
                 ) -> list[list[Completion]]: ...


class TransformersBackend:
    """A causal LM from transformers (plus an optional LoRA adapter) run by
    `rebase_ray.generation`: one batched, left-padded `generate` call per batch."""

    def __init__(self, model: str, adapter: str | None = None, dtype: str = "auto",
                 device: str | None = None):
        self.lm = LM.load(model, adapter=adapter, device=device, dtype=dtype)

    def prepare(self, fmt: OutputFormat) -> None:
        """Compile the format's grammar (once per schema: the grammars are cached)."""
        if fmt.constraint is not None:
            self.lm.grammars.compile(fmt.constraint)

    def generate(self, conversations: list[Messages], params: SamplingParams, *,
                 max_tokens: Sequence[int] | None = None,
                 formats: Sequence[OutputFormat | None] | None = None,
                 cancelled: Sequence[Callable[[], bool] | None] | None = None,
                 ) -> list[list[Completion]]:
        """`max_tokens`, `formats`, `cancelled`: one per conversation (default: params.max_tokens
        for all, free text, never cancelled)."""
        out = generate(
            self.lm, [self.lm.render(c) for c in conversations],
            max_new_tokens=params.max_tokens if max_tokens is None else max_tokens,
            temperature=params.temperature, top_p=params.top_p, n=params.n, seed=params.seed,
            stop=params.stop,
            constraints=None if formats is None else [None if f is None else f.constraint
                                                    for f in formats],
            cancelled=cancelled)
        return [[Completion(text=g.text, prompt_tokens=g.prompt_tokens,
                            completion_tokens=g.completion_tokens,
                            finish_reason=g.finish_reason) for g in choices]
                for choices in out]


def make_backend(cfg: TeacherConfig) -> Backend:
    """The backend object for `cfg.backend` (the vLLM endpoint is built by vllm_backend)."""
    if cfg.backend == "transformers":
        from rebase_ray.models import set_torch_threads

        set_torch_threads(cfg.serve.num_cpus, cfg.torch_threads)
        device = "cuda" if cfg.serve.num_gpus > 0 else None
        return TransformersBackend(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, device=device)
    if cfg.backend == "openai":
        from rebase_ray.teacher.openai_backend import OpenAIBackend

        return OpenAIBackend.from_config(cfg)
    raise ValueError("teacher.backend: vllm is served by Ray Serve LLM as a whole app "
                     "(rebase_ray.teacher.vllm_backend.build_vllm_app), not as a backend object")
