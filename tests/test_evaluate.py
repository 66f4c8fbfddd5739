"""Evaluation: SQuAD EM/F1 on fixed cases, label scores (log-likelihood ranking, acc vs
acc_norm, the generated answer read strictly and flexibly), code in a sandboxed subprocess
(pass / fail / timeout / memory limit), macro vs micro by hand, and batch inference through a
Ray Data actor pool with a LoRA adapter read from S3: label log-likelihoods equal a forward
pass by hand, and the base row of a run with an adapter equals the base model evaluated
alone."""

from __future__ import annotations

import math
import time

import pytest

from rebase_ray.config import EvaluateConfig, Resources, TaskConfig
from rebase_ray.evaluate import comparison_rows, evaluate, metric_rows
from rebase_ray.evaluate.code_exec import run_tests
from rebase_ray.evaluate.measure import score
from rebase_ray.evaluate.metrics import (
    aggregate,
    length_normalized,
    ranked_scores,
    squad_scores,
    strict_score,
)
from rebase_ray.formats import flexible_score, strict_answer
from rebase_ray.models import TINY

LETTERS = ["A", "B", "C", "D"]


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


def test_flexible_reads_the_one_label_named():
    labels = ["entailment", "neutral", "contradiction"]
    assert flexible_score("Entailment.", "entailment", labels) == 1.0
    assert flexible_score("it is neutral here", "neutral", labels) == 1.0
    assert flexible_score("neutral or entailment", "neutral", labels) == 0.0  # two labels named
    assert flexible_score("contradiction", "neutral", labels) == 0.0
    assert flexible_score("(B)", "B", LETTERS) == 1.0
    assert flexible_score("b) Paris", "B", LETTERS) == 1.0
    assert flexible_score("B: Paris", "B", LETTERS) == 1.0
    assert flexible_score("C", "B", LETTERS) == 0.0


def test_an_article_is_not_a_choice_letter():
    assert flexible_score("(A)", "A", LETTERS) == 1.0
    assert flexible_score("A.", "A", LETTERS) == 1.0
    assert flexible_score("a good movie", "A", LETTERS) == 0.0
    assert flexible_score("A good movie, I think", "A", LETTERS) == 0.0  # a sentence's first word
    assert flexible_score("I would say a", "A", LETTERS) == 0.0


def test_no_synonym_or_plural_maps_to_a_label():
    labels = ["sport", "business"]
    assert flexible_score("sport", "sport", labels) == 1.0
    assert flexible_score("This is about sport.", "sport", labels) == 1.0
    assert flexible_score("Sports", "sport", labels) == 0.0
    assert flexible_score("a sports story", "sport", labels) == 0.0


def test_strict_wants_exactly_the_trained_format():
    def strict(reply: str, gold: str = "sport") -> float:
        return strict_score(strict_answer(reply), gold)

    assert strict("It is about a game.\nAnswer: sport") == 1.0
    assert strict("  Sport \n") == 1.0                      # no rationale: the whole reply
    assert strict("Answer: maybe\nAnswer: SPORT") == 1.0    # the last Answer: line
    assert strict("Answer: sport.") == 0.0
    assert strict("The answer is sport") == 0.0
    assert strict("Answer: sport\nbecause of the match") == 0.0


