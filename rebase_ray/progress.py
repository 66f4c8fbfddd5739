"""Progress of long work (rows transformed, training steps, examples evaluated), reported by
the stages and shown by whoever installed a sink (the CLI: a progress bar on stderr). Stages
never print: without a sink, progress goes nowhere.

    with progress.task("transform: rows", total=len(rows)) as advance:
        for batch in ...:
            advance(len(batch))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol


class Sink(Protocol):
    def __call__(self, description: str, total: int | None
                 ) -> contextlib.AbstractContextManager[Callable[[int], None]]: ...


_sink: Sink | None = None


def set_sink(sink: Sink | None) -> None:
    """Install (or remove, with None) the process-wide progress display."""
    global _sink
    _sink = sink


def _ignore(_n: int = 1) -> None:
    return None


@contextlib.contextmanager
def task(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A unit of long work; yields `advance(n=1)`."""
    if _sink is None:
        yield _ignore
        return
    with _sink(description, total) as advance:
        yield advance
