"""BalDistill end to end on real local Ray: IFD on a Ray Data actor pool against a direct
computation, the stage loop with a replay teacher (exact answers: head/tail switching, synthesis,
dropped rationales, rounds that refill the quotas, budget, resume), and the real Serve teacher
(tiny model) for the call limit."""

import itertools
import json
import random
import re
import zlib

import pandas as pd
import pytest
from replay_teacher import ReplayTeacher

from rebase_ray.config import (
    DistillConfig,
    EvalSetConfig,
    EvaluateConfig,
    FewShot,
    LoraConfig,
    Resources,
    ServeConfig,
    TaskConfig,
    TeacherConfig,
    TrainConfig,
)
from rebase_ray.distill import distill, score_ifd
from rebase_ray.models import TINY
from rebase_ray.storage import open_storage

INSTRUCTION = "Say whether the review is positive or negative."
WORDS = ["river", "apple", "stone", "cloud", "violin", "paper", "garden", "engine", "silver",
         "forest", "ladder", "candle", "harbor", "pepper", "window", "meadow", "rocket",
         "velvet", "lantern", "desert", "orbit", "castle", "pillow", "thunder", "marble",
         "coffee", "bridge", "island", "mirror", "feather", "tunnel", "saddle"]


def task(eval_path=None) -> TaskConfig:
    return TaskConfig(
        name="reviews", instruction=INSTRUCTION, labels=["pos", "neg"], answer="label",
        cot="annotate",
        examples=[FewShot(input="I loved every minute of it.", output="pos")],
        eval=EvalSetConfig(path=eval_path, input="text", output="label", domain="topic")
        if eval_path else None)


def words(seed: int, n: int = 8) -> str:
    return " ".join(random.Random(seed).sample(WORDS, n))


def pool(sizes: dict[str, int]) -> pd.DataFrame:
    """A long-tailed pool; domain c's single example gets a rationale that disagrees."""
    rows = []
    for domain, n in sizes.items():
        for i in range(n):
            text = f"{domain} review {i}: " + words(zlib.crc32(f"{domain}{i}".encode()))
            if domain == "c":
                text += " DISAGREE"
            rows.append({"example_id": f"{domain}{i}", "dataset": domain, "input": text,
                         "output": "pos" if i % 2 == 0 else "neg", "rationale": ""})
    return pd.DataFrame(rows)


SYNTH_COUNTER = itertools.count()


def replay(prompt: str) -> str:
    """Rationales end with the gold answer (the other label for DISAGREE inputs); syntheses
    are new, valid examples with distinct words."""
    gold = re.search(r"Correct answer: (\w+)", prompt)
    if gold:
        answer = gold.group(1)
        if "DISAGREE" in prompt:
            answer = "neg" if answer == "pos" else "pos"
        return f"The review's tone decides it.\nAnswer: {answer}"
    domain = re.search(r"Domain: (\w+)", prompt).group(1)
    return json.dumps({"input": f"synthetic {domain}: {words(next(SYNTH_COUNTER), 10)}",
                       "output": "It sounds happy.\nAnswer: pos"})


HALF = Resources(actors=1, cpus=0.5, threads=1)  # one actor beside the replay teacher


def configs(stages=2, budget=12, mode="balanced", **distill):
    return (DistillConfig(stages=stages, budget=budget, mode=mode, ifd_candidates=2,
                          ifd_batch_size=4, ifd_max_new_tokens=4, ifd_resources=HALF,
                          max_tokens=64, concurrency=4, synth_shots=2, **distill),
            TrainConfig(model=TINY, max_steps=2, batch_size=2, max_seq_len=128,
                        resources=HALF, lora=LoraConfig(r=2, alpha=4)),
            EvaluateConfig(batch_size=4, max_new_tokens=4, resources=HALF))


