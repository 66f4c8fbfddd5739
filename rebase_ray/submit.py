"""Submit pipeline stages to a Ray cluster as Ray Jobs (the Jobs API, JobSubmissionClient).

The job's runtime_env carries the project: the `rebase_ray` package and the `jobs/` entrypoints
as py_modules, and the pipeline file's folder as the working dir (so relative paths in it keep
working). On a cluster, point `storage_root` and the sources at s3:// so every node sees them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
WORKING_DIR_EXCLUDES = [".venv", ".git", "artifacts", "__pycache__", "*.pyc", ".pytest_cache"]


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def project_modules() -> list[str]:
    """The folders a job needs besides the pipeline: rebase_ray and, beside it, jobs/."""
    import rebase_ray

    package = Path(rebase_ray.__file__).parent
    jobs = package.parent / "jobs"
    if not (jobs / "__init__.py").exists():
        raise FileNotFoundError(f"jobs/ entrypoints not found next to {package}")
    return [str(package), str(jobs)]


def submit(pipeline: str, address: str, stage: str | None = None,
           env_vars: dict[str, str] | None = None, submission_id: str | None = None) -> str:
    """Submit the whole run (stage=None) or one stage; returns the job id."""
    from rebase_ray.pipeline import STAGES

    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    path = Path(pipeline).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"pipeline file not found: {pipeline}")
    module = f"jobs.{stage}" if stage else "jobs.run"
    runtime_env: dict[str, Any] = {
        "working_dir": str(path.parent),
        "excludes": WORKING_DIR_EXCLUDES,
        "py_modules": project_modules(),
        "env_vars": {"HF_HUB_OFFLINE": "1", **(env_vars or {})},
    }
    return _client(address).submit_job(
        entrypoint=f"python -m {module} {path.name}", runtime_env=runtime_env,
        submission_id=submission_id)


def status(address: str, job_id: str) -> dict[str, Any]:
    info = _client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint, "start_time": info.start_time,
            "end_time": info.end_time}


def logs(address: str, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    return _client(address).stop_job(job_id)


def wait(address: str, job_id: str, timeout_s: float = 3600, poll_s: float = 2.0) -> dict:
    """Poll until the job ends (or the timeout); returns its final status."""
    deadline = time.time() + timeout_s
    while True:
        info = status(address, job_id)
        if info["status"] in TERMINAL or time.time() > deadline:
            return info
        time.sleep(poll_s)
