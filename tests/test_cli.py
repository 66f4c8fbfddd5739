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