def test_ifd_matches_a_direct_computation(ray_cluster):
    import torch

    from rebase_ray.formats import student_messages
    from rebase_ray.models import load_causal_lm

    inputs = ["short one", "a somewhat longer review of the film and its music",
              "great", "terrible acting, awful plot, and a very long ending that never ends"]
    frame = pd.DataFrame({"example_id": list("wxyz"), "domain": "d", "input": inputs})
    # float32 on both sides: "auto" is bfloat16 on a CPU with native bfloat16, where a padded
    # batch and a single row would differ by more than the tolerance
    scored, pool = score_ifd(frame, TINY, None, INSTRUCTION, batch_size=4, max_new_tokens=5,
                             resources=Resources(actors=1, cpus=0.5), dtype="float32")
    assert pool["actors"] == 1 and pool["cpus_per_actor"] == 0.5
    assert pool["model_loads"] in (0, 1)  # one batch: loaded, or kept from an earlier test
    assert list(scored["example_id"]) == list("wxyz")

    model, tok = load_causal_lm(TINY, dtype="float32")
    for row in scored.itertuples():
        prompt = tok.apply_chat_template(student_messages(INSTRUCTION, row.input),
                                         add_generation_prompt=True, tokenize=False)
        p = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=5,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        answer = tok.decode(gen[0, p.shape[1]:], skip_special_tokens=True)
        assert answer == row.student_output

        def ppl(context: str, answer=answer) -> float:
            # the answer's tokens are split from the context's as lm-evaluation-harness does
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            ids = tok(context + answer, add_special_tokens=False)["input_ids"]
            labels = torch.tensor([ids])
            labels[:, : len(ctx)] = -100
            with torch.no_grad():
                return float(torch.exp(model(input_ids=torch.tensor([ids]), labels=labels).loss))

        conditional, alone = ppl(prompt), ppl(tok.bos_token)
        assert row.ppl_conditional == pytest.approx(conditional, rel=1e-4)
        assert row.ppl_alone == pytest.approx(alone, rel=1e-4)
        assert row.ifd == pytest.approx(conditional / alone, rel=1e-4)


@pytest.fixture(scope="module")
def replay_run(ray_cluster, tmp_path_factory):
    """One 2-stage run: a (8 examples), b (3), c (1); balanced, B=12 → 2 per domain per stage.
    Stage 1: a, b head; c tail (its one example, whose rationale is dropped, + 1 synthesis;
    round 2 synthesizes the one still missing). Stage 2: a head; b runs dry (1 left + 1
    synthesis); c all synthesized (2)."""
    tmp = tmp_path_factory.mktemp("distill")
    eval_path = tmp / "eval.jsonl"
    eval_path.write_text("".join(json.dumps({"text": f"eval {d} {words(900 + i)}",
                                             "label": "pos", "topic": d}) + "\n"
                                 for i, d in enumerate("abc")))
    out = str(tmp / "out")
    with ReplayTeacher(replay) as teacher:
        summary = distill(task(str(eval_path)), pa_table(pool({"a": 8, "b": 3, "c": 1})), out,
                          *configs(), teacher_url=teacher.url)
        calls = len(teacher.chat_requests())
    return {"summary": summary, "out": out, "calls": calls, "eval": str(eval_path)}


def pa_table(frame):
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False)


def rows_of(summary, stage):
    return {r["domain"]: r for r in summary["domains"] if r["stage"] == stage}


