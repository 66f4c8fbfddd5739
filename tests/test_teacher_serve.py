"""The teacher on Ray Serve over real HTTP on 127.0.0.1 (tiny random model, 0.5 CPU per
replica): the official openai client, dynamic batching, structured outputs (schemas, choices,
free rows in one batch), auth, bad-input codes and the max_tokens cap, timeouts and client
disconnects stopping generation, the TeacherClient's budget and retries, and a replica killed
mid-run."""

from __future__ import annotations

import json
import threading
import time

import httpx
import jsonschema
import openai
import pytest

from rebase_ray.config import TeacherConfig
from rebase_ray.generation import Constraint
from rebase_ray.models import SMOLLM2, TINY
from rebase_ray.serve.teacher import local_teacher
from rebase_ray.teacher.client import BudgetExceeded, TeacherClient
from rebase_ray.teacher.openai_backend import OpenAIBackend
from rebase_ray.teacher.types import OutputFormat, SamplingParams

KEY = "test-key"
HELLO = [{"role": "user", "content": "Say hello."}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 20},
    "colour": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["name", "colour"], "additionalProperties": False}
ITEM = {"type": "object", "properties": {
    "count": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["count", "tags"], "additionalProperties": False}
LABELS = ["positive", "negative", "neutral"]
LONG = 2000  # tokens the tiny model takes seconds to write (it never ends on its own)


def teacher_config(port: int, **kw) -> TeacherConfig:
    serve = {"port": port, "num_cpus": 0.5, "api_key": KEY, "max_request_bytes": 20_000,
             **kw.pop("serve", {})}
    return TeacherConfig(**{"model": TINY, "max_batch_size": 8, "batch_wait_timeout_s": 0.3,
                            "serve": serve, **kw})


@pytest.fixture(scope="module")
def teacher(serve_port):
    with local_teacher(teacher_config(serve_port)) as url:
        yield url


def metrics(url: str) -> dict:
    resp = httpx.get(url[:-3] + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    resp.raise_for_status()
    return resp.json()


def schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": True}}


def test_official_openai_client_unchanged(teacher):
    client = openai.OpenAI(base_url=teacher, api_key=KEY)
    assert [m.id for m in client.models.list().data] == [TINY]
    resp = client.chat.completions.create(model=TINY, messages=HELLO, max_tokens=5, n=2,
                                          temperature=0.8, seed=1, stop=["\n\n"],
                                          response_format={"type": "json_object"})
    assert len(resp.choices) == 2
    assert all(c.message.content[0] in "{[" for c in resp.choices)  # constrained to JSON
    assert resp.usage.prompt_tokens > 0
    assert 2 <= resp.usage.completion_tokens <= 10
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)


def test_concurrent_requests_are_batched(teacher):
    before = metrics(teacher)
    client = TeacherClient(teacher, api_key=KEY, concurrency=8)
    results = client.chat_many([HELLO] * 8, max_tokens=4, temperature=0)
    assert all(not isinstance(r, Exception) for r in results), results
    after = metrics(teacher)
    assert after["requests"] - before["requests"] == 8
    assert after["batch_size_max"] > 1
    assert after["batches"] - before["batches"] < 8  # 8 requests, fewer generate calls
    assert after["tokens_per_s"] > 0 and after["queue_s_max"] > 0
    assert client.stats.completion_tokens == sum(r.completion_tokens for r in results) > 0


def test_auth_and_bad_input_codes(teacher):
    url = teacher + "/chat/completions"
    body = {"messages": HELLO, "max_tokens": 2}
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    non_ascii = {"Authorization": "Bearer clé-secrète".encode()}  # compared as bytes: not a 500
    assert httpx.post(url, json=body, headers=non_ascii).status_code == 401
    assert httpx.get(teacher + "/models").status_code == 401
    assert httpx.get(teacher[:-3] + "/healthz").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=teacher, api_key="wrong", max_retries=0).models.list()

    bad = [b"{not json", b"[1, 2]", b'{"messages": []}', b'{"max_tokens": 2}',
           b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}',
           b'{"messages": [{"role": "user", "content": "x"}], "stream": true}']
    for raw in bad:
        resp = httpx.post(url, content=raw, headers={**auth, "Content-Type": "application/json"})
        assert resp.status_code == 400, raw
        assert resp.json()["error"]["message"]

    huge = {"messages": [{"role": "user", "content": "x" * 30_000}]}
    resp = httpx.post(url, json=huge, headers=auth)
    assert resp.status_code == 413 and "20000 bytes" in resp.json()["error"]["message"]


