"""Ray's lifetime in a process that started it: SIGTERM leaves no Ray process behind."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ray_processes(root: str) -> list[int]:
    """PIDs of the processes whose command line names `root` (the Ray temp dir we chose)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if root in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def test_sigterm_shuts_down_the_local_ray_it_started():
    root = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = root
    script = ("import time\nfrom rebase_ray.runtime import init_ray\n"
              "from rebase_ray.config import RayConfig\n"
              "init_ray(RayConfig(num_cpus=1))\nprint('up', flush=True)\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=env)
    left: list[int] = []
    try:
        assert proc.stdout.readline().strip() == "up"
        assert ray_processes(root), "Ray did not start under RAY_TMPDIR"
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
