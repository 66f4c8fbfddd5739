"""Ray Train LoRA fine-tuning with the tiny random Llama: DDP on 2 CPU workers, checkpoints on
the moto S3 server, a worker killed mid-run, and each budget stopping the run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from rebase_ray.config import Resources, TaskConfig, TrainConfig
from rebase_ray.formats import EXPLAIN
from rebase_ray.models import TINY, load_tokenizer
from rebase_ray.storage import Storage
from rebase_ray.train import train_student
from rebase_ray.train.data import IGNORE, collate, encode
from rebase_ray.train.stage import HEALTH_CHECK_S

WORDS = [("cat", "yes"), ("dog", "yes"), ("table", "no"), ("car", "no"), ("cow", "yes"),
         ("rock", "no"), ("fish", "yes"), ("chair", "no")]
TASK = TaskConfig(name="animals", instruction="Is it an animal? Answer yes or no.",
                  examples=[{"input": "cat", "output": "yes"}], labels=["yes", "no"],
                  answer="label")


def examples_table() -> pa.Table:
    return pa.Table.from_pylist(
        [{"input": f"Is a {w} an animal?", "output": a, "rationale": f"A {w} is what it is.",
          "domain": a} for w, a in WORDS]
        + [{"input": "", "output": "yes", "rationale": None, "domain": "yes"}])  # rejected


def tiny(workers: int | None = None, threads: int | None = None, **kw) -> TrainConfig:
    base = {"model": TINY, "batch_size": 2, "learning_rate": 2e-2, "epochs": 100,
            "resources": Resources(actors=workers, cpus=0.5, threads=threads),
            "checkpoint_every": 4}
    return TrainConfig(**{**base, **kw})


def test_encode_masks_prompt_and_rejects_empty_rows():
    tok = load_tokenizer(TINY)
    rows = examples_table().to_pylist()
    data, rejects, truncated = encode(rows, TASK.instruction, tok, max_seq_len=512,
                                      rationale="inline")
    assert len(data) == 8 and truncated == 0
    assert rejects == [{"index": 8, "reason": "empty input or output", "input": "",
                        "output": "yes"}]
    _, mask, labels = collate(data[:2], tok.pad_token_id)
    answer = tok.decode(labels[0][labels[0] != IGNORE])
    assert answer.startswith("A cat is what it is.\nAnswer: yes")
    assert "Is a cat" not in answer  # the prompt is not learned
    assert int(mask[0].sum()) == len(data[0]["input_ids"])
    short, _, cut = encode(rows[:1], TASK.instruction, tok, max_seq_len=24, rationale="inline")
    assert cut == 1 and len(short[0]["input_ids"]) == 24


def test_encode_multitask_teaches_the_answer_and_the_rationale_apart():
    """Distilling step-by-step: an example with a rationale gives two sequences, the plain
    prompt → the bare answer (what the log-likelihood evaluation asks) and the prompt asking
    for an explanation → rationale + answer; one without a rationale gives one."""
    tok = load_tokenizer(TINY)
    rows = examples_table().to_pylist()[:2] + [{"input": "Is a rock an animal?",
                                                "output": "no", "rationale": ""}]
    data, rejects, _ = encode(rows, TASK.instruction, tok, max_seq_len=512)
    assert len(data) == 5 and not rejects
    _, _, labels = collate(data, tok.pad_token_id)
    answers = [tok.decode(row[row != IGNORE]) for row in labels]
    prompts = [tok.decode(d["input_ids"][: d["n_prompt"]]) for d in data]
    assert answers[0].startswith("yes") and EXPLAIN not in prompts[0]
    assert answers[1].startswith("A cat is what it is.\nAnswer: yes") and EXPLAIN in prompts[1]
    assert answers[4].startswith("no") and EXPLAIN not in prompts[4]


def recorder(folder: Path, kill_after: int | None = None):
    """An `on_step` hook that writes the sequences of each worker's batch to
    `folder/<step>-<rank>`; with `kill_after`, rank 1 then dies once right after that step."""
    marker = folder / "killed"

    def on_step(step: int, rank: int, seqs: list[int]) -> None:
        (folder / f"{step}-{rank}").write_text(" ".join(map(str, seqs)))
        if step == kill_after and rank == 1 and not marker.exists():
            marker.write_text("x")
            # the controller registers reported checkpoints when it polls the workers, every
            # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: the driver's, HEALTH_CHECK_S unless set there
            # (this worker's environment, inherited from the raylet, need not have it)
            poll_s = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_S))
            time.sleep(max(1.0, 1.5 * poll_s))
            os._exit(1)

    folder.mkdir(parents=True, exist_ok=True)
    return on_step


def batches_seen(folder: Path) -> dict[tuple[int, int], list[int]]:
    """{(step, rank): the sequences of that worker's batch} written by `recorder`."""
    return {tuple(map(int, f.name.split("-"))): list(map(int, f.read_text().split()))
            for f in folder.iterdir() if "-" in f.name}


# 2 workers: 16 sequences are 8 a worker, 4 steps an epoch at batch 2; no dropout, so that an
# interrupted run can match an uninterrupted one step for step
TWO_WORKERS = {"workers": 2, "max_steps": 12, "checkpoint_every": 3,
               "lora": {"dropout": 0.0}}


@pytest.fixture(scope="module")
def killed_run(ray_cluster, s3_server, tmp_path_factory) -> tuple[dict, str, Path]:
    """(summary, out, recorder folder) of a 2-worker run on S3 whose rank 1 dies once right
    after step 5 (the checkpoint is at step 3, in the middle of the first epoch)."""
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server},
                     skip_instance_cache=True).mkdir("test-killed-run")
    folder = tmp_path_factory.mktemp("killed")
    out = "s3://test-killed-run/run"
    summary = train_student(examples_table(), TASK, tiny(**TWO_WORKERS), out,
                            on_step=recorder(folder, kill_after=5))
    return summary, out, folder


