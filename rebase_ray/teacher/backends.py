"""The transformers backend, and `make_backend` (the backend object for a teacher config).

A backend (the `Backend` interface, in `types.py`) turns a batch of chat conversations plus
one set of sampling parameters into completions with token counts: `generate(conversations,
params, max_tokens=, formats=, cancelled=, seeds=) -> list[list[Completion]]`, `params.n`
completions per conversation; each conversation may have its own max_tokens, its own structured
output (`OutputFormat`, None: free text), a `cancelled()` callable that stops its generation
early, and its own seed (its sample then does not depend on the batch it runs in).
Backends:
- `TransformersBackend` (this module): `rebase_ray.generation` (one batched `generate` call,
  grammar-constrained rows next to free ones), CPU or CUDA, optionally with a peft LoRA adapter
  on top of the base model (the student is served this way);
- `OpenAIBackend` (`openai_backend.py`): any OpenAI-compatible server;
- vLLM is not a backend object: on GPUs the whole endpoint is Ray Serve LLM's OpenAI app
  (`rebase_ray/serve/vllm_app.py`), so vLLM's own continuous batching serves the requests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from rebase_ray.config import Resources, TeacherConfig
from rebase_ray.generation import LM, generate
from rebase_ray.teacher.types import Backend, Completion, Messages, OutputFormat, SamplingParams

log = logging.getLogger(__name__)


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
                 seeds: Sequence[int | None] | None = None,
                 ) -> list[list[Completion]]:
        """`max_tokens`, `formats`, `cancelled`, `seeds`: one per conversation (default:
        params.max_tokens for all, free text, never cancelled, params.seed for all)."""
        out = generate(
            self.lm, [self.lm.render(c) for c in conversations],
            max_new_tokens=params.max_tokens if max_tokens is None else max_tokens,
            temperature=params.temperature, top_p=params.top_p, n=params.n,
            seeds=[params.seed] * len(conversations) if seeds is None else seeds, stop=params.stop,
            constraints=None if formats is None else [None if f is None else f.constraint
                                                    for f in formats],
            cancelled=cancelled)
        return [[Completion(text=g.text, prompt_tokens=g.prompt_tokens,
                            completion_tokens=g.completion_tokens,
                            finish_reason=g.finish_reason) for g in choices]
                for choices in out]


def replica_threads(cfg: TeacherConfig) -> int | None:
    """Torch threads of a teacher replica starting now, which holds its `serve.cpus`: its share
    of the CPUs that were free before it started (`runtime.resolve_resources`); None outside Ray."""
    import ray

    from rebase_ray.runtime import resolve_resources

    s = cfg.serve
    if not ray.is_initialized():
        return None
    threads = resolve_resources(Resources(actors=s.max_replicas, cpus=s.cpus), held=s.cpus).threads
    log.info("teacher replica: %s CPUs, %d torch threads", s.cpus, threads)
    return threads


def make_backend(cfg: TeacherConfig) -> Backend:
    """The backend object for `cfg.backend` (the vLLM endpoint is built by serve/vllm_app)."""
    if cfg.backend == "transformers":
        from rebase_ray.models import set_torch_threads

        set_torch_threads(cfg.serve.cpus, cfg.serve.threads or replica_threads(cfg))
        device = "cuda" if cfg.serve.gpus > 0 else None
        return TransformersBackend(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, device=device)
    if cfg.backend == "openai":
        from rebase_ray.teacher.openai_backend import OpenAIBackend

        return OpenAIBackend.from_config(cfg)
    raise ValueError("teacher.backend: vllm is served by Ray Serve LLM as a whole app "
                     "(rebase_ray.serve.vllm_app.build_vllm_app), not as a backend object")