def test_auth_is_a_dependency_of_the_keyed_routes(teacher):
    """No key or a wrong one: an OpenAI-style 401 on every keyed route; the key: 200."""
    auth = {"Authorization": f"Bearer {KEY}"}
    keyed = [("GET", teacher + "/models"), ("GET", teacher[:-3] + "/metrics"),
             ("POST", teacher + "/chat/completions")]
    for method, url in keyed:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            resp = httpx.request(method, url, headers=headers, json={})
            assert resp.status_code == 401, (method, url, headers)
            assert resp.json() == {"error": {
                "message": "missing or invalid API key (send 'Authorization: Bearer KEY')",
                "type": "authentication_error", "code": 401}}
    assert httpx.get(teacher + "/models", headers=auth).status_code == 200
    assert httpx.get(teacher[:-3] + "/metrics", headers=auth).status_code == 200


def test_typed_body_errors_are_openai_shaped_400s(teacher):
    """FastAPI validates the ChatRequest body; every failure is one 400 naming the field."""
    auth = {"Authorization": f"Bearer {KEY}"}
    resp = httpx.post(teacher + "/chat/completions", headers=auth, json={
        "messages": [{"role": "robot", "content": "x"}], "n": 0})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", 400)
    assert "body.messages.0.role" in error["message"] and "body.n" in error["message"]
    resp = httpx.post(teacher + "/chat/completions", headers={**auth, "Content-Type":
                                                              "application/json"},
                      content=b'{"messages": [')
    assert resp.status_code == 400
    assert resp.json()["error"]["message"].startswith("the body is not valid JSON")


