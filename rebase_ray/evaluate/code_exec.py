"""pass@1 for code: run the candidate program followed by its tests in a separate Python
process, never in ours. The child runs isolated (`python -I`, its own session, an empty
temporary working directory) under resource limits (address space, CPU seconds, file size,
open files) and a wall-clock timeout after which its whole process group is killed.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

PASS, FAIL, TIMEOUT = "pass", "fail", "timeout"


def _limits(memory_mb: int, cpu_s: int):
    def apply() -> None:  # runs in the child between fork and exec
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 1024 * 1024, 10 * 1024 * 1024))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_tests(code: str, tests: str, timeout_s: float = 10, memory_mb: int = 512) -> dict:
    """{'status': pass|fail|timeout, 'detail': the end of stderr}. Pass = exit code 0."""
    with tempfile.TemporaryDirectory(prefix="rebase-ray-code-") as tmp:
        program = Path(tmp, "candidate.py")
        program.write_text(f"{code}\n\n{tests}\n", encoding="utf-8")
        proc = subprocess.Popen(
            [sys.executable, "-I", str(program)], cwd=tmp, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=_limits(memory_mb, int(timeout_s) + 1),  # noqa: PLW1509 (setrlimit only)
            env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"})
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"status": TIMEOUT, "detail": f"no result after {timeout_s:g} s"}
    if proc.returncode == 0:
        return {"status": PASS, "detail": ""}
    detail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [
        f"exit code {proc.returncode}"]
    if proc.returncode < 0:  # killed by a signal: the CPU limit sends SIGXCPU
        detail = [f"killed by {signal.Signals(-proc.returncode).name}"]
    return {"status": FAIL, "detail": detail[0][:300]}
