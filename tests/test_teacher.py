"""Teacher backends without Serve: the transformers backend (tiny random model, per-row limits,
structured outputs and cancellation, a LoRA adapter made here with peft, local and on S3), the
vLLM config translation, and the Serve config."""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from rebase_ray.cli import app
from rebase_ray.config import ConfigError, TeacherConfig
from rebase_ray.generation import Constraint
from rebase_ray.models import TINY
from rebase_ray.serve.vllm_app import VLLMUnavailable, build_vllm_app, llm_config
from rebase_ray.storage import Storage
from rebase_ray.teacher.backends import TransformersBackend
from rebase_ray.teacher.types import OutputFormat, SamplingParams

CONVS = [[{"role": "user", "content": "Name a colour."}],
         [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "What is the capital of France, and why is it famous?"}]]


@pytest.fixture(scope="module")
def tiny() -> TransformersBackend:
    return TransformersBackend(TINY)


def test_batch_counts_tokens_and_honours_n_and_length(tiny):
    out = tiny.generate(CONVS, SamplingParams(temperature=0.9, max_tokens=6, n=3, seed=0))
    assert [len(choices) for choices in out] == [3, 3]
    text = tiny.lm.render(CONVS[1])
    assert out[1][0].prompt_tokens == len(tiny.lm.tokenizer(text, add_special_tokens=False)
                                          ["input_ids"])
    assert out[0][0].prompt_tokens != out[1][0].prompt_tokens  # left padding not counted
    for c in out[0] + out[1]:
        assert 1 <= c.completion_tokens <= 6
        assert c.finish_reason == ("length" if c.completion_tokens == 6 else "stop")
    assert len({c.text for c in out[0]}) > 1  # n samples, not one answer repeated


def test_seed_reproduces_each_row_and_greedy_repeats(tiny):
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=7)
    first = tiny.generate(CONVS, params)
    assert tiny.generate(CONVS, params) == first
    # per-conversation seeds override params.seed, and a row does not depend on its batch
    own = tiny.generate(CONVS, params, seeds=[3, 7])
    assert own[1] == first[1] and tiny.generate(CONVS[:1], params, seeds=[3])[0] == own[0]
    greedy = tiny.generate(CONVS[:1], SamplingParams(temperature=0, max_tokens=5, n=2))
    assert greedy[0][0] == greedy[0][1]


def test_stop_string_cuts_the_text(tiny):
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=3)
    full = tiny.generate(CONVS[:1], params)[0][0].text
    stop = full.strip()[3:6]  # a substring the model writes under this seed
    cut = tiny.generate(CONVS[:1], SamplingParams(**{**params.__dict__, "stop": (stop,)}))[0][0]
    assert cut.text == full[:full.index(stop)]
    assert cut.finish_reason == "stop"


def test_rows_keep_their_own_limit_format_and_cancel_flag(tiny):
    person = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "colour": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["name", "colour"], "additionalProperties": False}
    fmt = OutputFormat({}, Constraint.json_schema(person))
    convs = CONVS + CONVS[:1]
    out = tiny.generate(convs, SamplingParams(temperature=1.0, seed=0), max_tokens=[200, 4, 200],
                        formats=[fmt, None, None], cancelled=[None, None, lambda: True])
    (structured,), (free,), (cancelled,) = out
    assert structured.finish_reason == "stop"
    reply = json.loads(structured.text)
    jsonschema.validate(reply, person)
    assert list(reply) == ["name", "colour"]  # written in the schema's order
    assert free.completion_tokens <= 4
    assert cancelled.finish_reason == "abort" and cancelled.completion_tokens <= 1