def test_acc_ranks_by_logprob_and_acc_norm_per_character():
    labels = ["no", "maybe"]
    logprobs = [-3.0, -4.0]  # "no" more likely; per character -1.5 vs -0.8: "maybe"
    assert length_normalized(logprobs, labels) == [-1.5, -0.8]
    assert ranked_scores(logprobs, labels, gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert ranked_scores(logprobs, labels, gold=0) == {"acc": 1.0, "acc_norm": 0.0}
    task = TaskConfig(name="t", instruction="Say no or maybe.", labels=labels, answer="label",
                      examples=[{"input": "x", "output": "no"}])
    scored = score(task, {"input": "x", "output": "maybe"}, "Answer: maybe", EvaluateConfig(),
                   logprobs)
    assert scored["choice"] == "no" and scored["logprobs"] == {"no": -3.0, "maybe": -4.0}
    assert (scored["acc"], scored["acc_norm"], scored["gen_strict"], scored["gen_flexible"]) == (
        0.0, 1.0, 1.0, 1.0)
    # nothing generated (evaluate.generative off): the ranked scores only, the choice as answer
    ranked_only = score(task, {"input": "x", "output": "maybe"}, None, EvaluateConfig(),
                        logprobs)
    assert ranked_only == {"prediction": None, "answer": "no", "choice": "no",
                           "logprobs": {"no": -3.0, "maybe": -4.0}, "acc": 0.0, "acc_norm": 1.0}


def test_label_accuracy_needs_labels_that_include_every_gold_answer():
    example = {"input": "Is a cat an animal?", "output": "yes"}
    task = TaskConfig(name="yn", instruction="Answer yes or no.", labels=["yes", "no"],
                      examples=[example], answer="label")
    with pytest.raises(ValueError, match="'maybe' is not one of the labels"):
        evaluate(task, [{"input": "Is it?", "output": "maybe"}], TINY, None, EvaluateConfig())
    unlabelled = TaskConfig(name="yn", instruction="Answer yes or no.", examples=[example],
                            metric="accuracy")
    with pytest.raises(ValueError, match="needs the task's `labels`"):
        evaluate(unlabelled, [example], TINY, None, EvaluateConfig())


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
    rows = [{"domain": "a", "acc": 1.0}, {"domain": "a", "acc": 1.0},
            {"domain": "a", "acc": 0.0}, {"domain": "b", "acc": 0.0}]
    agg = aggregate(rows, ["acc"])
    assert agg["domains"]["a"] == {"n": 3, "acc": pytest.approx(2 / 3)}
    assert agg["domains"]["b"] == {"n": 1, "acc": 0.0}
    assert agg["macro"]["acc"] == pytest.approx((2 / 3 + 0) / 2)  # 1/3
    assert agg["micro"]["acc"] == pytest.approx(2 / 4)            # 1/2


YN = TaskConfig(name="yn", instruction="Answer yes or no.", labels=["yes", "no"],
                examples=[{"input": "Is a cat an animal?", "output": "yes"}], answer="label")
YN_RECORDS = [{"input": f"Is a {w} an animal?", "output": a, "domain": d}
              for w, a, d in [("cat", "yes", "pets"), ("dog", "yes", "pets"),
                              ("rock", "no", "things"), ("cup", "no", "things"),
                              ("cow", "yes", "farm")]]


@pytest.fixture(scope="module")
def yn_runs(ray_cluster, s3_server, tmp_path_factory):
    """The yes/no eval set evaluated with a random LoRA adapter read from S3 (base and trained
    rows), the base model alone, a second random adapter alone, and the first adapter with the
    second as a baseline, all in one pass."""
    import s3fs
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rebase_ray.models import resolve
    from rebase_ray.storage import Storage

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server},
                      skip_instance_cache=True).mkdir("test-eval-adapter")
    s3_bucket = "s3://test-eval-adapter"
    tmp = tmp_path_factory.mktemp("adapter")
    for name, seed in (("adapter", 0), ("other", 1)):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve(TINY)), LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
            task_type="CAUSAL_LM"))
        model.save_pretrained(str(tmp / name))
    adapter = f"{s3_bucket}/adapter"
    Storage.for_uri(adapter).upload_dir(str(tmp / "adapter"), adapter)
    other = str(tmp / "other")
    cfg = EvaluateConfig(batch_size=2, max_new_tokens=4,
                         resources=Resources(actors=1, cpus=0.5, threads=1))
    # four independent evaluations, each its own Ray Data actor pool (one 0.5-CPU actor): run
    # side by side, they fit the 2 CPUs together and their start-ups (a process importing
    # torch and loading the model, single-threaded) overlap
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        runs = {"adapter": pool.submit(evaluate, YN, YN_RECORDS, TINY, adapter, cfg),
                "alone": pool.submit(evaluate, YN, YN_RECORDS, TINY, None, cfg),
                "other": pool.submit(evaluate, YN, YN_RECORDS, TINY, other, cfg),
                "with_baseline": pool.submit(evaluate, YN, YN_RECORDS, TINY, adapter, cfg,
                                             baselines={"fewshot": other, "synthetic": None})}
        return {name: run.result() for name, run in runs.items()}


@pytest.mark.slow
def test_evaluate_base_and_adapter_through_ray_data(yn_runs):
    result = yn_runs["adapter"]
    assert set(result["runs"]) == {"base", "trained"}
    assert result["keys"] == ["acc", "acc_norm", "gen_strict", "gen_flexible"]
    assert result["n"] == 5 and len(result["predictions"]) == 5
    assert [p["input"] for p in result["predictions"]] == [r["input"] for r in YN_RECORDS]
    for run in ("base", "trained"):
        assert set(result["runs"][run]["domains"]) == {"pets", "things", "farm"}
        for p in result["predictions"]:
            scores = p[run]
            assert set(scores["logprobs"]) == {"yes", "no"}
            assert scores["choice"] == max(scores["logprobs"], key=scores["logprobs"].get)
            assert scores["acc"] == float(scores["choice"] == p["output"])
            assert all(scores[k] in (0.0, 1.0) for k in result["keys"])
    # the random adapter changes the scores: the two runs really are different models
    assert [p["base"]["logprobs"] for p in result["predictions"]] != \
        [p["trained"]["logprobs"] for p in result["predictions"]]
    rows = metric_rows(result)
    assert {(r["run"], r["domain"]) for r in rows} >= {("base", "(macro)"), ("trained", "(micro)")}


