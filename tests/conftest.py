"""Shared fixtures: a real S3-compatible server (moto's standalone server) on 127.0.0.1,
and a local Ray cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Ray Train, for every run in the tests (in this process and in the CLI subprocesses, which
# inherit os.environ; the driver passes these to the run's controller): the controller polls
# its workers every 2 s by default, and each poll gates a step of a run (the worker group's
# start, a reported checkpoint, the end): a run of a few steps idled for seconds. The
# preemption watcher (one more actor process per run) watches for cloud nodes being drained,
# which a local cluster never is.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free port; the AWS variables point every client at it.
    Stopped by PID at the end of the session."""
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    if moto is None:
        pytest.fail("moto_server not found: install the dev extra (pip install -e '.[dev]')")
    port = free_port()
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield endpoint
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the test S3 server; returns its s3:// URI."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray for the whole session (2 CPUs, dashboard on: Ray Train needs it quiet).
    Started after the S3 server so that its workers inherit the AWS_* variables."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1",
                                           "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def serve_port(ray_cluster) -> int:
    """Serve's HTTP proxy on 127.0.0.1:<free port> for one test module; apps deployed on it
    are removed by `serve.shutdown()` at the end of the module, which releases their CPUs."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
