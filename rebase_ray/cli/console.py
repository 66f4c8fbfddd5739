"""What the console shows: progress bars and lines on stderr, summaries as rich tables (or
JSON) on stdout."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

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

console = Console(stderr=True)
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
            scalars.add_row(name, _cut(", ".join(f"{k}={fmt(v)}" for k, v in value.items()),
                                       MAX_VALUE))
        else:
            scalars.add_row(name, _cut(fmt(value), MAX_VALUE))


def _records_table(key: str, rows: list[dict], width: int) -> tuple[Table, int]:
    """(a table of at most MAX_TABLE_ROWS rows, one line each, the number of rows left out).
    When the columns do not fit in `width`, the widest are cut first (a long path, not the
    status beside it); a path keeps its end."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    shown = [[fmt(r.get(c, "")) for c in cols] for r in rows[:MAX_TABLE_ROWS]]
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


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) > 8:
        return f"{_cut(json.dumps(v[:3], default=str), 60)} … ({len(v)} items)"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)