def test_head_tail_switching_and_synthesis(replay_run):
    s = replay_run["summary"]
    one, two = rows_of(s, 1), rows_of(s, 2)
    assert {d: r["role"] for d, r in one.items()} == {"a": "head", "b": "head", "c": "tail"}
    assert {d: r["role"] for d, r in two.items()} == {"a": "head", "b": "tail", "c": "tail"}
    assert all(r["quota"] == 2 for r in [*one.values(), *two.values()])
    # the unused pool at the start of each stage
    assert {d: r["pool_left"] for d, r in one.items()} == {"a": 8, "b": 3, "c": 1}
    assert {d: r["pool_left"] for d, r in two.items()} == {"a": 6, "b": 1, "c": 0}
    # tail: the rest of the pool is annotated, synthesis fills the quota
    assert (two["b"]["selected"], two["b"]["synthesized"]) == (1, 1)
    assert (two["c"]["selected"], two["c"]["synthesized"]) == (0, 2)
    # c's pool example has a disagreeing rationale: dropped (its call counts), and a second
    # round synthesizes the example it left missing
    assert (one["c"]["selected"], one["c"]["synthesized"]) == (1, 2)
    assert (one["c"]["kept"], one["c"]["dropped"]) == (2, 1)
    assert all(r["kept"] == r["quota"] for r in [*one.values(), *two.values()])
    assert [(r["kept"], r["calls"], r["rounds"]) for r in s["stages"]] == [(6, 7, 2), (6, 6, 1)]
    # each stage states its IFD scorers' resources (the configured ones here)
    ifd = [dict(r["ifd_resources"]) for r in s["stages"]]
    # stage 2's IFD finds the student that stage 1's IFD and evaluation left in the worker,
    # after stage 1's training (`generation.resident`, `runtime.KEEP_IDLE_WORKERS`)
    assert [r.pop("model_loads") for r in ifd][1] == 0
    assert ifd[0] == {"actors": 1, "cpus_per_actor": 0.5, "gpus_per_actor": 0,
                      "threads_per_actor": 1}
    # stage 2 trains on everything gathered so far, and on the task's one few-shot example
    assert s["task_examples"] == 1
    assert [r["examples"] for r in s["stages"]] == [7, 13]

    st, out = open_storage(replay_run["out"])
    c1 = st.read_parquet(st.join(out, "stage-1", "calls.parquet")).to_pandas()
    c2 = st.read_parquet(st.join(out, "stage-2", "calls.parquet")).to_pandas()
    c_calls = c1[c1["domain"] == "c"]
    assert c_calls["status"].tolist() == ["rejected", "kept", "kept"]
    assert c_calls["round"].tolist() == [1, 1, 2]
    assert c_calls["reason"].iloc[0] == "rationale_disagrees"
    annotated = lambda c: set(c.loc[c["kind"] == "annotate", "example_id"])
    assert not annotated(c1) & annotated(c2)  # an example is never annotated twice
    synth = c2[c2["kind"] == "synthesize"]
    assert (synth["status"] == "kept").all() and synth["input"].str.startswith("synthetic").all()
    # head selection is the top of the IFD ranking of the scored candidates
    ifd = st.read_parquet(st.join(out, "stage-1", "ifd.parquet")).to_pandas()
    for _, g in ifd.groupby("domain"):
        assert g["selected"].sum() == 2
        assert g.loc[g["selected"], "ifd"].min() >= g.loc[~g["selected"], "ifd"].max()
    examples = st.read_parquet(st.join(out, "stage-2", "examples.parquet")).to_pandas()
    fewshot = examples[examples["origin"] == "task"]
    assert fewshot[["input", "output", "stage"]].values.tolist() == [
        ["I loved every minute of it.", "pos", 0]]
    distilled = examples[examples["origin"] != "task"]
    assert (distilled["rationale"] != "").all() and set(distilled["output"]) <= {"pos", "neg"}


def test_budget_is_spent_exactly_and_never_exceeded(replay_run):
    s = replay_run["summary"]
    assert s["spent"] == 12 and s["remaining"] == 0 and replay_run["calls"] == s["calls"] == 13
    assert [(r["spent"], r["remaining"]) for r in s["stages"]] == [(6, 6), (6, 0)]
    assert s["long_tail"]["counts"] == {"a": 8, "b": 3, "c": 1}
    assert s["long_tail"]["imbalance_ratio"] == 8.0
    # each stage trained and evaluated per domain; the curve has the base model and 2 stages
    assert all(r["train_steps"] == 2 for r in s["stages"])
    curves = {c["domain"]: c for c in s["curves"]}
    assert set(curves) == {"a", "b", "c", "(macro)", "(micro)"}
    assert set(curves["(macro)"]) == {"domain", "base", "stage 1", "stage 2"}
    assert s["final_adapter"].endswith("stage-2/train/adapter")
    st, out = open_storage(replay_run["out"])
    assert st.exists(st.join(out, "report.html")) and st.exists(st.join(out, "distill.json"))


def test_finished_run_costs_nothing_and_other_plans_are_refused(replay_run):
    from rebase_ray.config import ConfigError

    with ReplayTeacher(replay) as teacher:
        again = distill(task(replay_run["eval"]), pa_table(pool({"a": 8, "b": 3, "c": 1})),
                        replay_run["out"], *configs(), teacher_url=teacher.url)
        assert teacher.chat_requests() == []
    assert again["resumed_stages"] == [1, 2] and (again["spent"], again["calls"]) == (12, 13)
    assert again["curves"] == replay_run["summary"]["curves"]
    with pytest.raises(ConfigError, match="plan_hash"):
        distill(task(replay_run["eval"]), pa_table(pool({"a": 8, "b": 3, "c": 1})),
                replay_run["out"], *configs(budget=9), teacher_url="http://127.0.0.1:9/v1")


