"""Starting or joining Ray: the one place that calls `ray.init`, so every verb and stage
honours the pipeline's `ray` section (address, CPUs, GPUs) and keeps stdout clean."""

from __future__ import annotations

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
