"""Evaluation: SQuAD EM/F1 on fixed cases, label normalisation, code in a sandboxed
subprocess (pass / fail / timeout / memory limit), macro vs micro by hand, and batch inference
through a Ray Data actor pool with a LoRA adapter read from S3."""

from __future__ import annotations

import pytest

from rebase_ray.config import EvaluateConfig, TaskConfig
from rebase_ray.evaluate import evaluate, metric_rows
from rebase_ray.evaluate.code_exec import run_tests
from rebase_ray.evaluate.metrics import accuracy_score, aggregate, squad_scores
from rebase_ray.evaluate.run import score
from rebase_ray.models import TINY


@pytest.mark.parametrize("pred, golds, em, f1", [
    ("the Denver Broncos", ["Denver Broncos"], 1.0, 1.0),           # articles removed
    ("Broncos", ["Denver Broncos"], 0.0, 2 * 1.0 * 0.5 / 1.5),      # P=1, R=1/2
    ("Santa Clara, California", ["Levi's Stadium", "Santa Clara"], 0.0, 0.8),  # max over golds
    ("Levis Stadium!", ["Levi's Stadium"], 1.0, 1.0),               # punctuation removed
    ("an apple a day", ["the the the"], 0.0, 0.0),                  # empty after normalising
    ("1 2 2", ["2 2 3"], 0.0, 2 / 3),                               # multiset overlap
])
def test_squad_exact_match_and_f1(pred, golds, em, f1):
    got = squad_scores(pred, golds)
    assert got["exact_match"] == em
    assert got["f1"] == pytest.approx(f1)


def test_label_and_multiple_choice_accuracy():
    labels = ["entailment", "neutral", "contradiction"]
    assert accuracy_score("Entailment.", "entailment", labels) == 1.0
    assert accuracy_score("it is neutral here", "neutral", labels) == 1.0
    assert accuracy_score("neutral or entailment", "neutral", labels) == 0.0  # two labels named
    assert accuracy_score("contradiction", "neutral", labels) == 0.0
    assert accuracy_score("(B)", "B") == 1.0
    assert accuracy_score("b) Paris", "B") == 1.0
    assert accuracy_score("C", "B") == 0.0


def test_code_runs_in_a_limited_subprocess():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    assert run_tests("def add(a, b):\n    return a + b", tests)["status"] == "pass"
    failed = run_tests("def add(a, b):\n    return a - b", tests)
    assert failed["status"] == "fail" and "AssertionError" in failed["detail"]
    slow = run_tests("def add(a, b):\n    while True: pass", tests, timeout_s=1)
    assert slow["status"] == "timeout"
    hog = run_tests("x = bytearray(2 * 1024 ** 3)", "", memory_mb=256)
    assert hog["status"] == "fail" and "MemoryError" in hog["detail"]
    writer = run_tests("open('big', 'wb').write(b'x' * 50 * 1024 ** 2)", "")
    assert writer["status"] == "fail"  # the file size limit (10 MB)


def test_code_task_scores_pass_at_1_from_a_fenced_answer():
    task = TaskConfig(name="code", instruction="Write add(a, b).",
                      examples=[{"input": "add", "output": "def add(a, b): ..."}], answer="code")
    record = {"input": "add", "output": "assert add(1, 2) == 3", "domain": "math"}
    good = score(task, record, "Here:\n```python\ndef add(a, b):\n    return a + b\n```",
                 EvaluateConfig())
    bad = score(task, record, "def add(a, b): return 0", EvaluateConfig())
    assert (good["pass_at_1"], good["status"]) == (1.0, "pass")
    assert (bad["pass_at_1"], bad["status"]) == (0.0, "fail")


def test_macro_and_micro_on_a_hand_computed_case():
    rows = [{"domain": "a", "accuracy": 1.0}, {"domain": "a", "accuracy": 1.0},
            {"domain": "a", "accuracy": 0.0}, {"domain": "b", "accuracy": 0.0}]
    agg = aggregate(rows, ["accuracy"])
    assert agg["domains"]["a"] == {"n": 3, "accuracy": pytest.approx(2 / 3)}
    assert agg["domains"]["b"] == {"n": 1, "accuracy": 0.0}
    assert agg["macro"]["accuracy"] == pytest.approx((2 / 3 + 0) / 2)  # 1/3
    assert agg["micro"]["accuracy"] == pytest.approx(2 / 4)            # 1/2


@pytest.mark.slow
def test_evaluate_base_and_adapter_through_ray_data(ray_cluster, s3_bucket, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rebase_ray.models import resolve
    from rebase_ray.storage import Storage

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve(TINY)), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(str(tmp_path / "adapter"))
    adapter = f"{s3_bucket}/adapter"
    Storage.for_uri(adapter).upload_dir(str(tmp_path / "adapter"), adapter)

    task = TaskConfig(name="yn", instruction="Answer yes or no.", labels=["yes", "no"],
                      examples=[{"input": "Is a cat an animal?", "output": "yes"}], answer="label")
    records = [{"input": f"Is a {w} an animal?", "output": a, "domain": d}
               for w, a, d in [("cat", "yes", "pets"), ("dog", "yes", "pets"),
                               ("rock", "no", "things"), ("cup", "no", "things"),
                               ("cow", "yes", "farm")]]
    cfg = EvaluateConfig(batch_size=2, max_new_tokens=4, num_cpus_per_actor=0.5)
    result = evaluate(task, records, TINY, adapter, cfg)

    assert set(result["runs"]) == {"base", "trained"}
    assert result["n"] == 5 and len(result["predictions"]) == 5
    assert [p["input"] for p in result["predictions"]] == [r["input"] for r in records]
    for run in ("base", "trained"):
        assert set(result["runs"][run]["domains"]) == {"pets", "things", "farm"}
        assert all(p[run]["accuracy"] in (0.0, 1.0) for p in result["predictions"])
    # the random adapter changes the answers: the two runs really are different models
    assert [p["base"]["prediction"] for p in result["predictions"]] != \
        [p["trained"]["prediction"] for p in result["predictions"]]
    rows = metric_rows(result)
    assert {(r["run"], r["domain"]) for r in rows} >= {("base", "(macro)"), ("trained", "(micro)")}


@pytest.mark.slow
def test_eval_verb_writes_the_report(ray_cluster, tmp_path):
    import json

    from typer.testing import CliRunner

    from rebase_ray.cli import app

    rows = [{"q": "Is a cat an animal?", "a": "yes", "kind": "pets"},
            {"q": "Is a rock an animal?", "a": "no", "kind": "things"},
            {"q": "", "a": "no", "kind": "things"}]  # rejected by the eval loader
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text(
        "name: yn\ninstruction: Answer yes or no.\nanswer: label\nlabels: ['yes', 'no']\n"
        "examples:\n  - {input: 'Is a dog an animal?', output: 'yes'}\n"
        "eval: {path: eval.jsonl, input: q, output: a, domain: kind}\n")
    result = CliRunner().invoke(app, [
        "eval", str(tmp_path / "task.yaml"), "--model", TINY, "--out", str(tmp_path / "rep"),
        "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n"] == 2 and summary["eval_rejects"] == 1
    assert {r["domain"] for r in summary["metrics"]} == {"pets", "things", "(macro)", "(micro)"}
    assert (tmp_path / "rep" / "report.html").exists()
