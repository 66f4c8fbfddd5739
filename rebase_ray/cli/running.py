"""Running a verb: its streams and logs routed, known errors turned into one clear line and
an exit code, the summary rendered."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import Any, TypeVar

import typer
from pydantic import BaseModel

from rebase_ray.cli.console import console, render
from rebase_ray.config import PipelineConfig, validate

M = TypeVar("M", bound=BaseModel)
from rebase_ray.config import ConfigError
from rebase_ray.models import ModelError
from rebase_ray.storage import StorageError

USER_ERRORS = (ConfigError, StorageError, ModelError, FileNotFoundError)


# ----------------------------------------------------------------------------- running a verb


_streams: dict[str, Any] = {}  # the running verb's redirected file descriptors


def _real_fds() -> bool:
    """Whether sys.stdout and sys.stderr are this process's fds 1 and 2 (not a test runner's
    in-memory streams, where only the Python-level redirect applies)."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


@contextlib.contextmanager
def quiet_streams() -> Iterator[None]:
    """While a stage runs, stdout carries nothing: what the stage, a library or a process it
    starts writes there goes to stderr (sys.stdout, and fd 1 when it is the real one). Once
    `route_logs` knows the log file, fds 1 and 2 go to that file too: Ray's C++ core writes
    its ERROR lines straight to fd 2, libraries draw tqdm bars on sys.stderr; `console` (the
    CLI's own lines and progress) keeps the real stderr. Everything is restored on exit, so
    the summary (or the error) is printed where it belongs."""
    sys.stdout.flush()
    sys.stderr.flush()
    real = _real_fds()
    saved_out = None
    if real:
        saved_out = os.dup(1)
        os.dup2(2, 1)
    _streams.clear()
    _streams["real"] = real
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if "saved_err" in _streams:
            console.file.flush()
            os.dup2(_streams["saved_err"], 2)
            os.close(_streams["saved_err"])
            console.file = None  # back to sys.stderr
            _streams["console_file"].close()
        if saved_out is not None:
            os.dup2(saved_out, 1)
            os.close(saved_out)
        _streams.clear()


def _streams_to_file(path: os.PathLike) -> None:
    """Inside `quiet_streams` on real fds: fds 1 and 2 to the log file, `console` to a copy
    of the real stderr."""
    if not _streams.get("real"):
        return
    sys.stderr.flush()
    if "saved_err" not in _streams:
        _streams["saved_err"] = os.dup(2)
        _streams["console_file"] = os.fdopen(os.dup(_streams["saved_err"]), "w", buffering=1,
                                             encoding="utf-8", errors="replace")
        console.file = _streams["console_file"]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    os.close(fd)


def route_logs(folder: str | None) -> None:
    """Ray's (and Ray Data's, Serve's, Train's) logs to `<folder>/logs/rebase-ray.log` when
    `folder` is local, else to the fallback file (`rebase_ray.logs`), with whatever the stage
    writes to stdout/stderr (`quiet_streams`); says where, on the console."""
    from rebase_ray.logs import log_path, log_to_file

    path = log_to_file(log_path(folder))
    _streams_to_file(path)
    console.print(f"logs: {path}", highlight=False, soft_wrap=True)


def stage_config(pipe: PipelineConfig | None, section: str, model: type[M], source: str,
                 overrides: dict[str, Any], serve: dict[str, Any] | None = None) -> M:
    """A stage's config: the pipeline's `section` (or the defaults) with the CLI options that
    were given (None: not given) on top, `serve` ones in its `serve` section, validated again
    so that an error names the option (`source`)."""
    data = (getattr(pipe, section) if pipe else model()).model_dump()
    for key, value in overrides.items():  # a dict: keys of a sub-section (resources)
        if isinstance(value, dict):
            data[key].update({k: v for k, v in value.items() if v is not None})
        elif value is not None:
            data[key] = value
    if serve:
        data["serve"].update({k: v for k, v in serve.items() if v is not None})
    return validate(data, model, source)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A known error (config, storage, model, a missing file) becomes one red line on stderr
    and exit code 2; anything else is a bug and keeps its traceback."""
    try:
        yield
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def run_verb(fn, *args, title: str, as_json: bool, **kwargs) -> dict:
    """Call a stage with its output kept off stdout (`quiet_streams`), then render its summary
    on stdout; user errors become one red line on stderr and exit code 2."""
    with user_errors(), quiet_streams():
        summary = fn(*args, **kwargs)
    render(summary, as_json, title)
    return summary
