"""HTTP plumbing shared by our Ray Serve apps (teacher, retriever, student): the FastAPI app
with OpenAI-style JSON errors and a request size limit, API-key auth as a dependency, starting
Serve's HTTP proxy, deploying an app on it and its Serve config file.

Errors use OpenAI's shape, `{"error": {"message", "type", "code"}}`, so OpenAI clients show
the message. Codes: 401 missing or wrong key, 400 malformed request (FastAPI validates the
typed bodies), 413 body over the limit, 404 unknown route or model, 504 request timeout, 500
anything else.

A deployment sets `self.access = Access(api_key, max_request_bytes)` in its constructor;
`require_api_key` and `BodyLimit` read it from the replica's deployment object (the route
handlers are declared on a module-level FastAPI app, before any config is known).
"""

from __future__ import annotations

import hmac
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rebase_ray.config import ConfigError, ServeConfig, TeacherConfig

API_KEY_ENV = "REBASE_RAY_API_KEY"

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


@dataclass(frozen=True)
class Access:
    """What a deployment's requests are checked against: the API key (None: no auth) and the
    largest request body in bytes."""

    api_key: str | None
    max_request_bytes: int


def _access() -> Access:
    from ray import serve

    return serve.get_replica_context().servable_object.access


def error_response(status: int, message: str) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)


def openai_style_api(title: str) -> FastAPI:
    """A FastAPI app whose errors are OpenAI-style JSON and whose request bodies are limited
    to the deployment's `max_request_bytes` (`BodyLimit`)."""
    # a body without a Content-Type is read as JSON, as OpenAI-compatible servers do
    # (FastAPI >= 0.132 refuses it by default; older versions read it and ignore the flag)
    api = FastAPI(title=title, strict_content_type=False)
    api.add_middleware(BodyLimit)

    @api.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _describe(exc.errors()))

    return api


def _describe(errors: list[dict]) -> str:
    return "; ".join(_describe_one(e) for e in errors)


def _describe_one(error: dict) -> str:
    if error["type"] == "json_invalid":
        return f"the body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}"
    return f"{'.'.join(str(p) for p in error['loc']) or 'body'}: {error['msg']}"


_bearer = HTTPBearer(auto_error=False)


async def require_api_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> None:
    """FastAPI dependency of the keyed routes: 401 unless the request carries
    `Authorization: Bearer KEY` with the deployment's key (none configured: no check)."""
    key = _access().api_key
    if key is None:
        return
    given = credentials.credentials.strip() if credentials else ""
    # bytes: compare_digest refuses a str with non-ASCII characters (TypeError, a 500)
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise HTTPException(401, "missing or invalid API key (send 'Authorization: Bearer KEY')")


class BodyLimit:
    """ASGI middleware: a request body over the deployment's `max_request_bytes` is a 413,
    refused by its Content-Length before it is read, or as soon as the bytes received pass the
    limit (a chunked body declares no length); no more than the limit is ever held."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = _access().max_request_bytes
        too_large = f"request body over {limit} bytes"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await error_response(413, too_large)(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # raised into the handler reading the body: a JSON 413
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_proxy(host: str, port: int | None) -> int:
    """Start Serve with its HTTP proxy on host:port (0 or None: a free port) and return the
    port. Serve already running on this Ray keeps the options it started with (Serve applies
    them once); `deployed` checks that its proxy answers on this port."""
    from ray import serve

    port = port or free_port(host)
    serve.start(http_options={"host": host, "port": port})
    return port


def _check_proxy(host: str, port: int) -> None:
    import httpx

    try:
        httpx.get(f"{base_url(host, port, '/')}/-/routes", timeout=30)
    except httpx.TransportError as exc:
        raise ConfigError(
            f"serve.port: no Serve proxy answers on {host}:{port} ({exc}). Serve already "
            f"running on this Ray keeps the HTTP port it started with: set serve.port (--port) "
            f"to it") from None


@contextmanager
def deployed(app: Any, name: str, cfg: ServeConfig) -> Iterator[str]:
    """Deploy a Serve application on the running Ray (starting Serve's proxy on cfg.host and
    cfg.port, 0/None = a free port, unless Serve already runs) and yield its base URL once the
    app runs; the app is deleted on exit. The one deploy of the teacher, retriever and student
    apps."""
    from ray import serve

    port = start_proxy(cfg.host, cfg.port)
    serve.run(app, name=name, route_prefix=cfg.route_prefix)  # returns once it runs
    try:
        _check_proxy(cfg.host, port)
        yield base_url(cfg.host, port, cfg.route_prefix)
    finally:
        serve.delete(name)


def wait_for_interrupt() -> None:
    """Block until Ctrl+C (the `rebase-ray serve ...` commands serve until then). Not
    `serve.run(blocking=True)`: that blocks before the caller could say the app is ready."""
    with suppress(KeyboardInterrupt):
        threading.Event().wait()


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