@pytest.mark.slow
def test_base_row_equals_the_base_model_evaluated_alone(yn_runs):
    with_adapter, alone = yn_runs["adapter"], yn_runs["alone"]
    assert set(alone["runs"]) == {"base"}
    assert with_adapter["runs"]["base"] == alone["runs"]["base"]
    # the same answers and scores; the log-likelihoods to float precision: the adapter's model
    # runs the base layers inside peft's wrappers, and on some CPUs (AVX2 here) BLAS then
    # differs in the last bits (-10.8136816 vs -10.8136826)
    for got, want in zip(with_adapter["predictions"], alone["predictions"], strict=True):
        got, want = dict(got["base"]), dict(want["base"])
        assert got.pop("logprobs") == pytest.approx(want.pop("logprobs"), abs=1e-5)
        assert got == want


@pytest.mark.slow
def test_baseline_adapters_in_one_pass_equal_each_model_evaluated_alone(yn_runs):
    """Several adapters on one copy of the base weights, switched in turn: every run scores
    exactly what that model scores when it is evaluated by itself."""
    both = yn_runs["with_baseline"]
    # a baseline that had nothing to train on (adapter None) is the base model
    assert list(both["runs"]) == ["base", "fewshot", "synthetic", "trained"]
    assert both["runs"]["synthetic"] == both["runs"]["base"]
    for run, alone, as_run in (("base", yn_runs["alone"], "base"),
                               ("fewshot", yn_runs["other"], "trained"),
                               ("trained", yn_runs["adapter"], "trained")):
        got = [p[run]["logprobs"][label] for p in both["predictions"] for label in YN.labels]
        want = [p[as_run]["logprobs"][label] for p in alone["predictions"]
                for label in YN.labels]
        assert got == pytest.approx(want, abs=1e-5)
        assert both["runs"][run] == alone["runs"][as_run]
    assert [p["fewshot"]["logprobs"] for p in both["predictions"]] != \
        [p["trained"]["logprobs"] for p in both["predictions"]]
    table = comparison_rows(both)
    assert [r["domain"] for r in table] == ["farm", "pets", "things", "(macro)", "(micro)"]
    assert list(table[0]) == ["metric", "domain", "base", "fewshot", "synthetic", "rebase-ray"]
    assert table[-1]["rebase-ray"] == both["runs"]["trained"]["micro"]["acc"]


@pytest.mark.slow
def test_the_next_evaluation_reuses_the_workers_and_their_model(yn_runs):
    """Evaluations are Ray Data tasks: the worker process, and the model in it, stay for the
    next evaluation of the same driver (the stages of one run), which loads nothing — even
    when a stage between them started more workers than there are CPUs (with Ray's default,
    the idle worker was then ended after 1 s and the next evaluation loaded the model)."""
    import ray

    @ray.remote(num_cpus=0.25)
    class Stage:  # what a training stage starts: workers beyond the CPUs, for a while
        def ready(self) -> bool:
            return True

    cfg = EvaluateConfig(batch_size=5, max_new_tokens=4,
                         resources=Resources(actors=1, cpus=0.5, threads=1))
    first = evaluate(YN, YN_RECORDS, TINY, None, cfg)
    stage = [Stage.remote() for _ in range(6)]
    ray.get([s.ready.remote() for s in stage])
    time.sleep(3)
    for s in stage:
        ray.kill(s)
    again = evaluate(YN, YN_RECORDS, TINY, None, cfg)
    assert first["resources"]["model_loads"] <= 1
    assert again["resources"]["model_loads"] == 0
    assert again["runs"] == first["runs"] == yn_runs["alone"]["runs"]


@pytest.mark.slow
def test_label_logprobs_equal_a_forward_pass_by_hand(yn_runs):
    import torch

    from rebase_ray.formats import student_messages
    from rebase_ray.models import load_causal_lm

    model, tok = load_causal_lm(TINY)
    for p in yn_runs["alone"]["predictions"]:
        prompt = tok.apply_chat_template(student_messages(YN.instruction, p["input"]),
                                         add_generation_prompt=True, tokenize=False)
        context = tok(prompt, add_special_tokens=False)["input_ids"]
        for label in YN.labels:
            ids = tok(prompt + label, add_special_tokens=False)["input_ids"]
            assert ids[: len(context)] == context and len(ids) > len(context)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            expected = sum(float(logp[j - 1, ids[j]]) for j in range(len(context), len(ids)))
            assert p["base"]["logprobs"][label] == pytest.approx(expected, abs=1e-4)


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
    assert {"acc", "acc_norm", "gen_strict", "gen_flexible"} <= set(summary["metrics"][0])
    # nothing configured: one actor (two records make one batch) with the free CPUs and as
    # many threads, stated in the summary
    pool = summary["resources"]
    assert pool["actors"] == 1 and pool["gpus_per_actor"] == 0
    assert pool["threads_per_actor"] == math.ceil(pool["cpus_per_actor"]) >= 1
    assert (tmp_path / "rep" / "report.html").exists()
