"""The `rebase-ray` command: one verb per stage. Stages return summaries; this module renders
them (a rich table, or JSON with --json) and turns known errors into one clear line.

The console: stdout carries the summary only (with --json, exactly one JSON document);
stderr carries progress (a bar per long task on a terminal, one line at the start and one at
the end of each task otherwise), one line per pipeline stage, `logs: PATH` and errors. The logs
of Ray, Ray Data, Ray Serve and Ray Train go to that file (`rebase_ray.logs`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from rebase_ray import progress
from rebase_ray.config import ConfigError, RayConfig
from rebase_ray.models import ModelError
from rebase_ray.runtime import init_ray
from rebase_ray.storage import StorageError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train small task experts with no task data (ReBase + BalDistill on Ray).")
console = Console(stderr=True)
USER_ERRORS = (ConfigError, StorageError, ModelError, FileNotFoundError)
MAX_TABLE_ROWS = 15  # rows of a nested list of records shown; the rest is in --json / reports
MAX_CELL = 48  # characters of one table cell
MAX_VALUE = 160  # characters of one scalar value


# ----------------------------------------------------------------------------- progress


class ConsoleProgress:
    """The CLI's progress sink (`rebase_ray.progress`), on `console` (stderr).

    On a terminal: one rich bar per running task; when a task ends its bar is removed and one
    line stays ("transform: rows 40/40 (12.3 s)"). Elsewhere (stderr piped to a file, CI): one
    line when a task starts and one when it ends, nothing in between. Never writes to stdout.
    `advance` may be called from any thread."""

    def __init__(self, out: Console):
        self.console = out
        self._lock = threading.Lock()
        self._bars: Progress | None = None
        self._running = 0

    @contextlib.contextmanager
    def __call__(self, description: str, total: int | None
                 ) -> Iterator[Callable[[int], None]]:
        if self.console.is_terminal:
            with self._bar(description, total) as advance:
                yield advance
            return
        count = [0]
        lock = threading.Lock()

        def advance(n: int = 1) -> None:
            with lock:
                count[0] += n

        t0 = time.monotonic()
        self.console.print(f"{description}: started"
                           + (f" ({total} to do)" if total is not None else ""),
                           highlight=False, soft_wrap=True)
        ended = "stopped"
        try:
            yield advance
            ended = ""
        finally:
            self._final(description, count[0], total, t0, ended)

    @contextlib.contextmanager
    def _bar(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        with self._lock:
            if self._bars is None:
                self._bars = Progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                    transient=True, redirect_stdout=False, redirect_stderr=False)
                self._bars.start()
            bars = self._bars
            self._running += 1
            task_id = bars.add_task(description, total=total)
        t0 = time.monotonic()

        def advance(n: int = 1) -> None:
            bars.advance(task_id, n)

        ended = "stopped"
        try:
            yield advance
            ended = ""
        finally:
            with self._lock:
                done = int(next(t.completed for t in bars.tasks if t.id == task_id))
                bars.remove_task(task_id)
                self._final(description, done, total, t0, ended)  # printed above the bars
                self._running -= 1
                if self._running == 0:
                    bars.stop()
                    self._bars = None

    def _final(self, description: str, done: int, total: int | None, t0: float,
               ended: str) -> None:
        count = f"{done}/{total}" if total is not None else str(done)
        self.console.print(f"{description}: {count} ({time.monotonic() - t0:.1f} s)"
                           + (f" {ended}" if ended else ""), highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- rendering


def render(summary: dict[str, Any], as_json: bool, title: str) -> None:
    """Print a stage summary: JSON on stdout, or compact tables on the terminal: scalars in
    one table, each nested list of records in its own table of at most MAX_TABLE_ROWS rows
    (the rest is in --json and the reports)."""
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
        sys.stdout.flush()
        return
    out = Console()
    scalars = Table(title=title, show_header=False, box=box.SIMPLE)
    scalars.add_column("key", style="bold", no_wrap=True)
    scalars.add_column("value", overflow="fold")
    tables: list[tuple[str, list[dict]]] = []
    _collect(summary, "", scalars, tables)
    out.print(scalars)
    for key, rows in tables:
        table, more = _records_table(key, rows, out.width)
        out.print(table)
        if more:
            out.print(f"  … {more} more rows (see the JSON / report)", highlight=False)


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _collect(summary: dict[str, Any], prefix: str, scalars: Table,
             tables: list[tuple[str, list[dict]]]) -> None:
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if _is_records(value):
            tables.append((name, value))
        elif isinstance(value, dict) and value and any(
                isinstance(v, (dict, list)) for v in value.values()):
            _collect(value, f"{name}.", scalars, tables)
        elif isinstance(value, dict) and value:
            scalars.add_row(name, _cut(", ".join(f"{k}={_fmt(v)}" for k, v in value.items()),
                                       MAX_VALUE))
        else:
            scalars.add_row(name, _cut(_fmt(value), MAX_VALUE))


def _records_table(key: str, rows: list[dict], width: int) -> tuple[Table, int]:
    """(a table of at most MAX_TABLE_ROWS rows, one line each, the number of rows left out).
    When the columns do not fit in `width`, the widest are cut first (a long path, not the
    status beside it); a path keeps its end."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    shown = [[_fmt(r.get(c, "")) for c in cols] for r in rows[:MAX_TABLE_ROWS]]
    widths = [min(MAX_CELL, max(len(c), *(len(row[i]) for row in shown)))
              for i, c in enumerate(cols)]
    room = width - 3 * len(cols) - 1  # padding and separators of box.SIMPLE_HEAD
    while sum(widths) > room and max(widths) > 8:
        widths[widths.index(max(widths))] -= 1
    t = Table(title=key, box=box.SIMPLE_HEAD)
    for c, w in zip(cols, widths):
        t.add_column(c, width=w, no_wrap=True, overflow="ellipsis")
    for row in shown:
        t.add_row(*(_cut(v, w) for v, w in zip(row, widths)))
    return t, max(0, len(rows) - MAX_TABLE_ROWS)