def random_adapter(folder: Path) -> Path:
    """A peft LoRA adapter for the tiny model, saved to `folder`; init_lora_weights=False:
    random B matrices, so the adapter really changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rebase_ray.models import resolve

    base = AutoModelForCausalLM.from_pretrained(resolve(TINY))
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=64, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    peft_model.save_pretrained(folder)
    return folder


def test_lora_adapter_local_and_on_s3(tiny, tmp_path, s3_bucket):
    from peft import PeftModel

    random_adapter(tmp_path / "adapter")
    uri = f"{s3_bucket}/adapters/a1"
    Storage.for_uri(uri).upload_dir(str(tmp_path / "adapter"), uri)

    greedy = SamplingParams(temperature=0, max_tokens=8)
    plain = tiny.generate(CONVS, greedy)
    local = TransformersBackend(TINY, adapter=str(tmp_path / "adapter"))
    from_s3 = TransformersBackend(TINY, adapter=uri)
    assert isinstance(local.lm.model, PeftModel)
    assert local.generate(CONVS, greedy) != plain
    assert from_s3.generate(CONVS, greedy) == local.generate(CONVS, greedy)


@pytest.mark.slow
def test_serve_student_answers_over_http_with_its_adapter(ray_cluster, tiny, tmp_path):
    """`rebase-ray serve student --adapter A`: the base model plus the adapter behind the
    OpenAI API, over real HTTP, until Ctrl+C; its reply is the adapter's (not the base
    model's), and the summary counts the request. The CLI joins the session's Ray; Serve,
    which it starts there, is shut down here so that later modules start their own."""
    import httpx
    from conftest import free_port
    from ray import serve

    adapter = random_adapter(tmp_path / "adapter")
    greedy = SamplingParams(temperature=0, max_tokens=8)
    want = TransformersBackend(TINY, adapter=str(adapter)).generate(CONVS[:1], greedy)[0][0]
    assert want.text != tiny.generate(CONVS[:1], greedy)[0][0].text
    serve.shutdown()  # a Serve left running would keep its own port
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rebase_ray.cli", "serve", "student",
                             "--adapter", str(adapter), "--model", TINY, "--port", str(port),
                             "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # the console's lines, read as they come: Ctrl+C is sent once it says it serves (before,
    # it would interrupt the start-up, which exits 130 as an interrupted command does)
    lines: list[str] = []

    def read_console() -> None:
        for line in proc.stderr:
            lines.append(line)  # noqa: PERF402 - read while the CLI runs, line by line

    reader = threading.Thread(target=read_console, daemon=True)
    reader.start()
    try:
        deadline = time.time() + 180
        while not any("teacher at" in line for line in lines):
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.time() < deadline, "the student was not served in time"
            time.sleep(0.2)
        url = next(line for line in lines if "teacher at" in line).split()[2]
        assert url == f"http://127.0.0.1:{port}/v1"
        model = httpx.get(f"{url}/models", timeout=10).json()["data"][0]["id"]
        reply = httpx.post(f"{url}/chat/completions", timeout=60, json={
            "model": model, "messages": CONVS[0], "temperature": 0, "max_tokens": 8}).json()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        out = proc.stdout.read()  # the summary only: small enough for the pipe
        reader.join(timeout=10)
        serve.shutdown()
    err = "".join(lines)
    assert reply["choices"][0]["message"]["content"] == want.text
    assert reply["usage"]["completion_tokens"] == want.completion_tokens
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out)["metrics"]["requests"] == 1


# ----------------------------------------------------------------------------- vLLM


def test_vllm_config_translation():
    cfg = TeacherConfig(backend="vllm", model="Qwen/Qwen2.5-7B-Instruct", dtype="bfloat16",
                        max_model_len=4096, served_model_name="teacher",
                        serve={"gpus": 2, "min_replicas": 1, "max_replicas": 4,
                               "target_ongoing_requests": 32})
    assert llm_config(cfg) == {
        "model_loading_config": {"model_id": "teacher", "model_source": "Qwen/Qwen2.5-7B-Instruct"},
        "engine_kwargs": {"tensor_parallel_size": 2, "dtype": "bfloat16", "max_model_len": 4096},
        "deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4,
                                                     "target_ongoing_requests": 32}},
    }
    with pytest.raises(ConfigError, match="teacher.model"):
        llm_config(TeacherConfig(backend="vllm"))  # the bundled default is not for vLLM
    with pytest.raises(ConfigError, match="teacher.adapter"):
        llm_config(TeacherConfig(backend="vllm", model="m", adapter="s3://b/a"))


def test_vllm_missing_is_a_clear_error(monkeypatch):
    # Here vLLM is absent for real; hide ray.serve.llm too so the test holds where it exists.
    real_import = builtins.__import__

    def no_llm(name, *args, **kwargs):
        if name.startswith(("ray.serve.llm", "vllm")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llm)
    with pytest.raises(VLLMUnavailable, match=r"rebase-ray\[gpu\]"):
        build_vllm_app(TeacherConfig(backend="vllm", model="Qwen/Qwen2.5-0.5B-Instruct"))
    assert "vllm" not in sys.modules  # importing the backend module did not import vLLM


# ----------------------------------------------------------------------------- Serve config


def test_print_config_is_a_deployable_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from rebase_ray.serve.teacher import app_builder

    res = CliRunner().invoke(app, ["serve", "teacher", "--print-config", "--model", TINY,
                                   "--port", "9000", "--max-batch-size", "16",
                                   "--route-prefix", "/teacher"])
    assert res.exit_code == 0, res.output
    conf = yaml.safe_load(res.stdout)
    ServeDeploySchema.model_validate(conf)  # what `serve deploy` and KubeRay accept
    assert conf["http_options"]["port"] == 9000
    (application,) = conf["applications"]
    assert application["import_path"] == "rebase_ray.serve.teacher:app_builder"
    assert application["route_prefix"] == "/teacher"
    assert application["args"]["max_batch_size"] == 16
    built = app_builder(application["args"])
    assert type(built).__name__ == "Application"

    res = CliRunner().invoke(app, ["serve", "teacher", "--print-config", "--backend", "vllm",
                                   "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--num-gpus", "1"])
    assert res.exit_code == 0, res.output
    (application,) = yaml.safe_load(res.stdout)["applications"]
    assert application["import_path"] == "ray.serve.llm:build_openai_app"
    assert application["args"]["llm_configs"][0]["engine_kwargs"] == {"tensor_parallel_size": 1}

    res = CliRunner().invoke(app, ["serve", "teacher", "--print-config", "--max-batch-size", "0"])
    assert res.exit_code == 2 and "max_batch_size" in res.output


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_print_config_leaves_every_secret_out(tmp_path, backend):
    """The printed config is pasted into manifests: neither the client key (teacher.api_key)
    nor the server key (teacher.serve.api_key) may appear in it."""
    (tmp_path / "task.yaml").write_text("name: t\ninstruction: Say hi.\n"
                                        "examples: [{input: hello, output: hi}]\n")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({
        "task": "task.yaml", "storage_root": str(tmp_path),
        "teacher": {"backend": backend, "api_key": "sk-client-7f3a", "model": (
            "Qwen/Qwen2.5-0.5B-Instruct" if backend == "vllm" else TINY),
                    "serve": {"api_key": "sk-server-9b1c"}}}))
    res = CliRunner().invoke(app, ["serve", "teacher", "--print-config", "--config",
                                   str(tmp_path / "pipeline.yaml")])
    assert res.exit_code == 0, res.output
    assert "sk-client" not in res.stdout and "sk-server" not in res.stdout
    assert "max_batch_size" in res.stdout or "llm_configs" in res.stdout


def test_teacher_client_key_is_the_served_key_for_a_local_teacher(monkeypatch):
    from rebase_ray.serve.http import teacher_client_key

    monkeypatch.delenv("REBASE_RAY_API_KEY", raising=False)
    served = TeacherConfig(serve={"api_key": "server"})
    assert teacher_client_key(served, local=True) == "server"
    assert teacher_client_key(served, local=False) is None  # an endpoint elsewhere: its own
    both = TeacherConfig(api_key="client", serve={"api_key": "server"}, url="http://x/v1")
    assert teacher_client_key(both, local=False) == "client"
    assert teacher_client_key(TeacherConfig(api_key="client"), local=True) is None  # as served
    monkeypatch.setenv("REBASE_RAY_API_KEY", "env")
    assert teacher_client_key(TeacherConfig(), local=True) == "env"
