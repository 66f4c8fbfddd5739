"""End to end: the tiny project every end-to-end test runs (`write_project`), a run that stops
at a stage that yields nothing, and Ray Jobs submitted to a real local Ray head started by the
test. The run killed after retrieval and resumed from transform, through the real CLI, is in
test_cli_console (with every stage verb's --json)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml
from conftest import REPO, free_port, wait_for_port
from replay_teacher import ReplayTeacher

from rebase_ray import submit

TOPICS = ["sport", "business"]


def write_project(tmp_path, teacher_url=None, stages=1, baselines=(), storage_root=None):
    """A tiny but complete project: two sources, a task with an eval set, a pipeline; its
    artifacts under `storage_root` (default: tmp_path/artifacts)."""
    data = tmp_path / "data"
    data.mkdir()
    games = ["football", "tennis", "cricket", "rugby", "golf", "hockey"]
    money = ["stocks", "bonds", "interest rates", "inflation", "banks", "profits"]
    (data / "sports.jsonl").write_text("".join(json.dumps(
        {"question": f"What do you know about {g}?", "answer": f"{g} is a sport with fans"}) + "\n"
        for g in games))
    (data / "money.jsonl").write_text("".join(json.dumps(
        {"question": f"Tell me about {m}", "answer": f"{m} matter to markets and companies"})
        + "\n" for m in money))
    (data / "eval.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in [
        ("The striker scored twice in the cup final.", "sport"),
        ("The bank reported higher quarterly profits.", "business"),
        ("The champion won the final set.", "sport"),
        ("Shares fell after the results.", "business")]))
    pipeline = {
        "storage_root": storage_root or str(tmp_path / "artifacts"),
        "sources": [
            {"name": "chat_sports", "path": "data/sports.jsonl",
             "description": "conversations about sports"},
            {"name": "chat_money", "path": "data/money.jsonl",
             "description": "conversations about money and finance"}],
        "task": {"name": "topic", "instruction": "Classify the topic of a news sentence.",
                 "examples": [{"input": "Chelsea win the league.", "output": "sport"}],
                 "labels": TOPICS, "answer": "label",
                 "eval": {"path": "data/eval.jsonl", "input": "text", "output": "label",
                          "domain": "label"}},
        "index": {"batch_size": 16},
        "retrieve": {"top_n": 8},
        "teacher": {"model": "bundled:tiny-random-llama", "url": teacher_url},
        "transform": {"concurrency": 4, "max_tokens": 32},
        # no per-stage evaluation (test_distill covers it): the evaluate stage scores the
        # final student, as in the demo
        "distill": {"stages": stages, "budget": 4, "mode": "balanced", "domain_from": "label",
                    "evaluate_stages": False},
        "train": {"model": "bundled:tiny-random-llama", "max_steps": 2, "batch_size": 2,
                  "max_seq_len": 128, "checkpoint_every": 2},
        "evaluate": {"max_new_tokens": 4, "baselines": list(baselines)},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def replay(prompt: str) -> str:
    """A teacher that writes a sports or a money example, agreeing rationales, and labels
    its own examples right (the label check)."""
    if prompt.startswith("Classify the topic"):  # the label check: the input is the last turn
        return "sport" if "about sport" in prompt.rsplit("\n", 1)[1] else "business"
    if "Correct answer: sport" in prompt:
        return "It is about a game.\nAnswer: sport"
    if "Correct answer: business" in prompt:
        return "It is about money.\nAnswer: business"
    topic = "sport" if any(g in prompt for g in ("football", "tennis", "cricket", "rugby",
                                                  "golf", "hockey", "Domain: sport")) else "business"
    subject = prompt.split("<record>")[-1][:60] if "<record>" in prompt else prompt[-60:]
    n = abs(hash(subject)) % 10_000
    return json.dumps({"input": f"News item {n}: a story about {topic} number {n}.",
                       "output": topic})


@pytest.mark.slow
def test_run_stops_at_a_stage_that_yields_nothing(ray_cluster, s3_bucket, tmp_path):
    """A teacher whose every reply is unusable: `rebase-ray run` stops right after transform
    with exit code 2, the reject reasons and what to change; distill never starts. The run's
    artifacts are on the S3 server: the datastore is built there, retrieval reads it through
    the shard actors, transform writes its rejects there."""
    from typer.testing import CliRunner

    from rebase_ray.cli import app
    from rebase_ray.storage import Storage

    root = f"{s3_bucket}/artifacts"
    with ReplayTeacher(lambda prompt: "I cannot help with that.") as teacher:
        path = write_project(tmp_path, teacher_url=teacher.url, storage_root=root)
        result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert "the run stops after transform" in message
    assert "kept 0 of" in message and "unparseable" in message and "teacher.url" in message
    st = Storage.for_uri(root)
    stages = st.read_json(f"{root}/run.json")["stages"]
    assert set(stages) == {"index", "retrieve", "transform"}
    assert stages["retrieve"]["summary"]["rows"] == 8
    assert st.ls(f"{root}/datastore/shards", "shard-*")
    rejects = st.read_parquet(f"{root}/transform/rejects.parquet").to_pandas()
    assert len(rejects) == 8 and set(rejects["reason"]) == {"unparseable"}
    # the report of what did run is still written, and the message says where
    report = f"{root}/evaluate/report.html"
    assert st.exists(report) and "report of the stages that ran" in message
    assert "stopped after transform" in st.read_text(report)


@pytest.fixture()
def ray_head():
    """A real Ray head (`ray start --head --block`) on 127.0.0.1 with the dashboard, in its own
    temp dir so no other Ray client picks it up; stopped by PID."""
    temp_dir = tempfile.mkdtemp(prefix="rrhead", dir="/tmp")
    port, dash = free_port(), free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # agents on free ports: the test session's own Ray already holds the default ones
         f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--ray-client-server-port={free_port()}"],
        # a loopback-only head for the test: Ray's token auth off, as for a local dev cluster
        # and this virtualenv's python first on PATH, as it would be in a cluster's image;
        # on SIGTERM the head stops at once: by default it first drains the node for up to
        # 30 s (for Serve behind a load balancer; the finished job's workers held it that long)
        env={**os.environ, "RAY_AUTH_MODE": "disabled",
             "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
             "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(dash, timeout=120)
        yield f"http://127.0.0.1:{dash}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submit_index_job_to_a_real_head(ray_head, tmp_path):
    path = write_project(tmp_path)
    address = ray_head
    job_id = None
    deadline = time.time() + 240
    while job_id is None:  # the Jobs API answers only once the head's dashboard agent is up
        try:
            job_id = submit.submit(str(path), address, stage="index")
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    final = submit.wait(address, job_id, timeout_s=400, poll_s=0.5)
    logs = submit.logs(address, job_id)
    assert final["status"] == "SUCCEEDED", logs[-3000:]
    assert '"stage": "index"' in logs and '"status": "done"' in logs  # the job's summary
    manifest = json.loads((tmp_path / "artifacts" / "datastore" / "manifest.json").read_text())
    assert sum(s["cells"] for s in manifest["shards"]) == 24  # 12 rows x 2 columns
    assert submit.status(address, job_id)["entrypoint"] == "python -m jobs.index pipeline.yaml"


def test_submit_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        submit.submit(str(tmp_path / "p.yaml"), "http://127.0.0.1:1", stage="nope")
    with pytest.raises(FileNotFoundError, match="pipeline file not found"):
        submit.submit(str(tmp_path / "missing.yaml"), "http://127.0.0.1:1")
    assert set(submit.project_modules()) == {str(REPO / "rebase_ray"), str(REPO / "jobs")}