@pytest.mark.slow
def test_two_workers_on_s3_survive_a_killed_worker(killed_run, tmp_path):
    """2 gloo workers, run storage on S3; rank 1 dies once right after step 5 (the checkpoint
    is at step 3): the group restarts from step 3 and finishes all 12 steps; loss falls."""
    summary, out, folder = killed_run
    assert (folder / "killed").exists()
    assert summary["restarts"] == 1
    assert summary["steps"] == 12 and summary["stop_reason"] == "max_steps"
    assert [s for s, _ in summary["loss_curve"]] == list(range(1, 13))  # resumed at step 4
    losses = [v for _, v in summary["loss_curve"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.15
    assert summary["rejected"] == 1 and summary["examples_used"] == 8

    st = Storage.for_uri(out)
    assert st.ls(f"{out}/checkpoints", "checkpoint_*")  # Ray Train wrote to the S3 server
    assert st.exists(f"{out}/train_rejects.jsonl")
    assert st.read_json(f"{out}/train_summary.json")["steps"] == 12

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rebase_ray.models import resolve

    local = st.download_dir(f"{out}/adapter", str(tmp_path / "adapter"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve(TINY)), local)
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.slow
def test_workers_read_disjoint_halves_through_ray_data_and_resume_exactly(killed_run,
                                                                          tmp_path):
    """The sequences reach the workers as shards of a Ray Dataset: each epoch the 2 workers
    read disjoint halves of the 16 sequences, in a new order; the run killed after step 5
    and resumed from step 3 read the same batches and reached the same losses as a run that
    was never interrupted."""
    folder = tmp_path / "steps"
    summary = train_student(examples_table(), TASK, tiny(**TWO_WORKERS), str(tmp_path / "run"),
                            on_step=recorder(folder))
    seen = batches_seen(folder)
    assert summary["restarts"] == 0 and summary["steps"] == 12
    assert summary["examples"] == 12 * 2 * 2
    epochs = [[seen[step, rank] for step in range(4 * e + 1, 4 * e + 5) for rank in (0, 1)]
              for e in range(3)]
    for epoch in epochs:
        halves = [{s for batch in epoch[rank::2] for s in batch} for rank in (0, 1)]
        assert len(halves[0]) == len(halves[1]) == 8
        assert halves[0] | halves[1] == set(range(16))  # disjoint halves, all of them
    assert epochs[0] != epochs[1] != epochs[2]  # a new order every epoch

    killed, _, killed_folder = killed_run
    assert batches_seen(killed_folder) == seen  # the resumed run skipped what it had done
    assert killed["tokens"] == summary["tokens"]
    assert killed["examples"] == summary["examples"]
    assert [v for _, v in killed["loss_curve"]] == pytest.approx(
        [v for _, v in summary["loss_curve"]], abs=1e-4)


BUDGETS = [
    ("max_tokens", 300, lambda s: s["tokens"] >= 300 and s["steps"] < 12),
    ("max_examples", 6, lambda s: s["examples"] == 6 and s["steps"] == 3),
    ("max_wall_s", 0.01, lambda s: s["steps"] == 1),
    # 8 rows with a rationale are 16 sequences (multitask): 8 steps an epoch at batch 2
    ("epochs", 0.5, lambda s: s["steps"] == 4 and s["sequences"] == 16),
]


@pytest.fixture(scope="module")
def budget_runs(request, ray_cluster, tmp_path_factory) -> dict:
    """{budget: the summary (or the error) of a run stopped by that budget}, for the budgets
    of the tests selected. The runs go side by side, one worker of half a CPU each (all four
    fit the 2 CPUs): a run of a few steps is mostly the start-up of its processes (controller,
    worker: one core each, importing torch), which overlap."""
    from concurrent.futures import ThreadPoolExecutor

    import ray.train.torch  # noqa: F401 - imported once here, not by four threads at a time

    load_tokenizer(TINY)  # likewise transformers' lazy attributes (not thread-safe)
    wanted = {item.callspec.params["budget"] for item in request.session.items
              if getattr(item, "originalname", None) == "test_each_budget_stops_training"}

    def run(budget: str, value: float) -> dict | Exception:
        cfg = tiny(workers=1, max_steps=12, **{budget: value})
        try:
            return train_student(examples_table(), TASK, cfg,
                                 str(tmp_path_factory.mktemp(budget) / "run"))
        except Exception as e:  # noqa: BLE001 - the test of that budget raises it
            return e

    with ThreadPoolExecutor(len(BUDGETS)) as pool:
        runs = {b: pool.submit(run, b, v) for b, v, _ in BUDGETS if b in wanted}
        return {b: f.result() for b, f in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("budget, value, check", BUDGETS)
def test_each_budget_stops_training(budget_runs, budget, value, check):
    summary = budget_runs[budget]
    if isinstance(summary, Exception):
        raise summary
    assert summary["stop_reason"] == budget
    assert check(summary), summary


@pytest.mark.slow
def test_bfloat16_mixed_precision_and_threads(ray_cluster, tmp_path):
    """train.dtype bfloat16 (autocast, float32 weights) trains and saves a float32 adapter;
    resources.threads sets the worker's threads."""
    import math

    from peft.utils import load_peft_weights

    seen = tmp_path / "threads"

    def record_threads(step, rank, seqs):  # runs in the worker
        import torch

        seen.write_text(str(torch.get_num_threads()))

    cfg = tiny(max_steps=3, dtype="bfloat16", threads=2)
    summary = train_student(examples_table(), TASK, cfg, str(tmp_path / "run"),
                            on_step=record_threads)
    assert summary["steps"] == 3 and all(math.isfinite(v) for _, v in summary["loss_curve"])
    assert seen.read_text() == "2"
    weights = load_peft_weights(summary["adapter"])
    assert weights and all(str(w.dtype) == "torch.float32" for w in weights.values())
