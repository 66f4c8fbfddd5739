"""HTTP plumbing shared by our Ray Serve apps (teacher, retriever, student): API-key auth,
a request size limit, JSON bodies validated by pydantic, OpenAI-style JSON errors, starting
Serve's HTTP proxy, deploying an app on it and its Serve config file.

Errors use OpenAI's shape, `{"error": {"message", "type", "code"}}`, so OpenAI clients show
the message. Codes: 401 missing or wrong key, 400 malformed request, 413 body over the limit,
404 unknown route or model, 504 request timeout, 500 anything else.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from rebase_ray.config import ServeConfig, TeacherConfig

API_KEY_ENV = "REBASE_RAY_API_KEY"
M = TypeVar("M", bound=BaseModel)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "request_too_large", 504: "timeout"}


def resolve_api_key(configured: str | None) -> str | None:
    """The key from config, else from $REBASE_RAY_API_KEY; None means no auth."""
    return configured or os.environ.get(API_KEY_ENV) or None


def teacher_client_key(cfg: TeacherConfig, local: bool) -> str | None:
    """The key every teacher client sends: to a teacher this run serves itself (`local`) the
    key that server checks (`teacher.serve.api_key`, else $REBASE_RAY_API_KEY); to an endpoint
    elsewhere `teacher.api_key`, else $REBASE_RAY_API_KEY."""
    return resolve_api_key(cfg.serve.api_key if local else cfg.api_key)


SECRET_NAMES = {"api_key", "key", "secret", "password", "token"}


def without_secrets(value: Any) -> Any:
    """`value` (nested dicts and lists) with every value whose key names a secret (api_key,
    key, secret, password, token, or ending in _<one of them>) set to None: a printed serve
    config is pasted into manifests, so keys come from $REBASE_RAY_API_KEY on the cluster."""
    if isinstance(value, dict):
        return {k: None if _is_secret(str(k)) else without_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_secrets(v) for v in value]
    return value


def _is_secret(name: str) -> bool:
    name = name.lower()
    return name in SECRET_NAMES or any(name.endswith("_" + n) for n in SECRET_NAMES)


def error_response(status: int, message: str) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)


def install_error_handlers(api: FastAPI) -> FastAPI:
    """Every error the app raises becomes an OpenAI-style JSON error."""

    @api.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _describe(exc.errors()))

    return api


def _describe(errors: list[dict]) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                     for e in errors)


class Guard:
    """Auth and body checks, called explicitly at the top of each handler."""

    def __init__(self, api_key: str | None, max_request_bytes: int):
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # bytes: compare_digest refuses a str with non-ASCII characters (TypeError, a 500)
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()):
            raise HTTPException(401, "missing or invalid API key (send 'Authorization: Bearer "
                                     "KEY')")

    async def read_json(self, request: Request, model: type[M]) -> M:
        """The body as `model`: 413 over the size limit, 400 if not JSON or invalid."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_request_bytes:
            raise HTTPException(413, f"request body over {self.max_request_bytes} bytes")
        body = await request.body()
        if len(body) > self.max_request_bytes:
            raise HTTPException(413, f"request body over {self.max_request_bytes} bytes")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise HTTPException(400, "the body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise HTTPException(400, _describe(exc.errors())) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_proxy(host: str, port: int | None) -> tuple[str, int]:
    """Start Serve's HTTP proxy on host:port (0 or None: a free port) unless Serve is already
    running; returns the address the proxy really listens on (an existing proxy keeps its
    own)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    if _get_global_client(raise_if_no_controller_running=False) is None:
        serve.start(http_options={"host": host, "port": port or free_port(host)})
    http = _get_global_client().http_config
    return http.host, http.port


@contextmanager
def deployed(app: Any, name: str, cfg: ServeConfig) -> Iterator[str]:
    """Deploy a Serve application on the running Ray (starting Serve's proxy on cfg.host and
    cfg.port, 0/None = a free port, unless Serve already runs) and yield its base URL; the app
    is deleted on exit. The one deploy of the teacher, retriever and student apps."""
    from ray import serve

    host, port = start_proxy(cfg.host, cfg.port)
    serve.run(app, name=name, route_prefix=cfg.route_prefix, blocking=False)
    try:
        yield base_url(host, port, cfg.route_prefix)
    finally:
        serve.delete(name)


def config_file(name: str, cfg: ServeConfig, application: dict[str, Any]) -> dict[str, Any]:
    """A Serve config file (`serve deploy`, a KubeRay RayService's `serveConfigV2`) with one
    application (`import_path` and `args`, secrets already left out)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port or 8000,
                         "request_timeout_s": cfg.request_timeout_s},
        "applications": [{"name": name, "route_prefix": cfg.route_prefix, **application}],
    }


def base_url(host: str, port: int, route_prefix: str) -> str:
    """The URL clients use for an app served at `route_prefix`."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def wait_for_interrupt() -> None:
    """Block until Ctrl+C (the `rebase-ray serve ...` commands serve until then)."""
    import time

    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
