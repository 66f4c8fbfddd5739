import json
import subprocess
import sys


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "rebase_ray.cli", *args], capture_output=True,
                          text=True, timeout=600, check=False, **kw)


def test_doctor_json(tmp_path):
    res = run_cli("doctor", "--json", "--storage", str(tmp_path / "store"))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] is True
    assert report["versions"]["ray"] != "not installed"
    assert report["resources"]["cpus"] >= 1
    by_ref = {m["model"]: m for m in report["models"]}
    assert by_ref["bundled:minilm"]["check"] == "embeds to 384 dims"
    assert by_ref["bundled:smollm2-135m-instruct"]["check"].startswith("generated")
    assert report["storage"]["ok"] is True


def test_doctor_reports_unreachable_storage(s3_server):
    res = run_cli("doctor", "--json", "--no-load-models", "--storage", "s3://missing-bucket/x")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert report["storage"]["ok"] is False
    assert "does not exist" in report["storage"]["error"]


def test_a_source_with_no_file_exits_2_whether_glob_or_path(tmp_path):
    """A glob that matches nothing is the same user error as a missing path: exit 2 with a
    one-line reason, before Ray starts (it was built as a source of 0 rows)."""
    (tmp_path / "data").mkdir()
    for path, says in [(str(tmp_path / "data" / "*.jsonl"), "no file matches"),
                       (str(tmp_path / "data" / "missing.jsonl"), "no such file")]:
        (tmp_path / "sources.yaml").write_text(json.dumps({"sources": [
            {"name": "src", "path": path, "description": "d", "license": "MIT"}]}))
        res = run_cli("index", str(tmp_path / "sources.yaml"), "--out", str(tmp_path / "ds"))
        assert res.returncode == 2, res.stderr
        assert says in res.stderr and "Traceback" not in res.stderr


def test_version():
    from rebase_ray import __version__

    res = run_cli("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == __version__


def test_demo_default_folder_is_the_checkouts_examples():
    """`rebase-ray demo` without --dir finds examples/demo of this checkout."""
    from pathlib import Path

    from rebase_ray.cli.pipeline import default_demo_folder

    assert (default_demo_folder() / "pipeline.yaml").exists()
    assert default_demo_folder() == Path(__file__).resolve().parent.parent / "examples" / "demo"
