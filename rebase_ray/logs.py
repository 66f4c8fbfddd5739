"""Where the logs of a `rebase-ray` command go: a file, never the console.

Ray, Ray Data, Ray Serve and Ray Train configure their Python loggers with console handlers
when they are imported (`ray`: `ray._private.log`, `ray.data`: `ray.data._internal.logging`,
`ray.serve`: `configure_default_serve_logger`). `log_to_file` imports them first, then replaces
those console handlers with one file handler, captures Python warnings into the same file and
turns Ray Data's progress display off (its tqdm bars on a terminal, and the periodic
"Total Progress" blocks it logs when stdout is not a terminal). The console is left to the
CLI: progress bars, one line per stage, summaries.

The worker processes' output stays in Ray's session folder (`init_ray` starts Ray with
`log_to_driver=False`).

Which file (`log_path`): `<storage_root>/logs/rebase-ray.log` for `run` and `demo` with a local
storage root, `<out>/logs/rebase-ray.log` for a verb whose `--out` is local, else (an s3://
destination, or a verb without `--out`) `$REBASE_RAY_CACHE/logs/rebase-ray.log`
(`~/.cache/rebase-ray/logs/rebase-ray.log` by default). The file is appended to.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

# the loggers whose records go to the file only; their children propagate to them
ROUTED = ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune", "ray.air", "py.warnings")
# this package's own loggers: INFO and up to the file too, and still propagated (a warning also
# reaches stderr through Python's last-resort handler)
OWN = "rebase_ray"
# Ray's own format: `ray.init` sets it on every handler of the `ray` logger, this one included
FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"
HANDLER_NAME = "rebase-ray-log-file"


def fallback_dir() -> Path:
    """The log folder for destinations that are not local files."""
    root = Path(os.environ.get("REBASE_RAY_CACHE", Path.home() / ".cache" / "rebase-ray"))
    return root / "logs"


def log_path(folder: str | None) -> Path:
    """`<folder>/logs/rebase-ray.log` when `folder` is a local path (or file:// URI), else the
    fallback file (see the module docstring)."""
    if folder and folder.startswith("file://"):
        folder = folder[len("file://"):]
    if folder and "://" not in folder:
        return Path(folder).expanduser().resolve() / "logs" / "rebase-ray.log"
    return fallback_dir() / "rebase-ray.log"


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler)


def log_to_file(path: str | Path) -> Path:
    """Send the logs of Ray (core, Data, Serve, Train, Tune), Python warnings and this
    package to `path` (appended; its folder is created) instead of the console, and turn
    Ray Data's progress display off. Idempotent: a second call moves the logs to the new
    file. Returns the file's path."""
    import ray
    import ray.data
    import ray.serve  # its import installs a console handler on `ray.serve`: import it first

    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.set_name(HANDLER_NAME)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FORMAT))
    old: set[logging.Handler] = set()
    for name in ROUTED:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if h.get_name() == HANDLER_NAME or _is_console(h):
                logger.removeHandler(h)
                if h.get_name() == HANDLER_NAME:
                    old.add(h)
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    own = logging.getLogger(OWN)
    for h in list(own.handlers):
        if h.get_name() == HANDLER_NAME:
            own.removeHandler(h)
            old.add(h)
    own.addHandler(handler)
    if own.level == logging.NOTSET or own.level > logging.INFO:
        own.setLevel(logging.INFO)
    for h in old:
        h.close()
    logging.captureWarnings(True)

    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"  # contexts created later, in this process
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # no tqdm bars, no periodic logged progress either
    ctx.enable_operator_progress_bars = False
    logging.getLogger(__name__).info("rebase-ray logs to %s (ray %s)", path, ray.__version__)
    return path
