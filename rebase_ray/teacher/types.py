"""The teacher's shared types: a conversation (`Messages`), its sampling parameters, its
structured output (`OutputFormat`), a completion, and the `Backend` interface that the
transformers backend (`backends.py`) and the openai backend (`openai_backend.py`) implement.
The client, the backends and the Serve app all import them from here, so none of them imports
another for its types."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rebase_ray.generation import Constraint

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling fields. temperature 0 means greedy decoding; `seed` seeds the request's
    own random stream: the same prompt and seed give the same sample, whatever else is batched
    with it (the k-th of n choices uses seed + k)."""

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
                 seeds: Sequence[int | None] | None = None,
                 ) -> list[list[Completion]]: ...
