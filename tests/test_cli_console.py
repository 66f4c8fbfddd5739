"""The console a person reads: `--json` prints exactly one JSON document on stdout for every
stage verb (the real CLI, in a subprocess, on the tiny project of test_pipeline, whose run is
killed after retrieval and resumed: the pipeline end to end), progress on stderr (bars on a
terminal, one line per task start and end otherwise), compact summary tables, and Ray's own
logs in a file, not on the console."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import yaml
from replay_teacher import ReplayTeacher
from rich.console import Console
from test_pipeline import replay, write_project

from rebase_ray import progress
from rebase_ray.cli import ConsoleProgress, render
from rebase_ray.logs import log_path


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
def test_killed_run_resumes_and_every_stage_verb_prints_only_json(ray_cluster, s3_bucket,
                                                                   tmp_path):
    """The whole pipeline through the real CLI, its artifacts on the S3 server (every stage
    reads and writes there: the datastore, the shard actors' retrieval, transform, distill, the
    baselines, Ray Train's checkpoints, the report). `run` is killed after retrieval and
    `run --json` resumes from transform; on its artifacts index, retrieve, transform and
    distill then resume (their outputs are complete), train and eval run for real, each
    printing one JSON document. The CLI processes join the session's Ray (RAY_ADDRESS): the
    kill ends the run's process group, and Ray then ends the job of the killed driver.
    distill's resume (it reads the run's artifacts, writes its own folder) runs beside train,
    and the final `run` beside eval (which writes only its own folder)."""
    from rebase_ray.storage import Storage

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    root = f"{s3_bucket}/artifacts"
    st = Storage.for_uri(root)
    manifest = f"{root}/run.json"
    with ReplayTeacher(replay) as teacher:
        pipeline = write_project(tmp_path, teacher_url=teacher.url,
                                 baselines=("fewshot", "synthetic"), storage_root=root)
        spec = yaml.safe_load(pipeline.read_text())
        (tmp_path / "sources.yaml").write_text(yaml.safe_dump({"sources": spec["sources"]}))
        (tmp_path / "task.yaml").write_text(yaml.safe_dump(spec["task"]))
        task = str(tmp_path / "task.yaml")

        killed = subprocess.Popen([sys.executable, "-m", "rebase_ray.cli", "run",
                                   str(pipeline)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.time() + 400
            while time.time() < deadline:
                if st.exists(manifest) and "retrieve" in st.read_json(manifest)["stages"]:
                    break
                assert killed.poll() is None, "the run ended before retrieval finished"
                time.sleep(0.2)
            else:
                pytest.fail("retrieval did not finish in time")
        finally:
            os.killpg(killed.pid, signal.SIGKILL)  # the run and every process it started
            killed.wait()
        assert set(st.read_json(manifest)["stages"]) == {"index", "retrieve"}
        calls_before = len(teacher.chat_requests())

        res = cli("run", str(pipeline), "--json", env=env)
        summary = json_stdout(res)
        status = {row["stage"]: row["status"] for row in summary["stages"]}
        assert status == {"index": "skipped (up to date)", "retrieve": "skipped (up to date)",
                          "transform": "done", "distill": "done", "baselines": "done",
                          "evaluate": "done"}
        assert len(teacher.chat_requests()) > calls_before
        # Ray's own lines in the log file (not local here: the fallback), not on the console
        assert f"logs: {log_path(root)}" in res.stderr
        assert "Connected to Ray cluster" not in res.stderr and "INFO" not in res.stderr
        stderr = res.stderr.splitlines()
        assert "transform: rows: started (8 to do)" in stderr  # no tty: start and end lines
        assert any(line.startswith("transform: rows: 8/8 (") for line in stderr)
        assert any(line.startswith("train: steps: 2/2 (") for line in stderr)
        assert "\r" not in res.stderr
        assert summary["report"] == f"{root}/evaluate/report.html" and st.exists(
            summary["report"])
        # base, both baselines and the distilled student, side by side per domain
        assert [r["domain"] for r in summary["comparison"]] == [
            "business", "sport", "(macro)", "(micro)"]
        assert set(summary["comparison"][0]) == {"metric", "domain", "base", "fewshot",
                                                 "synthetic", "rebase-ray"}
        report = st.read_json(f"{root}/evaluate/report.json")
        assert list(report["evaluation"]["runs"]) == ["base", "fewshot", "synthetic", "trained"]
        # each baseline trained on what it claims
        stages = st.read_json(manifest)["stages"]
        made = {b["baseline"]: b for b in stages["baselines"]["summary"]["baselines"]}
        assert made["fewshot"]["examples"] == 1  # the task's one few-shot example
        synth = st.read_json(f"{root}/baselines/synthetic/stats.json")
        transformed = stages["transform"]["summary"]
        assert made["synthetic"]["prompts"] == transformed["counts"]["retrieved"] == 8
        assert made["synthetic"]["request_budget"] == (
            transformed["teacher"]["requests_total"] + stages["distill"]["summary"]["calls"])
        assert made["synthetic"]["requests"] <= made["synthetic"]["request_budget"]
        assert made["synthetic"]["examples"] == synth["counts"]["kept"] >= 1
        for name in ("fewshot", "synthetic"):
            trained = st.read_json(f"{root}/baselines/{name}/train/train_summary.json")
            assert made[name]["adapter"] == trained["adapter"]
            assert made[name]["adapter"].startswith(f"{root}/baselines/{name}/train/")
            assert made[name]["train_steps"] == trained["steps"] >= 1  # max_steps 2, or 1 epoch
        assert st.ls(f"{root}/distill/stage-1/train/checkpoints", "checkpoint_*")
        hits = [r for r in teacher.chat_requests() if "<record>" not in r["messages"][-1]
                ["content"] and "Write ONE new example of the task above" in r["messages"][-1]
                ["content"]]
        assert len(hits) == 8  # one instruction-only prompt per retrieved row, no record

        datastore = f"{root}/datastore"
        index = json_stdout(cli("index", str(tmp_path / "sources.yaml"), "--out", datastore,
                                "--config", str(pipeline), "--json", env=env))
        assert index["shards"]
        json_stdout(cli("retrieve", task, "--datastore", datastore, "--out",
                        f"{root}/retrieve", "--config", str(pipeline), "--json", env=env))
        transformed = json_stdout(cli(
            "transform", task, "--hits", f"{root}/retrieve", "--teacher", teacher.url,
            "--out", f"{root}/transform", "--config", str(pipeline), "--json", env=env))
        assert transformed["processed_this_run"] == 0
        distilling = cli_start("distill", str(pipeline), "--teacher", teacher.url, "--json",
                               env=env)
        trained = json_stdout(cli("train", f"{root}/transform", "--task", task, "--out",
                                  str(tmp_path / "train"), "--config", str(pipeline),
                                  "--max-steps", "1", "--json", env=env))
        assert trained["steps"] == 1
        log = tmp_path / "train" / "logs" / "rebase-ray.log"  # a local --out: its own log
        assert "Connected to Ray cluster" in log.read_text()  # ray.init's lines: in the file
        evaluating = cli_start("eval", task, "--adapter", trained["adapter"], "--config",
                               str(pipeline), "--out", str(tmp_path / "eval"), "--json", env=env)
        json_stdout(cli_end(distilling))

        again = cli("run", str(pipeline), env=env)  # every stage up to date: the tables
        evaluated = json_stdout(cli_end(evaluating))
        assert evaluated["n"] == 4
    # train rerun on the same --out: the same command finds its run finished and trains
    # nothing (the summary is the checkpoint's, its train_s to the digit); a larger step
    # budget resumes from the checkpoint at step 1 instead of starting over
    train = ["train", f"{root}/transform", "--task", task, "--out", str(tmp_path / "train"),
             "--config", str(pipeline), "--json"]
    same = json_stdout(cli(*train, "--max-steps", "1", env=env))
    assert (same["steps"], same["restarts"]) == (1, 0)
    assert (same["train_s"], same["loss_curve"]) == (trained["train_s"], trained["loss_curve"])
    longer = json_stdout(cli(*train, "--max-steps", "2", env=env))
    assert (longer["steps"], longer["restarts"]) == (2, 1)
    assert longer["loss_curve"][0] == trained["loss_curve"][0]
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped (up to date)") == 6, again.stdout  # every stage
    assert len((again.stdout + again.stderr).splitlines()) < 150