def test_budget_and_resume_on_the_real_serve_teacher(ray_cluster, serve_port, tmp_path):
    """The tiny random teacher answers noise (free text here: `structured: false`): every
    rationale disagrees and every synthesis is rejected, so nothing of the budget is spent and
    each stage asks again until its rounds or its calls run out; the endpoint sees exactly the
    calls the summary counts. B=5 over pool a (6), b (1): stage 1 (quotas a 1, b 2, 9 calls)
    asks a 1+1 candidates (its IFD ranking holds 2) and b its one example + 1, 2, 2 syntheses:
    8 calls; stage 2 (a 1, b 1, 6 calls) a 1+1, b 1+1+1: 5. Then stage 2 is lost: the rerun
    redoes stage 2 only (5 more calls), not stage 1."""
    from rebase_ray.serve.teacher import local_teacher
    from rebase_ray.teacher.client import TeacherClient

    cfg = TeacherConfig(model=TINY, max_batch_size=8,
                        serve=ServeConfig(port=serve_port, cpus=0.5, route_prefix="/distill"))
    distill_cfg, train_cfg, eval_cfg = configs(stages=2, budget=5, reply={"structured": False},
                                               task_examples=False)
    out = str(tmp_path / "out")
    st, out = open_storage(out)
    with local_teacher(cfg, name="teacher-distill") as url:
        s = distill(task(), pa_table(pool({"a": 6, "b": 1})), out, distill_cfg, train_cfg,
                    eval_cfg, teacher_url=url)
        served = TeacherClient(url).server_metrics()["requests"]
        assert served == s["calls"] == 13 and s["spent"] == 0 and s["remaining"] == 5
        assert [(r["calls"], r["call_limit"], r["rounds"]) for r in s["stages"]] == [
            (8, 9, 3), (5, 6, 3)]
        assert sum(r["kept"] for r in s["stages"]) == 0
        assert all(r["train_steps"] is None for r in s["stages"])  # nothing kept: no training
        assert s["final_adapter"] is None

        stage_one = st.read_json(st.join(out, "stage-1", "manifest.json"))
        st.delete(st.join(out, "stage-2"), recursive=True)
        again = distill(task(), pa_table(pool({"a": 6, "b": 1})), out, distill_cfg, train_cfg,
                        eval_cfg, teacher_url=url)
        assert TeacherClient(url).server_metrics()["requests"] == served + 5
    assert again["resumed_stages"] == [1] and again["calls"] == 13
    assert st.read_json(st.join(out, "stage-1", "manifest.json")) == stage_one


def test_cli_distill_on_a_finished_run(replay_run, tmp_path):
    """`rebase-ray distill PIPELINE.yaml --json` renders the run's summary (nothing to redo)."""
    import yaml
    from typer.testing import CliRunner

    from rebase_ray.cli import app

    distill_cfg, train_cfg, eval_cfg = configs()
    # no `sources` nor `datastore`: distill --examples reads neither
    pipeline = {"storage_root": str(tmp_path),
                "task": task(replay_run["eval"]).model_dump(mode="json"),
                "distill": distill_cfg.model_dump(mode="json"),
                "train": train_cfg.model_dump(mode="json"),
                "evaluate": eval_cfg.model_dump(mode="json")}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    examples = tmp_path / "pool.parquet"
    pool({"a": 8, "b": 3, "c": 1}).to_parquet(examples)
    with ReplayTeacher(replay) as teacher:
        result = CliRunner().invoke(app, ["distill", str(tmp_path / "pipeline.yaml"),
                                          "--examples", str(examples), "--out",
                                          replay_run["out"], "--teacher", teacher.url, "--json"])
        assert teacher.chat_requests() == []
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["resumed_stages"] == [1, 2]
    assert {"stage", "domain", "role", "quota", "selected", "synthesized", "kept",
            "metric"} <= set(summary["domains"][0])


