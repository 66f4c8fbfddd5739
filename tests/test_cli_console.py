"""The console a person reads: `--json` prints exactly one JSON document on stdout for every
stage verb (the real CLI, in a subprocess, on the tiny project of test_pipeline), progress on
stderr (bars on a terminal, one line per task start and end otherwise), compact summary
tables, and Ray's own logs in a file, not on the console."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import yaml
from replay_teacher import ReplayTeacher
from rich.console import Console
from test_pipeline import replay, write_project

from rebase_ray import progress
from rebase_ray.cli import ConsoleProgress, render


def test_progress_sink_off_a_terminal_prints_one_line_per_task_start_and_end():
    out = io.StringIO()
    progress.set_sink(ConsoleProgress(Console(file=out, force_terminal=False, width=100)))
    try:
        with progress.task("transform: rows", total=40) as advance:
            workers = [threading.Thread(target=lambda: [advance(1) for _ in range(10)])
                       for _ in range(4)]  # advance from several threads, as train does
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        with pytest.raises(RuntimeError), progress.task("train: steps", total=None) as advance:
            advance(3)
            raise RuntimeError("stop")
    finally:
        progress.set_sink(None)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0] == "transform: rows: started (40 to do)"
    assert lines[1].startswith("transform: rows: 40/40 (") and lines[1].endswith(" s)")
    assert lines[2] == "train: steps: started"
    assert lines[3].startswith("train: steps: 3 (") and lines[3].endswith("s) stopped")


def test_progress_without_a_sink_goes_nowhere(capsys):
    with progress.task("anything", total=3) as advance:
        advance(3)
    assert capsys.readouterr() == ("", "")


def test_render_caps_nested_records(capsys):
    summary = {"rows": 40, "excluded_sources": [{"dataset": f"source_{i}", "reason": "x" * 300}
                                                 for i in range(40)],
               "counts": {"kept": 3, "rejected": 1}, "curve": list(range(100))}
    render(summary, as_json=False, title="t")
    out = capsys.readouterr().out
    assert "… 25 more rows (see the JSON / report)" in out
    assert "source_14" in out and "source_15" not in out
    assert "(100 items)" in out
    assert len(out.splitlines()) < 40
    render(summary, as_json=True, title="t")
    assert json.loads(capsys.readouterr().out) == summary


def test_ray_logs_and_stage_output_go_to_the_file_console_lines_to_stderr(tmp_path):
    """In a fresh interpreter, a verb's body inside `quiet_streams`: before the log file is
    known, stage output goes to stderr; after `route_logs`, Ray's loggers (Ray Data, Serve),
    Python warnings, print, a subprocess writing to fd 1 and C-level writes to fd 2 (Ray's C++
    core) end in the file; the CLI's console keeps stderr; stdout keeps the summary only."""
    log = tmp_path / "out" / "logs" / "rebase-ray.log"
    script = textwrap.dedent(f"""
        import logging, os, subprocess, warnings
        import ray.data
        from rebase_ray.cli import console, quiet_streams, route_logs
        with quiet_streams():
            print("before-the-log-file")
            route_logs({str(tmp_path / "out")!r})
            logging.getLogger("ray.data").warning("ray-data-warning")
            logging.getLogger("ray.serve").warning("ray-serve-warning")
            logging.getLogger("ray").info("ray-info")
            warnings.warn("a-python-warning")
            print("printed-by-a-stage")
            subprocess.run(["echo", "echoed-by-a-subprocess"], check=True)
            os.write(2, b"written-to-fd-2\\n")
            console.print("a-console-line")
            assert ray.data.DataContext.get_current().enable_progress_bars is False
        print("the-summary")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "the-summary\n"
    assert res.stderr.splitlines() == ["before-the-log-file", f"logs: {log}", "a-console-line"]
    for text in ("ray-data-warning", "ray-serve-warning", "ray-info", "a-python-warning",
                 "printed-by-a-stage", "echoed-by-a-subprocess", "written-to-fd-2"):
        assert text in log.read_text()


# ----------------------------------------------------------------------------- the real CLI


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rebase_ray.cli", *args], capture_output=True,
                          text=True, timeout=600, check=False, env=env)


def cli_start(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """`cli` in the background; `cli_end` waits for it."""
    return subprocess.Popen([sys.executable, "-m", "rebase_ray.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def cli_end(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def json_stdout(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stderr[-3000:]
    try:
        return json.loads(res.stdout)  # the WHOLE stdout is one JSON document
    except json.JSONDecodeError:
        pytest.fail(f"stdout is not one JSON document:\n{res.stdout[:3000]}")


@pytest.mark.slow
def test_every_stage_verb_prints_only_json_with_json(ray_cluster, tmp_path):
    """`run --json` builds the tiny project's artifacts; index, retrieve, transform and
    distill then resume on them (their outputs are complete), train and eval run for real.
    The CLI processes join the session's Ray (RAY_ADDRESS) instead of starting their own;
    distill's resume (it reads the run's artifacts, writes its own folder) runs beside train,
    and the final `run` beside eval (which writes only its own folder)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    art = tmp_path / "artifacts"
    with ReplayTeacher(replay) as teacher:
        pipeline = write_project(tmp_path, teacher_url=teacher.url)
        spec = yaml.safe_load(pipeline.read_text())
        (tmp_path / "sources.yaml").write_text(yaml.safe_dump({"sources": spec["sources"]}))
        (tmp_path / "task.yaml").write_text(yaml.safe_dump(spec["task"]))
        task = str(tmp_path / "task.yaml")

        res = cli("run", str(pipeline), "--json", env=env)
        summary = json_stdout(res)
        assert {s["status"] for s in summary["stages"]} <= {"done", "off"}
        log = art / "logs" / "rebase-ray.log"
        assert f"logs: {log}" in res.stderr
        assert "Connected to Ray cluster" in log.read_text()  # ray.init's lines: in the file
        assert "Connected to Ray cluster" not in res.stderr and "INFO" not in res.stderr
        stderr = res.stderr.splitlines()
        assert "transform: rows: started (8 to do)" in stderr  # no tty: start and end lines
        assert any(line.startswith("transform: rows: 8/8 (") for line in stderr)
        assert any(line.startswith("train: steps: 2/2 (") for line in stderr)
        assert "\r" not in res.stderr

        datastore = str(art / "datastore")
        index = json_stdout(cli("index", str(tmp_path / "sources.yaml"), "--out", datastore,
                                "--config", str(pipeline), "--json", env=env))
        assert index["shards"]
        json_stdout(cli("retrieve", task, "--datastore", datastore, "--out",
                        str(art / "retrieve"), "--config", str(pipeline), "--json", env=env))
        transformed = json_stdout(cli(
            "transform", task, "--hits", str(art / "retrieve"), "--teacher", teacher.url,
            "--out", str(art / "transform"), "--config", str(pipeline), "--json", env=env))
        assert transformed["processed_this_run"] == 0
        distilling = cli_start("distill", str(pipeline), "--teacher", teacher.url, "--json",
                               env=env)
        trained = json_stdout(cli("train", str(art / "transform"), "--task", task, "--out",
                                  str(tmp_path / "train"), "--config", str(pipeline),
                                  "--max-steps", "1", "--json", env=env))
        assert trained["steps"] == 1
        assert (tmp_path / "train" / "logs" / "rebase-ray.log").exists()
        evaluating = cli_start("eval", task, "--adapter", trained["adapter"], "--config",
                               str(pipeline), "--out", str(tmp_path / "eval"), "--json", env=env)
        json_stdout(cli_end(distilling))

        again = cli("run", str(pipeline), env=env)  # every stage up to date: the tables
        evaluated = json_stdout(cli_end(evaluating))
        assert evaluated["n"] == 4
    # train rerun on the same --out: the same command finds its run finished and trains
    # nothing (the summary is the checkpoint's, its train_s to the digit); a larger step
    # budget resumes from the checkpoint at step 1 instead of starting over
    train = ["train", str(art / "transform"), "--task", task, "--out", str(tmp_path / "train"),
             "--config", str(pipeline), "--json"]
    same = json_stdout(cli(*train, "--max-steps", "1", env=env))
    assert (same["steps"], same["restarts"]) == (1, 0)
    assert (same["train_s"], same["loss_curve"]) == (trained["train_s"], trained["loss_curve"])
    longer = json_stdout(cli(*train, "--max-steps", "2", env=env))
    assert (longer["steps"], longer["restarts"]) == (2, 1)
    assert longer["loss_curve"][0] == trained["loss_curve"][0]
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipped (up to date)" in again.stdout
    assert len((again.stdout + again.stderr).splitlines()) < 150
