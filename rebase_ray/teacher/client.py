"""The client every stage uses to talk to a teacher: any OpenAI-compatible endpoint (our Ray
Serve app, Ray Serve LLM / vLLM, or a remote API).

Built on the official `openai` AsyncOpenAI client, which already retries with exponential
backoff on connection errors, timeouts, 408/409/429 and 5xx (`max_retries`) and applies a
per-request timeout (`timeout_s`, per attempt). On top of it: bounded concurrency, token
accounting, and a hard budget on requests: once `max_requests` requests have been sent, the
next ones are not sent and come back as `BudgetExceeded` in the result list. Retries of a sent
request do not count against the budget (`max_retries` bounds them); `http_attempts` counts
every HTTP request that went out, retries included.

Structured outputs: `response_format` (OpenAI's field) goes out as is; `structured_outputs`
(vLLM's field, e.g. {"choice": [...]}) goes in the request body through the openai client's
`extra_body`, so one call works against our Serve teacher and vLLM alike. A reply cut by
max_tokens keeps the server's finish_reason "length" and counts as `truncated`.

Reproducible sampling: `request_seed(seed, *parts)` gives each request its own seed, derived
from the run's seed and what the request is about (a row key, a domain). A server that seeds
each request on its own (our Serve teacher, vLLM) then gives the same reply to the same request
whatever it was batched with.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from openai import AsyncOpenAI

from rebase_ray.teacher.types import Completion, Messages


def request_seed(seed: int, *parts: Any) -> int:
    """A request's own seed (31 bits), from the run's seed and the request's identity."""
    key = "\x1f".join(str(p) for p in (seed, *parts))
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) >> 1


class BudgetExceeded(RuntimeError):
    """The client's hard request budget (`max_requests`) is spent; the request was not sent."""


@dataclass
class ClientStats:
    requests: int = 0  # requests sent (each counts once, however many retries it took)
    http_attempts: int = 0  # HTTP requests that went out, retries included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0  # sent requests that ended in an error after all retries
    truncated: int = 0  # answers cut by max_tokens (finish_reason "length")
    refused: int = 0  # requests not sent because the budget was spent


class TeacherClient:
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 concurrency: int = 8, timeout_s: float = 120.0, max_retries: int = 3,
                 max_requests: int | None = None):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or "none"  # the openai client insists on a key; servers may not
        self.model = model
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_requests = max_requests
        self.stats = ClientStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def _for_this_loop(self) -> tuple[AsyncOpenAI, asyncio.Semaphore]:
        """The AsyncOpenAI client and semaphore bound to the running event loop (httpx
        connection pools and semaphores cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:

            async def count_attempt(_request: httpx.Request) -> None:
                self.stats.http_attempts += 1

            http = httpx.AsyncClient(event_hooks={"request": [count_attempt]})
            self._client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key,
                                       timeout=self.timeout_s, max_retries=self.max_retries,
                                       http_client=http)
            self._semaphore = asyncio.Semaphore(self.concurrency)
            self._loop = loop
        return self._client, self._semaphore

    async def _model(self, client: AsyncOpenAI) -> str:
        if self.model is None:
            models = await client.models.list()
            if not models.data:
                raise RuntimeError(f"{self.base_url} serves no model")
            self.model = models.data[0].id
        return self.model

    async def chat(self, messages: Messages, *, structured_outputs: dict[str, Any] | None = None,
                   **sampling: Any) -> Completion:
        """One chat completion. `sampling`: temperature, top_p, max_tokens, seed, stop,
        response_format, extra_body (passed to the openai client as they are);
        `structured_outputs`: vLLM's field, sent in the body. Raises BudgetExceeded when the
        budget is spent, or the openai error after the client's retries."""
        if sampling.get("n", 1) != 1:
            raise ValueError("TeacherClient.chat asks for one completion (n=1) per request")
        if structured_outputs is not None:
            sampling["extra_body"] = {**(sampling.get("extra_body") or {}),
                                      "structured_outputs": structured_outputs}
        client, semaphore = self._for_this_loop()
        async with semaphore:
            if self.max_requests is not None and self.stats.requests >= self.max_requests:
                self.stats.refused += 1
                raise BudgetExceeded(f"request budget of {self.max_requests} is spent")
            self.stats.requests += 1  # reserved before any await: the budget is exact
            try:
                model = await self._model(client)
                resp = await client.chat.completions.create(model=model, messages=messages,
                                                            **sampling)
            except Exception:
                self.stats.failures += 1
                raise
        choice = resp.choices[0]
        usage = resp.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        completion_tokens = usage.completion_tokens if usage else 0
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        finish_reason = choice.finish_reason or "stop"
        if finish_reason == "length":
            self.stats.truncated += 1
        return Completion(text=choice.message.content or "", prompt_tokens=prompt_tokens,
                          completion_tokens=completion_tokens, finish_reason=finish_reason)

    def chat_many(self, conversations: list[Messages],
                  progress: Callable[[int], Any] | None = None,
                  per_request: Sequence[dict[str, Any]] | None = None,
                  **sampling: Any) -> list[Completion | Exception]:
        """Answer many conversations with at most `concurrency` in flight; results keep the
        input order, and a failed or refused request is its exception. `progress` is called
        with 1 as each request finishes (e.g. a tqdm bar's `update`). `per_request`: one dict
        of `chat` arguments per conversation, over `sampling`."""
        own = per_request if per_request is not None else [{}] * len(conversations)
        if len(own) != len(conversations):
            raise ValueError("per_request needs one entry per conversation")
        return asyncio.run(self._chat_many(conversations, progress,
                                           [{**sampling, **o} for o in own]))

    async def _chat_many(self, conversations: list[Messages],
                         progress: Callable[[int], Any] | None,
                         requests: list[dict[str, Any]]) -> list[Completion | Exception]:
        async def one(messages: Messages, kwargs: dict[str, Any]) -> Completion | Exception:
            try:
                return await self.chat(messages, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
                return exc
            finally:
                if progress is not None:
                    progress(1)

        try:
            return list(await asyncio.gather(*(one(m, kw)
                                               for m, kw in zip(conversations, requests))))
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._client is not None:
            await self._client.close()
        self._loop = self._client = self._semaphore = None

    def summary(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "model": self.model, **asdict(self.stats),
                "max_requests": self.max_requests}

    def server_metrics(self) -> dict[str, Any] | None:
        """The server's GET /metrics (our Serve app's batching and throughput figures), or
        None when the server has no such endpoint (vLLM, remote APIs)."""
        root = self.base_url.removesuffix("/v1")
        try:
            resp = httpx.get(f"{root}/metrics", timeout=self.timeout_s,
                             headers={"Authorization": f"Bearer {self.api_key}"})
        except httpx.HTTPError:
            return None
        return resp.json() if resp.status_code == 200 else None