def test_label_domains_synthesize_their_own_label_and_reuse_pool_rationales(ray_cluster,
                                                                          tmp_path):
    """Domains from labels, a pool with no `neg` example: `neg` is tail and its syntheses are
    asked for that label, in the prompt and in the schema (output enum ["neg"]); head `pos`
    examples that already carry a rationale (transform's annotation) are selected at no
    teacher cost."""
    rows = pool({"a": 6}).assign(output="pos", rationale="It sounds happy.")

    def answer(prompt: str) -> str:
        label = re.search(r"Its output must be: (\w+)", prompt).group(1)
        return json.dumps({"input": f"synthetic {words(next(SYNTH_COUNTER), 10)}",
                           "rationale": "It sounds sad.", "output": label})

    d, t, e = configs(stages=1, budget=4, domain_from="label")
    with ReplayTeacher(answer) as teacher:
        summary = distill(task(), pa_table(rows), str(tmp_path / "out"), d, t, e,
                          teacher_url=teacher.url)
        requests = teacher.chat_requests()
    one = rows_of(summary, 1)
    assert {k: (r["role"], r["selected"], r["synthesized"]) for k, r in one.items()} == {
        "pos": ("head", 2, 0), "neg": ("tail", 0, 2)}
    assert len(requests) == summary["calls"] == 2  # the syntheses only
    assert summary["spent"] == 4
    for body in requests:
        schema = body["response_format"]["json_schema"]["schema"]
        assert schema["properties"]["output"] == {"type": "string", "enum": ["neg"]}
        assert "Its output must be: neg" in body["messages"][-1]["content"]
    st, out = open_storage(summary["out"])
    examples = st.read_parquet(st.join(out, "stage-1", "examples.parquet")).to_pandas()
    examples = examples[examples["origin"] != "task"]
    assert sorted(examples["output"]) == ["neg", "neg", "pos", "pos"]
    assert (examples["rationale"] != "").all()


def test_cot_fewshot_from_transform_to_training_on_s3(ray_cluster, s3_bucket):
    """cot: fewshot end to end, with every artifact on the S3 server: the few-shot output
    reasons before its answer ("..., so the answer is pos"). Transform asks for examples that
    carry their own rationale (schema keys input, rationale, output) and keeps them; distill
    selects them at no teacher cost (they have their rationale) and trains on them and on the
    task's example, split into its rationale and its answer, as a generated one is."""
    import pyarrow as pa

    from rebase_ray.config import TransformConfig
    from rebase_ray.transform import transform

    fewshot = TaskConfig(name="reviews", instruction=INSTRUCTION, labels=["pos", "neg"],
                         answer="label", cot="fewshot", examples=[FewShot(
                             input="I loved every minute of it.",
                             output="The reviewer loved it, so the answer is pos")])
    moods = {"pos": "happy", "neg": "sad"}
    hits = [{"task": "reviews", "row_key": f"src/default/train/{i}", "dataset": "src",
             "config": "default", "split": "train", "row_idx": i, "domain": "chat",
             "score": 1 - i / 100, "input_score": 0.5, "output_score": 0.5,
             "dataset_score": 0.5, "rank": i + 1,
             "row": json.dumps({"text": f"row {i} {label}: {words(500 + i)}"}),
             "best_input_column": "text", "best_output_column": "text"}
            for i, label in enumerate(["pos", "neg", "pos", "neg"])]

    def answer(prompt: str) -> str:
        if prompt.startswith(INSTRUCTION):  # the label check: the input is the last turn
            return "pos" if "happy" in prompt.rsplit("\n", 1)[1] else "neg"
        row = re.search(r"row (\d+) (\w+): ([a-z ]+)", prompt)
        label = row.group(2)
        return json.dumps({"input": f"A {moods[label]} review: {row.group(3)}",
                           "rationale": f"The review sounds {moods[label]}.", "output": label})

    st, root = open_storage(f"{s3_bucket}/cot")
    st.write_parquet(st.join(root, "hits", "hits.parquet"), pa.Table.from_pylist(hits))
    d, t, e = configs(stages=1, budget=2, domain_from="label")
    with ReplayTeacher(answer) as teacher:
        made = transform(fewshot, st.join(root, "hits"), teacher.url, st.join(root, "transform"),
                         TransformConfig(concurrency=4))
        asked = teacher.chat_requests()
        summary = distill(fewshot, st.join(root, "transform"), st.join(root, "distill"), d, t, e,
                          teacher_url=teacher.url)
        assert len(teacher.chat_requests()) == len(asked)  # distill asked for nothing
    schemas = [r["response_format"]["json_schema"]["schema"] for r in asked
               if "response_format" in r]
    assert len(schemas) == 4 and all(list(s["properties"]) == ["input", "rationale", "output"]
                                     for s in schemas)
    assert made["counts"]["kept"] == 4
    assert (summary["spent"], summary["calls"]) == (2, 0)
    assert summary["stages"][0]["examples"] == 3
    trained = st.read_parquet(st.join(root, "distill", "stage-1", "examples.parquet")).to_pandas()
    own = trained[trained["origin"] == "task"].iloc[0]
    assert (own["output"], own["domain"]) == ("pos", "pos")
    assert own["rationale"].startswith("The reviewer loved it")
    others = trained[trained["origin"] != "task"]
    assert sorted(others["output"]) == ["neg", "pos"]
    assert [r.startswith("The review sounds") for r in others["rationale"]] == [True, True]
    assert summary["final_adapter"].startswith(f"{s3_bucket}/cot/distill/stage-1/train")
    assert st.exists(st.join(summary["final_adapter"], "adapter_config.json"))


