"""The `rebase-ray` command: one verb per stage. Stages return summaries; this module renders
them (a rich table, or JSON with --json) and turns known errors into one clear line."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from rebase_ray.config import ConfigError
from rebase_ray.models import ModelError
from rebase_ray.storage import StorageError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train small task experts with no task data (ReBase + BalDistill on Ray).")
console = Console(stderr=True)
USER_ERRORS = (ConfigError, StorageError, ModelError, FileNotFoundError)


def render(summary: dict[str, Any], as_json: bool, title: str) -> None:
    """Print a stage summary: JSON on stdout, or tables on the terminal (nested lists of
    records become their own tables)."""
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
        return
    out = Console()
    scalars = Table(title=title, show_header=False)
    scalars.add_column("key", style="bold")
    scalars.add_column("value")
    tables = []
    for key, value in summary.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value))
        elif isinstance(value, dict) and value and all(
                not isinstance(v, (dict, list)) for v in value.values()):
            scalars.add_row(key, ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()))
        else:
            scalars.add_row(key, _fmt(value))
    out.print(scalars)
    for key, rows in tables:
        t = Table(title=key)
        cols = list(dict.fromkeys(c for r in rows for c in r))
        for c in cols:
            t.add_column(c)
        for r in rows:
            t.add_row(*(_fmt(r.get(c, "")) for c in cols))
        out.print(t)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


def run_verb(fn, *args, title: str, as_json: bool, **kwargs) -> dict:
    """Call a stage; user errors become one red line and exit code 2."""
    try:
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


@app.command()
def doctor(
    storage: Optional[str] = typer.Option(None, help="a storage URI to check (local or s3://)"),
    load_models: bool = typer.Option(True, help="load each bundled model (slower)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check the installation: versions, resources, bundled models, storage."""
    from rebase_ray.doctor import run_doctor

    report = run_doctor(storage=storage, load_models=load_models)
    render(report, as_json, "rebase-ray doctor")
    if not report["ok"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
