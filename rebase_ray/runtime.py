"""Starting or joining Ray: the one place that calls `ray.init`, so every verb and stage
honours the pipeline's `ray` section (address, CPUs, GPUs) and keeps stdout clean.

SIGTERM (`kill`, a container or job stop) ends a process that called `init_ray` as Ctrl+C does:
KeyboardInterrupt unwinds the verb, and Ray's exit hook shuts down the local Ray it started
(raylet, GCS, the dashboard and runtime-env agents). With SIGTERM's default action those agents
outlived the process. Nothing can run on SIGKILL: then `ray stop` ends what is left.
"""

from __future__ import annotations

import signal
import threading

from rebase_ray.config import RayConfig


def init_ray(cfg: RayConfig | None = None) -> None:
    """Start a local Ray or join `cfg.address`, once per process. Ray's worker output is not
    forwarded to this process (`log_to_driver=False`): stdout carries summaries and --json;
    worker logs stay in Ray's session folder (/tmp/ray/session_latest/logs). The driver's own
    Ray logs (`ray.init`, Ray Data, Serve) go where the `ray` loggers point: the CLI calls
    `rebase_ray.logs.log_to_file` first, so they land in its log file, not on the console."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    ray.init(address=cfg.address, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
             log_to_driver=False)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl+C: see above
