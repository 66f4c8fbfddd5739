"""The `rebase-ray` Typer app; the verbs register on it from their modules."""

from __future__ import annotations

import typer

from rebase_ray import progress
from rebase_ray.cli.console import ConsoleProgress, console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train small task experts with no task data (ReBase + BalDistill on Ray).")


def _print_version(value: bool) -> None:
    if value:
        from rebase_ray import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_print_version,
                                      is_eager=True, help="print the version and exit")):
    """Train small task experts with no task data (ReBase + BalDistill on Ray)."""
    progress.set_sink(ConsoleProgress(console))