MODE_QUOTAS = {
    # 6 calls a stage over pool sizes 8 / 3 / 1: proportional 4, 1.5, 0.5 → 4, 1, 1 (the unit
    # left goes to the smaller of the tied remainders)
    "random": [{"a": 4, "b": 1, "c": 1}, {"a": 4, "b": 1, "c": 1}],
    # stage 1: ½·2 + ½·(4, 1.5, 0.5) = 3, 1.75, 1.25 → 3, 2, 1; stage 2: balanced, 2 each
    "adaptive": [{"a": 3, "b": 2, "c": 1}, {"a": 2, "b": 2, "c": 2}]}


def rejecting(prompt: str) -> str:
    """A teacher whose rationales all argue the other label and whose syntheses are not
    JSON: every call is spent, nothing is kept, so no stage trains (the loop alone runs)."""
    gold = re.search(r"Correct answer: (\w+)", prompt)
    if gold:
        return f"It is the other one.\nAnswer: {'neg' if gold.group(1) == 'pos' else 'pos'}"
    return "I cannot write that."


@pytest.mark.parametrize("mode", list(MODE_QUOTAS))
def test_random_and_adaptive_quotas_drive_the_stage_loop(ray_cluster, tmp_path, mode):
    """The other two modes inside the loop: each stage's quotas are the mode's, a domain is
    head exactly when its unused pool fills its quota, and (one round) selection plus
    synthesis ask for every quota, one call each."""
    with ReplayTeacher(rejecting) as teacher:
        s = distill(task(), pa_table(pool({"a": 8, "b": 3, "c": 1})), str(tmp_path / "out"),
                    *configs(mode=mode, evaluate_stages=False, task_examples=False, rounds=1),
                    teacher_url=teacher.url)
        calls = len(teacher.chat_requests())
    for stage, want in enumerate(MODE_QUOTAS[mode], 1):
        rows = rows_of(s, stage)
        assert {d: r["quota"] for d, r in rows.items()} == want
        for r in rows.values():
            assert r["selected"] + r["synthesized"] == r["quota"]
            assert r["role"] == ("head" if r["pool_left"] >= r["quota"] else "tail")
    assert calls == s["calls"] == 12 and s["spent"] == 0 and s["remaining"] == 12
    assert {r["role"] for r in s["domains"]} == {"head", "tail"}
    assert sum(r["kept"] for r in s["stages"]) == 0  # so no stage trained
    assert all(r["train_steps"] is None for r in s["stages"])


def test_rounds_stop_at_the_stage_call_limit(ray_cluster, tmp_path):
    """A teacher that keeps nothing, B=12 over two stages, 1.5 calls per example: each stage
    may make 9 calls. Stage 1 (2 each of a, b, c) asks 6 in round 1 and 3 of round 2's 5
    (the next IFD candidates of a and b, c's syntheses); stage 2 the same, then stops."""
    with ReplayTeacher(rejecting) as teacher:
        s = distill(task(), pa_table(pool({"a": 8, "b": 3, "c": 1})), str(tmp_path / "out"),
                    *configs(evaluate_stages=False, task_examples=False, rounds=5,
                             max_calls_per_example=1.5), teacher_url=teacher.url)
        calls = len(teacher.chat_requests())
    assert [(r["calls"], r["call_limit"], r["rounds"]) for r in s["stages"]] == [
        (9, 9, 2), (9, 9, 2)]
    assert calls == s["calls"] == 18 and s["spent"] == 0