def _cut(text: str, limit: int) -> str:
    """`text` in at most `limit` characters; a path (or URI) keeps its end."""
    if len(text) <= limit:
        return text
    if "/" in text and " " not in text:
        return "…" + text[len(text) - limit + 1:]
    return text[: limit - 1] + "…"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) > 8:
        return f"{_cut(json.dumps(v[:3], default=str), 60)} … ({len(v)} items)"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


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


def run_verb(fn, *args, title: str, as_json: bool, **kwargs) -> dict:
    """Call a stage with its output kept off stdout (`quiet_streams`), then render its summary
    on stdout; user errors become one red line on stderr and exit code 2."""
    try:
        with quiet_streams():
            summary = fn(*args, **kwargs)
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    render(summary, as_json, title)
    return summary


@app.callback()
def main(version: bool = typer.Option(False, "--version", help="print the version and exit")):
    """Train small task experts with no task data (ReBase + BalDistill on Ray)."""
    if version:
        from rebase_ray import __version__

        typer.echo(__version__)
        raise typer.Exit()
    progress.set_sink(ConsoleProgress(console))


@app.command()
def doctor(
    storage: str | None = typer.Option(None, help="a storage URI to check (local or s3://)"),
    load_models: bool = typer.Option(True, help="load each bundled model (slower)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check the installation: versions, resources, bundled models, storage."""
    from rebase_ray.doctor import run_doctor

    def go() -> dict:
        route_logs(None)
        return run_doctor(storage=storage, load_models=load_models)

    report = run_verb(go, title="rebase-ray doctor", as_json=as_json)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def index(
    sources: str = typer.Argument(..., help="sources.yaml"),
    out: str = typer.Option(..., "--out", help="datastore URI (local path or s3://bucket/prefix)"),
    shards: int | None = typer.Option(None, help="shard count (default: by target size)"),
    index_type: str | None = typer.Option(None, "--index", help="auto | flat | hnsw | ivfpq"),
    embedder: str | None = typer.Option(None, help="embedder ref (default bundled:minilm)"),
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml whose `index` section is the starting point"),
    force: bool = typer.Option(False, "--force", help="rebuild every shard"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Build the datastore: read sources, embed cells on Ray, write sharded FAISS indexes."""
    from rebase_ray.config import IndexConfig, load_pipeline, load_sources, validate
    from rebase_ray.datastore import build_datastore

    def build() -> dict:
        route_logs(out)
        base = load_pipeline(config) if config else None
        data = (base.index if base else IndexConfig()).model_dump()
        data.update({k: v for k, v in {"shards": shards, "index": index_type,
                                        "embedder": embedder}.items() if v is not None})
        cfg = validate(data, IndexConfig, "index options")
        return build_datastore(load_sources(sources).sources, out, cfg,
                               s3=base.s3 if base else None, force=force)

    run_verb(build, title=f"rebase-ray index → {out}", as_json=as_json)


@app.command()
def transform(
    task: str = typer.Argument(..., help="task.yaml"),
    hits: str = typer.Option(..., "--hits", help="retrieval output (folder or hits.parquet)"),
    teacher: str = typer.Option("local", "--teacher",
                                help="an OpenAI-compatible base URL, or `local` to start the "
                                     "configured teacher on Ray Serve for this run"),
    out: str = typer.Option(..., "--out", help="output folder URI"),
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml: its `transform` and `teacher` sections"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """ReBase transformation: retrieved rows → task examples through the teacher."""
    import contextlib

    from rebase_ray.config import TeacherConfig, TransformConfig, load_pipeline, load_task
    from rebase_ray.serve.http import teacher_client_key
    from rebase_ray.serve.teacher import local_teacher
    from rebase_ray.transform.pipeline import transform as run_transform

    def go() -> dict:
        route_logs(out)
        pipe = load_pipeline(config) if config else None
        teacher_cfg = pipe.teacher if pipe else TeacherConfig()
        key = teacher_client_key(teacher_cfg, local=teacher == "local")
        sources = pipe.sources if pipe and isinstance(pipe.sources, list) else None
        with (local_teacher(teacher_cfg) if teacher == "local"
              else contextlib.nullcontext(teacher)) as url:
            return run_transform(load_task(task), hits, url, out,
                                 pipe.transform if pipe else TransformConfig(),
                                 s3=pipe.s3 if pipe else None, api_key=key, sources=sources)

    run_verb(go, title=f"rebase-ray transform → {out}", as_json=as_json)


@app.command()
def retrieve(
    task: str = typer.Argument(..., help="task.yaml"),
    datastore: str = typer.Option(..., "--datastore", help="datastore URI (from `index`)"),
    out: str = typer.Option(..., "--out", help="output folder URI"),
    top: int | None = typer.Option(None, "--top", help="rows to keep (default 3000)"),
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml whose `retrieve` section is the starting point"),
    force: bool = typer.Option(False, "--force", help="rerun even if the output is complete"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """ReBase retrieval: score every datastore row for the task, keep the top N, decontaminate."""
    from rebase_ray.config import RetrieveConfig, load_pipeline, load_task, validate
    from rebase_ray.retrieve import retrieve as run_retrieve

    def go() -> dict:
        route_logs(out)
        base = load_pipeline(config) if config else None
        data = (base.retrieve if base else RetrieveConfig()).model_dump()
        if top is not None:
            data["top_n"] = top
        cfg = validate(data, RetrieveConfig, "retrieve options")
        return run_retrieve(load_task(task), datastore, out, cfg,
                            s3=base.s3 if base else None, force=force)

    run_verb(go, title=f"rebase-ray retrieve → {out}", as_json=as_json)


@app.command()
def train(
    examples: str = typer.Argument(..., help="examples.parquet URI (input, output, rationale)"),
    task: str = typer.Option(..., "--task", help="task.yaml"),
    out: str = typer.Option(..., "--out", help="run folder URI: adapter/, checkpoints/, summary"),
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml whose `train` section is the starting point"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="step budget"),
    model: str | None = typer.Option(None, help="student model ref"),
    workers: int | None = typer.Option(None, help="Ray Train workers"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Fine-tune the student with LoRA on Ray Train (budgets, checkpoints, fault tolerance)."""

    from rebase_ray.config import TrainConfig, load_pipeline, load_task, validate
    from rebase_ray.train import train_student

    def go() -> dict:
        route_logs(out)
        pipe = load_pipeline(config) if config else None
        data = (pipe.train if pipe else TrainConfig()).model_dump()
        data.update({k: v for k, v in {"max_steps": max_steps, "model": model,
                                        "num_workers": workers}.items() if v is not None})
        cfg = validate(data, TrainConfig, "train options")
        init_ray(pipe.ray if pipe else None)
        summary = train_student(examples, load_task(task), cfg, out, s3=pipe.s3 if pipe else None)
        return summary if as_json else {k: v for k, v in summary.items() if k != "loss_curve"}

    run_verb(go, title=f"rebase-ray train → {out}", as_json=as_json)


@app.command("eval")
def eval_(
    task: str = typer.Argument(..., help="task.yaml with an `eval` set"),
    adapter: str | None = typer.Option(None, help="LoRA adapter URI (from `train`)"),
    model: str | None = typer.Option(None, help="base model ref (default: the student)"),
    out: str | None = typer.Option(None, "--out",
                                      help="folder URI for report.json and report.html"),
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml: its `evaluate` and `train` sections"),
    max_examples: int | None = typer.Option(None, "--max-examples"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Evaluate the student (and the base model as baseline) per domain; write the report."""

    from rebase_ray.config import EvaluateConfig, TrainConfig, load_pipeline, load_task, validate
    from rebase_ray.evaluate import evaluate, metric_rows
    from rebase_ray.evaluate.report import write_report
    from rebase_ray.storage import Storage
    from rebase_ray.tasks import load_eval_set

    def go() -> dict:
        route_logs(out)
        pipe = load_pipeline(config) if config else None
        s3 = pipe.s3 if pipe else None
        data = (pipe.evaluate if pipe else EvaluateConfig()).model_dump()
        if max_examples is not None:
            data["max_examples"] = max_examples
        cfg = validate(data, EvaluateConfig, "eval options")
        task_cfg = load_task(task)
        eval_set = load_eval_set(task_cfg, s3)
        if not eval_set.records:
            raise ConfigError(f"{task}: no eval records (`eval` missing, or every row rejected: "
                              f"{len(eval_set.rejects)} rejects)")
        init_ray(pipe.ray if pipe else None)
        ref = model or (pipe.train.model if pipe else TrainConfig().model)
        result = evaluate(task_cfg, eval_set.records, ref, adapter, cfg, s3)
        summary = {"task": task_cfg.name, "model": ref, "adapter": adapter, "n": result["n"],
                   "eval_rejects": len(eval_set.rejects), "seconds": result["seconds"],
                   "examples_per_s": result["examples_per_s"]}
        if out:
            report = {"title": f"rebase-ray: {task_cfg.name}", "task": task_cfg.model_dump(),
                      "evaluation": result}
            if adapter:  # `train` writes its summary beside the adapter
                st = Storage.for_uri(adapter, s3)
                train_summary = st.join(adapter.rstrip("/").rsplit("/", 1)[0],
                                        "train_summary.json")
                if st.exists(train_summary):
                    report["training"] = st.read_json(train_summary)
            summary["report_json"], summary["report_html"] = write_report(out, report, s3)
        summary["metrics"] = metric_rows(result)
        return summary

    run_verb(go, title=f"rebase-ray eval {task}", as_json=as_json)


@app.command()
def distill(
    pipeline: str = typer.Argument(..., help="pipeline.yaml (task, teacher, distill, train, "
                                             "evaluate sections)"),
    examples: str | None = typer.Option(
        None, "--examples", help="example pool URI (default: <storage_root>/transform)"),
    out: str | None = typer.Option(None, "--out",
                                      help="output URI (default: <storage_root>/distill)"),
    teacher: str | None = typer.Option(
        None, "--teacher", help="an OpenAI-compatible base URL, or `local` to start the "
                                "configured teacher on Ray Serve (default: teacher.url or local)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """BalDistill: K budgeted stages of head/tail-balanced selection, synthesis, LoRA training
    and per-domain evaluation (resumes at the first unfinished stage)."""
    import contextlib

    from rebase_ray.config import load_pipeline
    from rebase_ray.distill import distill as run_distill
    from rebase_ray.serve.http import teacher_client_key
    from rebase_ray.serve.teacher import local_teacher
    from rebase_ray.storage import Storage

    def go() -> dict:
        pipe = load_pipeline(pipeline)
        if isinstance(pipe.task, str):
            raise ConfigError(f"{pipeline}: task {pipe.task!r} was not loaded")
        pool = examples or Storage.join(pipe.storage_root, "transform")
        dest = out or Storage.join(pipe.storage_root, "distill")
        route_logs(dest)
        url = teacher or pipe.teacher.url or "local"
        key = teacher_client_key(pipe.teacher, local=url == "local")
        init_ray(pipe.ray)
        with (local_teacher(pipe.teacher) if url == "local"
              else contextlib.nullcontext(url)) as base_url:
            return run_distill(pipe.task, pool, dest, pipe.distill, pipe.train, pipe.evaluate,
                               teacher_url=base_url, api_key=key, s3=pipe.s3)

    run_verb(go, title=f"rebase-ray distill → {out or 'storage_root/distill'}", as_json=as_json)


serve_app = typer.Typer(no_args_is_help=True,
                        help="Run an endpoint on Ray Serve (until Ctrl+C).")
app.add_typer(serve_app, name="serve")


@serve_app.command("teacher")
def serve_teacher(
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml whose `teacher` section is the starting point"),
    model: str | None = typer.Option(None, help="model ref (bundled:..., hub id or path)"),
    backend: str | None = typer.Option(None, help="transformers | vllm"),
    adapter: str | None = typer.Option(None, help="a LoRA adapter folder or s3:// URI"),
    host: str | None = typer.Option(None, help="default 127.0.0.1"),
    port: int | None = typer.Option(None, help="default 8000; 0 = a free port"),
    route_prefix: str | None = typer.Option(None, help="default /"),
    max_batch_size: int | None = typer.Option(None, help="dynamic batching: rows per batch"),
    min_replicas: int | None = typer.Option(None),
    max_replicas: int | None = typer.Option(None),
    num_cpus: float | None = typer.Option(None, help="CPUs per replica"),
    num_gpus: float | None = typer.Option(None, help="GPUs per replica"),
    address: str | None = typer.Option(None, help="Ray address (default: local Ray)"),
    print_config: bool = typer.Option(
        False, "--print-config",
        help="print the Serve config YAML (serve deploy / KubeRay RayService) and exit"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """The teacher LLM behind OpenAI's chat API (API key: $REBASE_RAY_API_KEY)."""
    import yaml

    from rebase_ray.config import TeacherConfig, load_pipeline, validate

    top = {"model": model, "backend": backend, "adapter": adapter,
           "max_batch_size": max_batch_size}
    served = {"host": host, "port": port, "route_prefix": route_prefix,
              "min_replicas": min_replicas, "max_replicas": max_replicas,
              "num_cpus": num_cpus, "num_gpus": num_gpus}
    try:
        base = load_pipeline(config).teacher if config else TeacherConfig()
        data = base.model_dump()
        data.update({k: v for k, v in top.items() if v is not None})
        data["serve"].update({k: v for k, v in served.items() if v is not None})
        cfg = validate(data, TeacherConfig, "serve teacher options")
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    from rebase_ray.serve.teacher import serve_config
    from rebase_ray.serve.teacher import serve_teacher as run_teacher
    from rebase_ray.serve.vllm_app import VLLMUnavailable

    if print_config:
        try:
            typer.echo(yaml.safe_dump(serve_config(cfg), sort_keys=False), nl=False)
        except USER_ERRORS as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        return
    def go() -> dict:
        route_logs(None)
        init_ray(RayConfig(address=address))
        return run_teacher(cfg, lambda url: console.print(f"teacher at {url} (Ctrl+C stops)"))

    try:
        run_verb(go, title="rebase-ray serve teacher", as_json=as_json)
    except VLLMUnavailable as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None



@serve_app.command("retriever")
def serve_retriever(
    datastore: str = typer.Option(..., "--datastore", help="datastore URI (from `index`)"),
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml whose `retrieve` section is the starting point"),
    host: str | None = typer.Option(None, help="default 127.0.0.1"),
    port: int | None = typer.Option(None, help="default 8000; 0 = a free port"),
    route_prefix: str | None = typer.Option(None, help="default /retriever"),
    min_replicas: int | None = typer.Option(None),
    max_replicas: int | None = typer.Option(None),
    num_cpus: float | None = typer.Option(None, help="CPUs per replica"),
    address: str | None = typer.Option(None, help="Ray address (default: local Ray)"),
    print_config: bool = typer.Option(
        False, "--print-config",
        help="print the Serve config YAML (serve deploy / KubeRay RayService) and exit"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """The retriever: POST /retrieve {instruction, examples, top_n} (key: $REBASE_RAY_API_KEY)."""
    import yaml

    from rebase_ray.config import RetrieveConfig, load_pipeline, validate

    served = {"host": host, "port": port, "route_prefix": route_prefix,
              "min_replicas": min_replicas, "max_replicas": max_replicas, "num_cpus": num_cpus}
    try:
        pipe = load_pipeline(config) if config else None
        data = (pipe.retrieve if pipe else RetrieveConfig()).model_dump()
        data["serve"].update({k: v for k, v in served.items() if v is not None})
        cfg = validate(data, RetrieveConfig, "serve retriever options")
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    from rebase_ray.serve.retriever import serve_config
    from rebase_ray.serve.retriever import serve_retriever as run_retriever

    if print_config:
        typer.echo(yaml.safe_dump(serve_config(datastore, cfg), sort_keys=False), nl=False)
        return
    def go() -> dict:
        route_logs(None)
        init_ray(RayConfig(address=address))
        return run_retriever(
            datastore, cfg, lambda url: console.print(f"retriever at {url}/retrieve (Ctrl+C stops)"),
            s3=pipe.s3 if pipe else None)

    run_verb(go, title="rebase-ray serve retriever", as_json=as_json)


@serve_app.command("student")
def serve_student(
    adapter: str = typer.Option(..., "--adapter", help="the LoRA adapter (folder or s3:// URI)"),
    model: str | None = typer.Option(
        None, help="the base model (default: the pipeline's train.model)"),
    config: str | None = typer.Option(None, "--config", help="a pipeline.yaml"),
    host: str | None = typer.Option(None, help="default 127.0.0.1"),
    port: int | None = typer.Option(None, help="default 8000; 0 = a free port"),
    address: str | None = typer.Option(None, help="Ray address (default: local Ray)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """The trained student (base model + LoRA adapter) behind the teacher's OpenAI API."""
    from rebase_ray.config import TrainConfig, load_pipeline

    try:
        base_model = model or (load_pipeline(config).train if config else TrainConfig()).model
    except USER_ERRORS as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    serve_teacher(config=config, model=base_model, backend="transformers", adapter=adapter,
                  host=host, port=port, route_prefix=None, max_batch_size=None,
                  min_replicas=None, max_replicas=None, num_cpus=None, num_gpus=None,
                  address=address, print_config=False, as_json=as_json)


def _stage_progress(stage: str, status: str, brief: dict | None = None) -> None:
    """One line as a stage starts or is skipped; its brief summary when it is done."""
    if brief is None:
        console.print(f"[bold]{stage}[/bold]: {status}")
        return
    console.print(f"[bold]{stage}[/bold]: {status} — " + "; ".join(
        f"{k} {_fmt(v)}" for k, v in brief.items()), soft_wrap=True)  # one line, however long


@app.command()
def run(
    pipeline: str = typer.Argument(..., help="pipeline.yaml"),
    only: list[str] | None = typer.Option(
        None, "--only", help="run only these stages (repeatable): index, retrieve, transform, "
                             "distill, baselines, evaluate"),
    force: bool = typer.Option(False, "--force", help="rerun stages even when up to date"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """The whole pipeline, resumable: index → retrieve → transform → distill → baselines →
    evaluate."""
    from rebase_ray.config import load_pipeline
    from rebase_ray.pipeline import run as run_pipeline

    def go() -> dict:
        cfg = load_pipeline(pipeline)
        route_logs(cfg.storage_root)
        return run_pipeline(cfg, only=only, force=force, on_stage=_stage_progress)

    run_verb(go, title=f"rebase-ray run {pipeline}", as_json=as_json)


@app.command()
def demo(
    folder: str | None = typer.Option(
        None, "--dir", help="the demo folder (default: examples/demo of this checkout)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """The offline demo: BBC News topic classification learned from chatbot conversations,
    with the bundled models, on local Ray and local files (./artifacts/demo)."""
    from pathlib import Path

    from rebase_ray.config import load_pipeline
    from rebase_ray.demo import prepare
    from rebase_ray.pipeline import run as run_pipeline

    where = Path(folder) if folder else Path(__file__).resolve().parent.parent / "examples" / "demo"
    if not (where / "pipeline.yaml").exists():
        console.print(f"[red]error:[/red] no pipeline.yaml in {where} (use --dir)")
        raise typer.Exit(2)

    def go() -> dict:
        bbc = prepare(where)["bbc"]  # writes the data pipeline.yaml names: before loading it
        cfg = load_pipeline(where / "pipeline.yaml")
        route_logs(cfg.storage_root)
        console.print(f"demo data: {bbc} BBC articles (test/source) and chatterbot-corpus "
                      "conversations")
        return run_pipeline(cfg, on_stage=_stage_progress)

    summary = run_verb(go, title="rebase-ray demo", as_json=as_json)
    if summary.get("report"):
        console.print(f"report: {summary['report']}")


@app.command()
def submit(
    pipeline: str = typer.Argument(..., help="pipeline.yaml (its folder travels with the job)"),
    address: str = typer.Option(..., "--address", help="the Ray dashboard, http://HEAD:8265"),
    stage: str | None = typer.Option(None, help="one stage only (default: the whole run)"),
    wait: bool = typer.Option(False, "--wait", help="wait for the job and print its logs"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Submit the run (or one stage) to a Ray cluster as a Ray Job."""
    from rebase_ray import submit as jobs

    def go() -> dict:
        route_logs(None)
        job_id = jobs.submit(pipeline, address, stage=stage)
        info = jobs.wait(address, job_id) if wait else jobs.status(address, job_id)
        return {**info, **({"logs": jobs.logs(address, job_id)[-4000:]} if wait else {})}

    summary = run_verb(go, title="rebase-ray submit", as_json=as_json)
    if wait and summary["status"] != "SUCCEEDED":
        raise typer.Exit(1)


jobs_app = typer.Typer(no_args_is_help=True, help="Ray Jobs submitted with `submit`.")
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("status")
def jobs_status(job_id: str, address: str = typer.Option(..., "--address"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """A job's status."""
    from rebase_ray import submit as jobs

    def go() -> dict:
        route_logs(None)
        return jobs.status(address, job_id)

    run_verb(go, title=f"job {job_id}", as_json=as_json)


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: str = typer.Option(..., "--address")) -> None:
    """A job's logs."""
    from rebase_ray import submit as jobs

    typer.echo(jobs.logs(address, job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: str = typer.Option(..., "--address")) -> None:
    """Stop a running job."""
    from rebase_ray import submit as jobs

    typer.echo("stopped" if jobs.stop(address, job_id) else "not running")


if __name__ == "__main__":
    app()
