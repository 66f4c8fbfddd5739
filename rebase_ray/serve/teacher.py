"""The teacher as a Ray Serve app with OpenAI's chat API.

Routes (under the app's route prefix): POST /v1/chat/completions, GET /v1/models, GET /healthz
(no auth), GET /metrics (this replica's counters: requests, batch sizes, tokens/s, queue time,
timeouts, disconnects, aborted and truncated replies; the same figures go to Ray Serve's
metrics, summed across replicas by Prometheus: `serve/stats.py`). Request bodies are the typed
models of `serve/chat_types.py`, responses the `openai` package's types; auth, the body size
limit and the JSON errors come from `serve/http.py`.

The transformers backend answers through `@serve.batch`: concurrent requests are merged into
one `generate` call (max batch size and wait from `TeacherConfig`); requests in one batch that
ask for different sampling parameters (temperature, top_p, n, stop) run as one `generate` call
per parameter set, each row with its own max_tokens, structured output and seed (a seeded
request's sample does not depend on the requests batched with it).

Structured outputs: OpenAI's `response_format` (text, json_object, json_schema) or vLLM's
`structured_outputs` ({"choice": [...]} or {"json": schema}) become a grammar
(`rebase_ray.generation.Constraint`, compiled once per schema before the request is queued);
a schema feature the grammar engine cannot enforce is a 400 naming it. max_tokens above
`teacher.max_tokens_limit` is a 400. A request still unanswered after
`serve.request_timeout_s` gets a 504, and a request whose client went away (Serve cancels its
handler) is dropped; either way its row stops generating (its cancel flag is polled after
every token) while the rest of its batch goes on.

The `vllm` backend is Ray Serve LLM's own OpenAI app (see `serve/vllm_app.py`), which has
its own continuous batching, structured outputs and metrics but not our auth, size limit and
/metrics.

- `build_teacher_app(cfg)` → a Serve application (route prefix chosen at deploy time);
- `local_teacher(cfg)` → deploys it on the running Ray, yields the OpenAI base URL;
- `serve_config(cfg)` → the Serve config file for `serve deploy` / a KubeRay RayService.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations, and
# under Serve's ingress it cannot resolve them from strings.
import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends
from openai.types import Model
from openai.types.chat import ChatCompletion
from ray import serve
from starlette.exceptions import HTTPException

from rebase_ray.config import TeacherConfig
from rebase_ray.generation import UnsupportedSchema
from rebase_ray.serve.chat_types import ChatRequest, ModelList, chat_completion
from rebase_ray.serve.http import (
    Access,
    config_file,
    deployed,
    openai_style_api,
    require_api_key,
    resolve_api_key,
    teacher_client_key,
    wait_for_interrupt,
    without_secrets,
)
from rebase_ray.serve.stats import TeacherStats
from rebase_ray.serve.vllm_app import IMPORT_PATH as VLLM_IMPORT_PATH
from rebase_ray.serve.vllm_app import build_vllm_app, openai_app_args, served_name
from rebase_ray.teacher.backends import make_backend
from rebase_ray.teacher.types import Completion, Messages, OutputFormat, SamplingParams

APP_NAME = "teacher"
DEFAULT_MAX_TOKENS = 256


@dataclass
class Row:
    """One request waiting for its batch: `cancelled()` turns true when it timed out or its
    client went away, and stops its generation."""

    messages: Messages
    params: SamplingParams
    format: OutputFormat | None
    cancelled: Callable[[], bool]
    arrived: float

    def group(self) -> tuple:
        """The sampling parameters one generate call shares (max_tokens and seed are per
        row)."""
        p = self.params
        return p.temperature, p.top_p, p.n, p.stop


# The class below is pickled when it is decorated: what its methods use is defined above.
api = openai_style_api("rebase-ray teacher")
KEYED = [Depends(require_api_key)]


@serve.deployment
@serve.ingress(api)
class TeacherServer:
    def __init__(self, cfg: dict[str, Any], api_key: str | None):
        config = TeacherConfig.model_validate(cfg)
        self.model_name = served_name(config)
        self.backend = make_backend(config)
        self.access = Access(api_key, config.serve.max_request_bytes)
        self.timeout_s = config.serve.request_timeout_s
        self.max_tokens_limit = config.max_tokens_limit
        self.generate_batch.set_max_batch_size(config.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.stats = TeacherStats(serve.get_replica_context().replica_id.to_full_id_str())

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.model_name}

    @api.get("/metrics", dependencies=KEYED)
    async def metrics(self) -> dict[str, Any]:
        return self.stats.to_dict()

    @api.get("/v1/models", dependencies=KEYED)
    async def models(self) -> ModelList:
        return ModelList(data=[Model(id=self.model_name, object="model",
                                     created=int(self.stats.started), owned_by="rebase-ray")])

    @api.post("/v1/chat/completions", dependencies=KEYED)
    async def chat_completions(self, req: ChatRequest) -> ChatCompletion:
        if req.stream:
            raise HTTPException(400, "stream=true is not supported by this server")
        if req.model not in (None, self.model_name):
            raise HTTPException(404, f"the model {req.model!r} does not exist; this server "
                                     f"serves {self.model_name!r}")
        limit = self.max_tokens_limit
        if req.requested_max_tokens is not None and req.requested_max_tokens > limit:
            raise HTTPException(400, f"max_tokens / max_completion_tokens "
                                     f"{req.requested_max_tokens} is over this server's limit "
                                     f"of {limit} (teacher.max_tokens_limit)")
        try:
            fmt = req.output_format()
            if fmt is not None:  # compiled here, so a schema the engine refuses is a 400
                await asyncio.to_thread(self.backend.prepare, fmt)
        except UnsupportedSchema as exc:
            raise HTTPException(400, f"unsupported structured output: {exc}") from None
        self.stats.count("requests")
        if fmt is not None and fmt.constraint is not None:
            self.stats.count("structured")
        cancel = threading.Event()
        row = Row([m.plain() for m in req.messages], req.sampling(min(DEFAULT_MAX_TOKENS, limit)),
                  fmt, cancel.is_set, time.monotonic())
        try:
            choices = await asyncio.wait_for(self.generate_batch(row), self.timeout_s)
        except asyncio.TimeoutError:
            cancel.set()
            self.stats.count("timeouts")
            raise HTTPException(504, f"no answer within {self.timeout_s} s") from None
        except asyncio.CancelledError:  # the client went away and Serve cancelled this handler
            cancel.set()
            self.stats.count("disconnects")
            raise
        except Exception as exc:
            self.stats.count("errors")
            raise HTTPException(500, f"generation failed: {exc}") from exc
        return chat_completion(self.model_name, choices)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)
    async def generate_batch(self, rows: list[Row]) -> list[list[Completion]]:
        start = time.monotonic()
        for row in rows:
            self.stats.record_queue(start - row.arrived)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.group(), []).append(i)
        results: list[list[Completion]] = [[] for _ in rows]
        for indices in groups.values():
            group = [rows[i] for i in indices]
            t0 = time.monotonic()
            out = await asyncio.to_thread(
                self.backend.generate, [r.messages for r in group], group[0].params,
                max_tokens=[r.params.max_tokens for r in group],
                formats=[r.format for r in group], cancelled=[r.cancelled for r in group],
                seeds=[r.params.seed for r in group])
            self.stats.record_batch(len(indices), time.monotonic() - t0, out)
            for i, choices in zip(indices, out):
                results[i] = choices
        return results


def deployment_options(cfg: TeacherConfig) -> dict[str, Any]:
    """Serve's options for the teacher's replicas (`teacher.serve`: replicas, CPUs, GPUs)."""
    s = cfg.serve
    return {
        "autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                               "target_ongoing_requests": s.target_ongoing_requests},
        # room for a full batch to queue while the previous one generates
        "max_ongoing_requests": max(2 * cfg.max_batch_size, math.ceil(s.target_ongoing_requests)),
        "ray_actor_options": {"num_cpus": s.cpus, "num_gpus": s.gpus},
    }


def build_teacher_app(cfg: TeacherConfig):
    """The teacher as a Serve application. The API key is resolved here (config, else
    $REBASE_RAY_API_KEY in the process that builds the app)."""
    if cfg.backend == "vllm":
        return build_vllm_app(cfg)
    return TeacherServer.options(**deployment_options(cfg)).bind(
        cfg.model_dump(mode="json"), resolve_api_key(cfg.serve.api_key))


def app_builder(args: dict[str, Any]):
    """Serve's application builder (`import_path` of the config file): args = TeacherConfig."""
    return build_teacher_app(TeacherConfig.model_validate(args))


