"""The `rebase-ray` command: one verb per stage. Stages return summaries; this package renders
them (a rich table, or JSON with --json) and turns known errors into one clear line.

The console: stdout carries the summary only (with --json, exactly one JSON document);
stderr carries progress (a bar per long task on a terminal, one line at the start and one at
the end of each task otherwise), one line per pipeline stage, `logs: PATH` and errors. The logs
of Ray, Ray Data, Ray Serve and Ray Train go to that file (`rebase_ray.logs`)."""

from rebase_ray.cli import pipeline, serve, stages  # noqa: F401 - they register the verbs
from rebase_ray.cli.app import app
from rebase_ray.cli.console import ConsoleProgress, console, render
from rebase_ray.cli.running import quiet_streams, route_logs, run_verb

__all__ = ["ConsoleProgress", "app", "console", "quiet_streams", "render", "route_logs",
           "run_verb"]
