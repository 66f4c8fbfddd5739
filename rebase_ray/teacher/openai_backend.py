"""The `openai` backend: any OpenAI-compatible server (vLLM's own server, Ray Serve LLM, a hosted
API) behind the backend interface, through `TeacherClient`. Structured outputs go to the server
unchanged (the request's `response_format` / `structured_outputs`): the server enforces them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rebase_ray.config import TeacherConfig
from rebase_ray.teacher.client import TeacherClient
from rebase_ray.teacher.types import Completion, Messages, OutputFormat, SamplingParams


class OpenAIBackend:
    def __init__(self, client: TeacherClient):
        self.client = client

    @classmethod
    def from_config(cls, cfg: TeacherConfig) -> OpenAIBackend:
        if not cfg.url:
            raise ValueError("teacher.url: the openai backend needs the server's base URL "
                             "(e.g. http://host:8000/v1)")
        return cls(TeacherClient(cfg.url, api_key=cfg.api_key, model=cfg.served_model_name,
                                 concurrency=cfg.max_batch_size))

    def prepare(self, fmt: OutputFormat) -> None:
        """Nothing to prepare: the remote server compiles (or refuses) the format."""

    def generate(self, conversations: list[Messages], params: SamplingParams, *,
                 max_tokens: Sequence[int] | None = None,
                 formats: Sequence[OutputFormat | None] | None = None,
                 cancelled: Sequence[Callable[[], bool] | None] | None = None,
                 seeds: Sequence[int | None] | None = None,
                 ) -> list[list[Completion]]:
        """`n` requests per conversation (one completion each, the k-th with its seed + k), each
        with its conversation's max_tokens, format fields and seed (default params.seed);
        raises the first error.
        `cancelled` is not polled: a sent request runs until the server answers (under the
        client's timeout)."""
        limits = list(max_tokens) if max_tokens is not None else (
            [params.max_tokens] * len(conversations))
        fields = [{} if f is None else f.fields
                  for f in (formats if formats is not None else [None] * len(conversations))]
        own = list(seeds) if seeds is not None else [params.seed] * len(conversations)
        rounds = []
        for k in range(params.n):
            per_request = [{"max_tokens": m, "seed": None if s is None else s + k, **f}
                           for m, s, f in zip(limits, own, fields)]
            results = self.client.chat_many(
                conversations, per_request=per_request, temperature=params.temperature,
                top_p=params.top_p, stop=list(params.stop) or None)
            for r in results:
                if isinstance(r, Exception):
                    raise r
            rounds.append(results)
        return [list(choices) for choices in zip(*rounds)]