def test_streamed_body_over_the_limit_is_413(teacher):
    """A chunked body (no Content-Length) is refused once its bytes pass max_request_bytes."""
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}]}'

    resp = httpx.post(teacher + "/chat/completions", content=chunks(), headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in resp.request.headers
    assert resp.status_code == 413
    assert resp.json()["error"] == {"message": "request body over 20000 bytes",
                                    "type": "request_too_large", "code": 413}
    small = httpx.post(teacher + "/chat/completions", content=iter([
        b'{"messages": [{"role": "user", "content": "hi"}],', b' "max_tokens": 2}']),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert small.status_code == 200, small.text


def test_budget_is_hard_and_counted_by_the_server(teacher):
    before = metrics(teacher)["requests"]
    client = TeacherClient(teacher, api_key=KEY, model=TINY, concurrency=4, max_requests=5)
    done = []
    results = client.chat_many([HELLO] * 9, progress=done.append, max_tokens=3)
    assert sum(not isinstance(r, Exception) for r in results) == 5
    assert sum(isinstance(r, BudgetExceeded) for r in results) == 4
    assert sum(done) == 9
    assert metrics(teacher)["requests"] - before == 5  # refused requests never went out
    assert (client.stats.requests, client.stats.refused, client.stats.failures) == (5, 4, 0)
    assert client.stats.http_attempts == 5


def test_sampled_schema_replies_all_validate(teacher):
    before = metrics(teacher)
    client = TeacherClient(teacher, api_key=KEY, model=TINY, concurrency=12)
    results = client.chat_many([HELLO] * 12, temperature=1.0, max_tokens=300,
                               response_format=schema_format("person", PERSON))
    assert all(not isinstance(r, Exception) for r in results), results
    assert [r.finish_reason for r in results] == ["stop"] * 12
    for r in results:
        reply = json.loads(r.text)
        jsonschema.validate(reply, PERSON)
        assert list(reply) == ["name", "colour"]  # the schema's order
    assert metrics(teacher)["structured"] - before["structured"] == 12


def test_schemas_choice_and_free_rows_share_one_generate_call(teacher):
    before = metrics(teacher)
    client = TeacherClient(teacher, api_key=KEY, model=TINY, concurrency=4)
    person, item, label, free = client.chat_many(
        [HELLO] * 4, temperature=1.0, per_request=[
            {"response_format": schema_format("person", PERSON), "max_tokens": 300},
            {"response_format": schema_format("item", ITEM), "max_tokens": 400},
            {"structured_outputs": {"choice": LABELS}, "max_tokens": 16},
            {"max_tokens": 6}])
    jsonschema.validate(json.loads(person.text), PERSON)
    jsonschema.validate(json.loads(item.text), ITEM)
    assert label.text in LABELS
    assert free.completion_tokens <= 6  # its own max_tokens in the shared call
    assert [r.finish_reason for r in (person, item, label)] == ["stop"] * 3
    after = metrics(teacher)
    assert after["requests"] - before["requests"] == 4
    assert after["batches"] - before["batches"] < 4
    grew = {int(k) for k, v in after["batch_sizes"].items()
            if v > before["batch_sizes"].get(k, 0)}
    assert max(grew) > 1  # different formats, one generate call


def test_truncated_reply_is_length_and_counted(teacher):
    before = metrics(teacher)["truncated"]
    client = TeacherClient(teacher, api_key=KEY, model=TINY)
    (reply,) = client.chat_many([HELLO], max_tokens=3,
                                response_format=schema_format("person", PERSON))
    assert reply.finish_reason == "length" and reply.completion_tokens == 3
    assert client.stats.truncated == 1
    assert metrics(teacher)["truncated"] - before == 1


def test_unsupported_formats_and_max_tokens_cap_are_400(teacher):
    client = openai.OpenAI(base_url=teacher, api_key=KEY, max_retries=0)
    negated = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
    unique = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    for schema, keyword in ((negated, "'not'"), (unique, "'uniqueItems'")):
        with pytest.raises(openai.BadRequestError, match=keyword):
            client.chat.completions.create(model=TINY, messages=HELLO, max_tokens=8,
                                           response_format=schema_format("bad", schema))
    with pytest.raises(openai.BadRequestError, match="'regex' is not supported"):
        client.chat.completions.create(model=TINY, messages=HELLO, max_tokens=8,
                                       extra_body={"structured_outputs": {"regex": "a+"}})
    with pytest.raises(openai.BadRequestError, match="limit of 2048"):
        client.chat.completions.create(model=TINY, messages=HELLO, max_tokens=2049)
    with pytest.raises(openai.BadRequestError, match="limit of 2048"):
        client.chat.completions.create(model=TINY, messages=HELLO, max_completion_tokens=4096)


def test_timeout_stops_the_row_and_is_504(serve_port):
    # one torch thread: a 1 s limit is about the replica, not about its threads spinning
    # against the other test worker's on 2 cores
    cfg = teacher_config(serve_port, batch_wait_timeout_s=0.05, serve={
        "request_timeout_s": 1.0, "route_prefix": "/quick", "threads": 1})
    with local_teacher(cfg, name="teacher-quick") as url:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        client.chat.completions.create(model=TINY, messages=HELLO, max_tokens=2)
        before = metrics(url)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model=TINY, messages=HELLO, max_tokens=LONG,
                                           temperature=0)
        assert err.value.status_code == 504
        deadline = time.monotonic() + 10
        while (after := metrics(url))["aborted"] == before["aborted"]:
            assert time.monotonic() < deadline, "the timed-out request's row kept generating"
            time.sleep(0.2)
        assert after["timeouts"] - before["timeouts"] == 1
        assert after["aborted"] - before["aborted"] == 1
        # the timed-out row stopped after about a second, far from its LONG tokens
        assert after["completion_tokens"] - before["completion_tokens"] < LONG // 2
        # and the replica answers again: retried for up to about a minute, as a 4-token answer
        # took over the 1 s limit for seconds beside a busy test worker in CI
        resp = client.with_options(max_retries=8).chat.completions.create(
            model=TINY, messages=HELLO, max_tokens=4)
        assert resp.choices[0].finish_reason == "length"


def test_client_disconnect_stops_the_row(teacher):
    before = metrics(teacher)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(teacher + "/chat/completions", timeout=1.0,
                   headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": HELLO, "max_tokens": LONG, "temperature": 0})
    deadline = time.monotonic() + 10
    while (after := metrics(teacher))["aborted"] == before["aborted"]:
        assert time.monotonic() < deadline, "the disconnected request's row kept generating"
        time.sleep(0.2)
    assert after["disconnects"] - before["disconnects"] == 1
    assert after["aborted"] - before["aborted"] == 1
    assert after["completion_tokens"] - before["completion_tokens"] < LONG // 2


def test_openai_backend_against_the_endpoint(teacher):
    backend = OpenAIBackend(TeacherClient(teacher, api_key=KEY))
    out = backend.generate([HELLO, HELLO], SamplingParams(temperature=0.7, max_tokens=3, n=2,
                                                          seed=5))
    assert [len(c) for c in out] == [2, 2]
    assert all(c.completion_tokens > 0 for choices in out for c in choices)
    # per-row max_tokens and formats reach the server as they were sent
    choice = OutputFormat({"structured_outputs": {"choice": LABELS}}, Constraint.choice(LABELS))
    (free,), (label,) = backend.generate([HELLO, HELLO], SamplingParams(temperature=1.0),
                                         max_tokens=[2, 16], formats=[None, choice])
    assert free.completion_tokens <= 2 and label.text in LABELS


def test_env_api_key_and_client_retries_server_timeouts(serve_port, monkeypatch):
    # The key comes from $REBASE_RAY_API_KEY. A request alone waits batch_wait_timeout_s
    # (60 s) for company, so the server's own timeout (0.3 s) answers 504 first; the openai
    # client retries 5xx with backoff.
    monkeypatch.setenv("REBASE_RAY_API_KEY", "env-key")
    cfg = teacher_config(serve_port, batch_wait_timeout_s=60.0, serve={
        "api_key": None, "request_timeout_s": 0.3, "route_prefix": "/slow"})
    with local_teacher(cfg, name="teacher-slow") as url:
        assert url.endswith("/slow/v1")
        assert httpx.get(url + "/models", headers={"Authorization": f"Bearer {KEY}"}
                         ).status_code == 401
        before = httpx.get(url[:-3] + "/metrics",
                           headers={"Authorization": "Bearer env-key"}).json()["timeouts"]
        client = TeacherClient(url, api_key="env-key", model=TINY, max_retries=2)
        (result,) = client.chat_many([HELLO], max_tokens=2)
        assert isinstance(result, openai.APIStatusError) and result.status_code == 504
        assert client.stats.http_attempts == 3  # the first try and two retries
        assert (client.stats.requests, client.stats.failures) == (1, 1)
        assert client.server_metrics()["timeouts"] - before == 3


def test_killed_replica_is_restarted(teacher):
    import ray

    replica = metrics(teacher)["replica"]
    # the openai client's backoff (0.5 s doubling, capped at 8 s) over 8 retries outlasts the
    # replica's restart
    client = TeacherClient(teacher, api_key=KEY, model=TINY, concurrency=2, max_retries=8)
    results: list = []
    run = threading.Thread(target=lambda: results.extend(
        client.chat_many([HELLO] * 12, max_tokens=16)))
    run.start()
    time.sleep(1.0)  # requests are in flight
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)  # the actor's name
    run.join(timeout=180)
    assert not run.is_alive(), "the client hung on the killed replica"
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors  # the requests the dead replica held were retried and answered
    assert len(results) == 12 and client.stats.failures == 0

    deadline = time.time() + 60
    while True:  # Serve notices the dead replica and starts a new one
        try:
            new = metrics(teacher)["replica"]
            if new != replica:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "Serve did not replace the killed replica"
        time.sleep(0.5)
    later = TeacherClient(teacher, api_key=KEY, model=TINY).chat_many([HELLO] * 3, max_tokens=4)
    assert all(not isinstance(r, Exception) for r in later), later


def prometheus_total(name: str, app: str) -> float:
    """A metric of one Serve app summed over its replicas, as Prometheus would scrape it from
    every node's Ray metrics export port."""
    import ray

    total = 0.0
    for node in ray.nodes():
        if node["Alive"]:
            text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
                             "/metrics", timeout=30).text
            total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith(name + "{") and f'application="{app}"' in line)
    return total


