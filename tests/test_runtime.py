"""Ray's lifetime in a process that started it: SIGTERM leaves no Ray process behind; and the
resources a stage's pool gets when nothing (or part) is configured."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rebase_ray.config import Resources
from rebase_ray.runtime import Plan, plan, resolve_resources


def ray_processes(root: str, name: str = "") -> list[int]:
    """PIDs of the processes whose command line names `root` (the Ray temp dir we chose), and
    `name` too when given."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if root in cmdline and name in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("dashboard", [None, False])
def test_sigterm_shuts_down_the_local_ray_it_started(dashboard):
    """With Ray's dashboard (the default) and without it (index, retrieve: `init_ray`)."""
    root = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = root
    script = ("import time\nfrom rebase_ray.runtime import init_ray\n"
              "from rebase_ray.config import RayConfig\n"
              f"init_ray(RayConfig(num_cpus=1), dashboard={dashboard})\n"
              "print('up', flush=True)\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=env)
    left: list[int] = []
    try:
        assert proc.stdout.readline().strip() == "up"
        assert ray_processes(root), "Ray did not start under RAY_TMPDIR"
        # without it, Ray keeps a minimal dashboard process: no frontend, no head modules
        assert bool(ray_processes(root, "--disable-frontend")) == (dashboard is False)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.time() + 30
        while (left := ray_processes(root)) and time.time() < deadline:
            time.sleep(0.5)
        assert not left, f"Ray processes outlived SIGTERM: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in left:  # only processes this test started (they name its temp dir)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- resources

@pytest.mark.parametrize("res, free, kwargs, expected", [
    # a 2-core laptop, nothing configured: both cores, one thread per actor
    (Resources(), 2, {}, Plan(2, 1.0, 0, 1)),
    # the teacher's replica holds 0.5 CPU: one actor gets the 1.5 left, and 2 threads
    (Resources(), 1.5, {}, Plan(1, 1.5, 0, 2)),
    # embedding leaves a CPU to the reading tasks and lends it to the actor's threads
    (Resources(), 2, {"reserve": 1}, Plan(1, 1.0, 0, 2)),
    (Resources(), 64, {"reserve": 1}, Plan(63, 1.0, 0, 1)),
    # the stage's work caps the pool; the free CPUs are shared by the actors started
    (Resources(), 8, {"most": 2}, Plan(2, 4.0, 0, 4)),
    # a pool's CPU request never exceeds what is free (it would wait forever) ...
    (Resources(actors=2), 1.5, {}, Plan(2, 0.75, 0, 1)),
    # ... unless nothing is free: one CPU each, for an autoscaler to add
    (Resources(), 0, {}, Plan(1, 1.0, 0, 1)),
    # set values are kept
    (Resources(actors=3, cpus=0.5, threads=4), 2, {}, Plan(3, 0.5, 0, 4)),
    (Resources(cpus=0.5), 2, {}, Plan(4, 0.5, 0, 1)),
])
def test_resources_follow_the_free_cpus(res, free, kwargs, expected):
    assert plan(res, free, 0, node_cpus=64, **kwargs) == expected


def test_gpu_actors_follow_the_free_gpus():
    assert plan(Resources(gpus=1), 64, 4, node_cpus=32) == Plan(4, 1.0, 1, 16)
    assert plan(Resources(gpus=0.5), 8, 1, node_cpus=8) == Plan(2, 1.0, 0.5, 4)
    # no GPU free yet: one actor (an autoscaler adds a GPU node)
    assert plan(Resources(gpus=1), 8, 0, node_cpus=8).actors == 1


def test_threads_never_exceed_one_node():
    assert plan(Resources(actors=1), 64, 0, node_cpus=16) == Plan(1, 16, 0, 16)


def test_resolved_from_the_running_cluster(ray_cluster):
    """The session's Ray has 2 CPUs: a pool with nothing configured takes both (two actors, a
    thread each); with 0.5 CPU held elsewhere (as the teacher's replica), one actor takes the
    1.5 left with 2 threads."""
    import ray

    assert ray.available_resources().get("CPU") == 2, "another test left CPUs held"
    assert resolve_resources(Resources()) == Plan(2, 1.0, 0, 1)

    @ray.remote(num_cpus=0.5)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    try:
        ray.get(holder.ready.remote())
        assert resolve_resources(Resources()) == Plan(1, 1.5, 0, 2)
        assert resolve_resources(Resources(), reserve=1) == Plan(1, 0.5, 0, 2)
    finally:
        ray.kill(holder)
