"""The `openai` backend: any OpenAI-compatible server (vLLM's own server, Ray Serve LLM, a hosted
API) behind the backend interface, through `TeacherClient`."""

from __future__ import annotations

from rebase_ray.config import TeacherConfig
from rebase_ray.teacher.backends import Completion, Messages, SamplingParams
from rebase_ray.teacher.client import TeacherClient


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

    def generate(self, conversations: list[Messages],
                 params: SamplingParams) -> list[list[Completion]]:
        """`n` requests per conversation (one completion each, the k-th with seed + k);
        raises the first error."""
        rounds = []
        for k in range(params.n):
            results = self.client.chat_many(
                conversations, temperature=params.temperature, top_p=params.top_p,
                max_tokens=params.max_tokens, stop=list(params.stop) or None,
                seed=None if params.seed is None else params.seed + k)
            for r in results:
                if isinstance(r, Exception):
                    raise r
            rounds.append(results)
        return [list(choices) for choices in zip(*rounds)]
