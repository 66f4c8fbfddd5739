"""report.json + report.html: the plots are real PNGs, user text is escaped, provenance pairs
each example with its retrieved row, extra sections render, and headless Chromium shows it."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

from rebase_ray.evaluate.metrics import aggregate
from rebase_ray.evaluate.report import write_report
from rebase_ray.storage import Storage


def sample_report() -> dict:
    keys = ["acc", "acc_norm", "gen_strict", "gen_flexible"]
    preds = []
    for i, (domain, base, trained) in enumerate([("news", 0, 1), ("news", 0, 1), ("news", 1, 1),
                                                 ("sport", 0, 0), ("sport", 1, 1)]):
        # the base model knows the answer (acc) but does not write it in the format (gen_*)
        preds.append({"input": f"text {i} <script>alert(1)</script>", "output": "yes",
                      "domain": domain,
                      "base": {"prediction": "no", "answer": "no", "choice": "yes",
                               "acc": float(base), "acc_norm": float(base),
                               "gen_strict": 0.0, "gen_flexible": 0.0},
                      "trained": {"prediction": "yes", "answer": "yes", "choice": "yes",
                                  **{k: float(trained) for k in keys}}})
    runs = {run: aggregate(({"domain": p["domain"], **p[run]} for p in preds), keys)
            for run in ("base", "trained")}
    evaluation = {"task": "demo", "metric": "accuracy", "keys": keys, "model": "m",
                  "adapter": "a", "n": 5, "runs": runs, "predictions": preds}
    examples = [{"example_id": f"e{i}", "row_key": f"src/default/train/{i}", "dataset": "src",
                 "domain": ["news", "sport"][i % 2], "input": f"made from row {i}",
                 "rationale": "because", "output": ["yes", "no"][i % 3 == 0]} for i in range(8)]
    hits = [{"task": "demo", "row_key": f"src/default/train/{i}", "dataset": "src",
             "score": 0.5 + i / 100, "input_score": 0.4, "output_score": 0.6,
             "dataset_score": 0.5, "rank": i, "row": json.dumps({"text": f"ORIGINAL ROW {i}"})}
            for i in range(8)]
    training = {"steps": 4, "examples": 16, "tokens": 900, "stop_reason": "max_steps",
                "s_per_step": 0.5, "examples_per_s": 8.0,
                "loss_curve": [[1, 3.0], [2, 2.5], [3, 2.1], [4, 1.9]]}
    extra = {"title": "Stages: macro vs micro",
             "line_chart": {"series": {"macro": [[1, 0.3], [2, 0.5]],
                                       "micro": [[1, 0.4], [2, 0.55]]},
                            "x_label": "stage", "y_label": "accuracy"}}
    return {"title": "Demo report", "evaluation": evaluation, "training": training,
            "examples": examples, "hits": hits, "sections": [extra]}


def test_report_json_and_self_contained_html(tmp_path):
    json_uri, html_uri = write_report(str(tmp_path / "rep"), sample_report())
    st = Storage.for_uri(json_uri)
    assert st.read_json(json_uri)["evaluation"]["runs"]["trained"]["micro"]["acc"] == 0.8
    page = st.read_text(html_uri)
    # the primary score per domain, base vs trained, with the generative scores beside it
    assert "Per-domain acc: base vs trained" in page
    per_domain = re.search(r"Per-domain acc, acc_norm, gen_strict, gen_flexible: base vs "
                           r"trained</h2>\s*<table><thead><tr>(.*?)</tr>", page).group(1)
    assert re.findall(r"<th>([^<]*)</th>", per_domain) == [
        "domain", "base acc", "trained acc", "base acc_norm", "trained acc_norm",
        "base gen_strict", "trained gen_strict", "base gen_flexible", "trained gen_flexible"]

    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    # per-domain bars, loss, label / domain / dataset distributions, the extra section
    assert len(images) == 6
    for data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.format == "PNG" and img.width > 200
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "ORIGINAL ROW" in page and "made from row" in page  # provenance pairs
    assert "Stages: macro vs micro" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from outside


def test_report_on_s3(s3_bucket):
    json_uri, html_uri = write_report(f"{s3_bucket}/rep", sample_report())
    assert json_uri == f"{s3_bucket}/rep/report.json"
    assert Storage.for_uri(html_uri).read_text(html_uri).startswith("<!DOCTYPE html>")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian `chromium` is not installed (apt-get install -y chromium): "
                    "cannot check the report in a browser")
    _, html_uri = write_report(str(tmp_path / "rep"), sample_report())
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,2400", f"--screenshot={shot}", f"file://{html_uri}"],
        check=True, timeout=120, capture_output=True)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2400)
    # matplotlib's first two colours (base = C0 blue, trained = C1 orange) are on screen:
    # the bar charts rendered, not broken-image icons
    colours = img.getcolors(maxcolors=1 << 20)
    counts = {rgb: n for n, rgb in colours}

    def near(target: tuple[int, int, int]) -> int:
        return sum(n for rgb, n in counts.items()
                   if all(abs(a - b) <= 12 for a, b in zip(rgb, target)))

    assert near((31, 119, 180)) > 2000   # C0
    assert near((255, 127, 14)) > 2000   # C1
