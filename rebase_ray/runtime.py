"""Starting or joining Ray: the one place that calls `ray.init`, so every verb and stage
honours the pipeline's `ray` section (address, CPUs, GPUs) and keeps stdout clean; and
`resolve_resources`: a stage's `Resources` made concrete from what the cluster has free when it starts.

SIGTERM (`kill`, a container or job stop) ends a process that called `init_ray` as Ctrl+C does:
KeyboardInterrupt unwinds the verb, and Ray's exit hook shuts down the local Ray it started
(raylet, GCS, the dashboard and runtime-env agents). With SIGTERM's default action those agents
outlived the process. Nothing can run on SIGKILL: then `ray stop` ends what is left.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass

from rebase_ray.config import RayConfig, Resources

log = logging.getLogger(__name__)

# Ray's setting (read by the raylet from its environment): how long a worker process may stay
# idle once the node has more workers than CPUs
KEEP_IDLE_WORKERS = "RAY_idle_worker_killing_time_threshold_ms"
KEEP_IDLE_WORKERS_MS = str(10 * 60 * 1000)


def init_ray(cfg: RayConfig | None = None, dashboard: bool | None = None) -> None:
    """Start a local Ray or join `cfg.address`, once per process. A local Ray starts Ray's
    dashboard (`dashboard` None, Ray's default) unless `dashboard` is False: the stages that
    only embed and search (index, retrieve) start Ray without it when they are the first to
    start it, about 1.5-2 s sooner (`ray.init` 2.8-3.8 s against 4.8-5.0 s on 2 cores), and the
    dashboard's ten processes (its head modules) stay off the CPUs the embedding actors use.
    Ray Train needs it: its placement-group cleaner reads actors through the state API, which
    the dashboard serves (without it: errors in the log). Ray's worker output is not
    forwarded to this process (`log_to_driver=False`): stdout carries summaries and --json;
    worker logs stay in Ray's session folder (/tmp/ray/session_latest/logs). The driver's own
    Ray logs (`ray.init`, Ray Data, Serve) go where the `ray` loggers point: the CLI calls
    `rebase_ray.logs.log_to_file` first, so they land in its log file, not on the console.

    A local Ray keeps an idle worker process for 10 minutes (`KEEP_IDLE_WORKERS`, unless the
    environment sets it), not Ray's 1 s once there are more workers than CPUs: the student
    that an evaluation or IFD pass left in its worker (`generation.resident`) is then still
    there for the run's next one, after the training or teacher stage between them."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    if cfg.address is None and not os.environ.get("RAY_ADDRESS"):  # a local Ray starts
        os.environ.setdefault(KEEP_IDLE_WORKERS, KEEP_IDLE_WORKERS_MS)
    ray.init(address=cfg.address, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
             include_dashboard=dashboard, log_to_driver=False)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl+C: see above


@dataclass(frozen=True)
class Plan:
    """A `Resources` resolved against the cluster: what a stage's actor pool asks Ray for."""

    actors: int
    cpus: float
    gpus: float
    threads: int

    def summary(self) -> dict[str, float]:
        """The resolved values, as each stage's summary states them."""
        return {"actors": self.actors, "cpus_per_actor": self.cpus,
                "gpus_per_actor": self.gpus, "threads_per_actor": self.threads}


def plan(res: Resources, free_cpus: float, free_gpus: float, node_cpus: float,
         most: int | None = None, reserve: float = 0.0) -> Plan:
    """`res` with its unset values filled in from `free_cpus`/`free_gpus` (free in the cluster
    now) and `node_cpus` (the largest node's CPUs): see `Resources`. `most`: the stage's work in
    actor-sized pieces (batches, shards), the most actors worth starting; `reserve`: CPUs left
    free for the tasks that feed the pool (Ray Data reads), lent to its threads."""
    usable = max(0.0, free_cpus - reserve)
    actors = res.actors
    if actors is None:
        if res.gpus > 0:
            actors = int(free_gpus // res.gpus)
        else:
            actors = int(usable // (res.cpus or 1))
        actors = max(1, min(actors, most if most else actors))
    cpus = res.cpus
    if cpus is None:
        share = min(math.floor(100 * usable / actors) / 100, node_cpus)
        if res.gpus > 0:
            cpus = 1.0
        elif share >= 0.01:
            cpus = share
        else:  # nothing free: ask for one (an autoscaler adds it, or a stage ending frees it)
            log.warning("no free CPUs in the Ray cluster: asking 1 CPU per actor")
            cpus = 1.0
    threads = res.threads or max(math.ceil(cpus),
                                 min(int(free_cpus / actors + 0.5), int(node_cpus)))
    return Plan(actors, cpus, res.gpus, max(1, threads))


def resolve_resources(res: Resources, most: int | None = None, reserve: float = 0.0,
            held: float = 0.0) -> Plan:
    """`plan` against the running Ray cluster's free resources at this moment (a stage
    resolves when it starts, so what earlier stages hold, e.g. the teacher's Serve replica, is
    not asked for again). `held`: CPUs the caller (an actor already started) holds itself."""
    import ray

    if None not in (res.actors, res.cpus, res.threads):  # fully configured: nothing to read
        return Plan(res.actors, res.cpus, res.gpus, res.threads)
    free = _settled_free()
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]),
                    default=1.0)
    chosen = plan(res, free.get("CPU", 0.0) + held, free.get("GPU", 0.0), node_cpus, most,
                  reserve)
    log.info("resources: %s from %s free", chosen.summary(), {k: free.get(k, 0.0)
                                                              for k in ("CPU", "GPU")})
    return chosen


def _settled_free(samples: int = 5, every_s: float = 0.2) -> dict[str, float]:
    """`ray.available_resources()` once the tasks of a pass that just ended have given their
    CPUs back: the view is updated asynchronously (a datastore build that resolved its
    embedding actors right after its counting pass saw 1 of 2 CPUs free and ran on one core).
    Sampled until every CPU is free or for `samples` × `every_s` seconds, keeping the most
    free seen; what a long-lived actor (a Serve replica) holds is held in every sample."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    free = ray.available_resources()
    for _ in range(samples):
        if free.get("CPU", 0.0) >= total:
            break
        time.sleep(every_s)
        now = ray.available_resources()
        if now.get("CPU", 0.0) > free.get("CPU", 0.0):
            free = now
    return free