@pytest.mark.slow
def test_serve_metrics_reach_prometheus(teacher):
    """The replica's counters are Ray Serve metrics too: Ray exports them (every few seconds)
    with the app's tags, for Prometheus to add up across replicas."""
    name = "ray_rebase_teacher_requests_total"
    before = prometheus_total(name, "teacher")
    TeacherClient(teacher, api_key=KEY, model=TINY).chat_many([HELLO] * 2, max_tokens=2)
    deadline = time.monotonic() + 60
    while prometheus_total(name, "teacher") < before + 2:
        assert time.monotonic() < deadline, "the request counter never reached the export"
        time.sleep(1)
    assert prometheus_total("ray_rebase_teacher_batch_size_count", "teacher") > 0


@pytest.mark.slow
def test_smollm2_answers_and_follows_schemas(serve_port):
    cfg = TeacherConfig(model=SMOLLM2, max_batch_size=8,
                        serve={"port": serve_port, "num_cpus": 1, "route_prefix": "/smol"})
    with local_teacher(cfg, name="teacher-smol") as url:
        client = openai.OpenAI(base_url=url, api_key="unused")
        resp = client.chat.completions.create(
            model=SMOLLM2, max_tokens=24, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "paris" in resp.choices[0].message.content.lower()

        ask = [{"role": "user", "content": "Invent a person: reply with JSON giving their "
                                           "name and favourite colour."}]
        results = TeacherClient(url, model=SMOLLM2, concurrency=8).chat_many(
            [ask] * 8, temperature=1.0, max_tokens=200,
            response_format=schema_format("person", PERSON))
        assert all(not isinstance(r, Exception) for r in results), results
        assert [r.finish_reason for r in results] == ["stop"] * 8
        for r in results:
            jsonschema.validate(json.loads(r.text), PERSON)