def serve_config(cfg: TeacherConfig, name: str = APP_NAME) -> dict[str, Any]:
    """A Serve config file (`serve deploy`, KubeRay RayService `serveConfigV2`) for `cfg`.
    Every secret is left out (`http.without_secrets`): set REBASE_RAY_API_KEY on the cluster."""
    if cfg.backend == "vllm":
        application = {"import_path": VLLM_IMPORT_PATH,
                       "args": without_secrets(openai_app_args(cfg))}
    else:
        application = {"import_path": f"{__name__}:app_builder",
                       "args": without_secrets(cfg.model_dump(mode="json"))}
    return config_file(name, cfg.serve, application)


@contextmanager
def local_teacher(cfg: TeacherConfig, name: str = APP_NAME) -> Iterator[str]:
    """Deploy the teacher on the running Ray (starting Serve's proxy on cfg.serve.host and
    cfg.serve.port, 0/None = a free port, unless Serve already runs) and yield its OpenAI base
    URL, e.g. http://127.0.0.1:8000/v1. The app is deleted on exit."""
    with deployed(build_teacher_app(cfg), name, cfg.serve) as url:
        yield url + "/v1"


def serve_teacher(cfg: TeacherConfig, on_ready: Callable[[str], Any]) -> dict[str, Any]:
    """Serve until Ctrl+C; returns a summary with the server's metrics."""
    from rebase_ray.teacher.client import TeacherClient

    started = time.time()
    with local_teacher(cfg) as url:
        on_ready(url)
        wait_for_interrupt()
        metrics = TeacherClient(url, api_key=teacher_client_key(cfg, local=True)).server_metrics()
    return {"url": url, "backend": cfg.backend, "model": served_name(cfg),
            "served_s": round(time.time() - started, 1), "metrics": metrics}
