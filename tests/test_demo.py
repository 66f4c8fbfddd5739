"""The demo's own files (examples/demo) at reduced size, through `rebase-ray demo` as a person
runs it: data prepared from the installed packages, the pipeline's own local teacher on Ray
Serve (the tiny random model, constrained to the task's schema), BalDistill, both baselines,
and the final comparison; the console stays short and the report holds all four students."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

DEMO = REPO / "examples" / "demo"
KEEP_SOURCES = {"chatterbot_sports", "chatterbot_money", "chatterbot_politics",
                "chatterbot_movies", "chatterbot_computers", "bbc_news"}


def reduced_demo(folder):
    """examples/demo with fewer sources and rows, the tiny models, and a few steps."""
    shutil.copy(DEMO / "task.yaml", folder / "task.yaml")
    sources = yaml.safe_load((DEMO / "sources.yaml").read_text())
    sources["sources"] = [dict(s, max_rows=20) if s["name"] == "bbc_news" else s
                          for s in sources["sources"] if s["name"] in KEEP_SOURCES]
    (folder / "sources.yaml").write_text(yaml.safe_dump(sources))
    pipe = yaml.safe_load((DEMO / "pipeline.yaml").read_text())
    pipe["retrieve"]["top_n"] = 12
    pipe["teacher"].update(model="bundled:tiny-random-llama", max_batch_size=8,
                           serve={"cpus": 0.5, "port": 0})
    # the random teacher's labels are noise: its round trip would confirm almost none
    pipe["transform"].update(min_examples=1, max_tokens=96, label_check={"mode": "none"})
    pipe["distill"].update(budget=8, max_tokens=96, ifd_max_new_tokens=4)
    pipe["train"].update(model="bundled:tiny-random-llama", max_steps=2, max_seq_len=160)
    pipe["evaluate"].update(max_examples=10, max_new_tokens=4)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(pipe))
    return pipe


@pytest.fixture()
def session_ray(ray_cluster):
    """The session's Ray for the demo's process to join (RAY_ADDRESS): starting a Ray of its
    own is covered by test_runtime. The demo starts Serve there for its teacher (on a free
    port) and deletes only its app: Serve itself is shut down here, so that the next module's
    `serve_port` starts it on its own port."""
    yield ray_cluster.get_runtime_context().gcs_address
    from ray import serve

    serve.shutdown()


@pytest.mark.slow
def test_reduced_demo_compares_four_students_on_a_short_console(tmp_path, session_ray):
    pipe = reduced_demo(tmp_path)
    assert pipe["evaluate"]["baselines"] == ["fewshot", "synthetic"]
    env = {**os.environ, "RAY_ADDRESS": session_ray, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "rebase_ray.cli", "demo", "--dir",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert len(console.splitlines()) < 150, console
    for stage in ("index", "retrieve", "transform", "distill", "baselines", "evaluate"):
        assert f"{stage}: running" in console
    root = tmp_path / "artifacts" / "demo"
    report = json.loads((root / "evaluate" / "report.json").read_text())
    runs = report["evaluation"]["runs"]
    assert list(runs) == ["base", "fewshot", "synthetic", "trained"]
    assert report["evaluation"]["n"] == 10
    assert (root / "evaluate" / "report.html").exists() and "report.html" in console
    # the comparison table, one column per student, is the last table printed
    assert "rebase-ray" in console and "synthetic" in console and "fewshot" in console
    # the task's own data stayed out of retrieval (decontamination)
    hits = json.loads((root / "run.json").read_text())["stages"]["retrieve"]["summary"]
    assert "bbc_news" in {e["dataset"] for e in hits["excluded_sources"]}
    assert "bbc_news" not in {d["dataset"] for d in hits["rows_per_dataset"]}
