"""The retrieve stage on real datastores (built by Ray Data with MiniLM, real FAISS), shard
actors on the session's local Ray, outputs on local files and on the moto S3 server."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from retrieve_corpus import CONTAMINATED, PLANTED, write_corpus
from typer.testing import CliRunner

from rebase_ray.config import IndexConfig, Resources, RetrieveConfig
from rebase_ray.datastore import Datastore, build_datastore
from rebase_ray.retrieve import Retriever, retrieve
from rebase_ray.storage import Storage

HITS_COLUMNS = ["task", "row_key", "dataset", "config", "split", "row_idx", "domain", "score",
                "input_score", "output_score", "dataset_score", "rank", "row",
                "best_input_column", "best_output_column"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_cluster):
    """The corpus in a 3-shard datastore (one build: one-vs-many shards is also checked on
    synthetic shards in test_retrieve_scoring.py, and here against a brute force that pools
    every cell)."""
    root = tmp_path_factory.mktemp("retrieve")
    sources, task = write_corpus(root)
    store = str(root / "store")
    build_datastore(sources, store, IndexConfig(shards=3, resources=Resources(actors=1, cpus=0.5, threads=1)))
    return root, task, store


def test_stage_ranks_planted_row_first_and_drops_contamination(corpus):
    root, task, store = corpus
    out = str(root / "out")
    summary = retrieve(task, store, out, RetrieveConfig(top_n=15))
    hits = pd.read_parquet(f"{out}/hits.parquet")
    dropped = pd.read_parquet(f"{out}/dropped.parquet")
    assert list(hits.columns) == HITS_COLUMNS
    assert len(hits) == summary["rows"] == 15
    # one shard actor per shard, at the configured CPUs, one FAISS thread each
    assert summary["resources"] == {"actors": 3, "cpus_per_actor": 0.25, "gpus_per_actor": 0,
                                    "threads_per_actor": 1}
    assert hits["rank"].tolist() == list(range(1, 16))
    assert hits["row_key"].iloc[0] == PLANTED
    assert (np.diff(hits["score"]) <= 0).all()
    np.testing.assert_allclose(
        hits["score"], (hits["input_score"] + hits["output_score"] + hits["dataset_score"]) / 3,
        atol=1e-6)
    top = hits.iloc[0]
    assert json.loads(top["row"]) == {"text": task.examples[0].input, "label": "sport"}
    assert (top["best_input_column"], top["best_output_column"]) == ("text", "label")
    assert top["domain"] == "news" and top["task"] == "news_topic"

    # decontamination: excluded sources never retrieved, their top rows and the eval-set copy
    # reported with the reason
    assert not set(hits["dataset"]) & {"bbc_copy", "news_topic_test"}
    assert CONTAMINATED not in set(hits["row_key"])
    reasons = dict(zip(dropped["row_key"], dropped["reason"]))
    assert "13-gram" in reasons[CONTAMINATED]
    assert reasons["bbc_copy/default/train/0"] == "listed in exclude_datasets"
    assert reasons["news_topic_test/default/train/0"] == "source name contains the task name"
    counts = {(d["dataset"], d["reason"]): d["rows"] for d in summary["dropped"]}
    assert counts[("headlines", reasons[CONTAMINATED])] == 1
    assert counts[("bbc_copy", "listed in exclude_datasets")] == 6
    assert {d["dataset"]: d["rows"] for d in summary["rows_per_dataset"]} == \
        hits["dataset"].value_counts().to_dict()
    assert summary["score"]["max"] == pytest.approx(float(hits["score"].max()))

    st = Storage.for_uri(out)
    st.verify(out)
    assert retrieve(task, store, out, RetrieveConfig(top_n=15))["skipped"] is True
    assert "skipped" not in retrieve(task, store, out, RetrieveConfig(top_n=14))


def reference_scores(store_uri: str, task) -> pd.DataFrame:
    """Brute force over every cell of every shard, with the paper's formula written out: the
    cosine of each cell to each few-shot example, averaged over examples, max over cells."""
    store = Datastore.open(store_uri)
    cells = pd.concat([store.load_cells(i).to_pandas() for i in range(store.num_shards)])
    v = np.concatenate([np.asarray(store.load_vectors(i)) for i in range(store.num_shards)])
    v = v.astype(np.float64)
    texts = [task.instruction, *[e.input for e in task.examples],
             *[e.output for e in task.examples]]
    q = store.embed(texts).astype(np.float64)
    k = len(task.examples)
    cos = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (
        q / np.linalg.norm(q, axis=1, keepdims=True)).T
    cells["in"] = cos[:, 1:1 + k].mean(axis=1)
    cells["out"] = cos[:, 1 + k:].mean(axis=1)
    src = store.sources().to_pandas()
    desc = np.stack(src["vector"].map(np.asarray)).astype(np.float64)
    ds = dict(zip(src["name"], desc @ q[0] / np.linalg.norm(desc, axis=1) / np.linalg.norm(q[0])))
    cells["row_key"] = (cells["dataset"] + "/" + cells["config"] + "/" + cells["split"] + "/"
                        + cells["row_idx"].astype(str))
    rows = cells.groupby("row_key").agg(dataset=("dataset", "first"), input_score=("in", "max"),
                                        output_score=("out", "max"))
    rows["dataset_score"] = rows["dataset"].map(ds)
    rows["score"] = (rows["input_score"] + rows["output_score"] + rows["dataset_score"]) / 3
    return rows.sort_values("score", ascending=False)


def test_scores_and_ranking_equal_brute_force(corpus):
    _, task, store = corpus
    ref = reference_scores(store, task)
    retriever = Retriever(store, RetrieveConfig(top_n=40, candidates_per_query=2, exact=True))
    try:
        assert len(retriever.shard_info) == 3
        q = retriever.query(task.instruction, [e.input for e in task.examples],
                            [e.output for e in task.examples])
        hits = pd.DataFrame(retriever.search(q).hits)
        # exact: each shard finds 5 cells per query vector at first (k is at least top_n),
        # then more until no row left unfound can beat the 5th row kept
        few = pd.DataFrame(retriever.search(q, top_n=5).hits)
    finally:
        retriever.close()
    assert len(hits) == 40
    expected = ref.loc[hits["row_key"]]
    for col in ("input_score", "output_score", "dataset_score", "score"):
        np.testing.assert_allclose(hits[col], expected[col], atol=1e-5)
    # the 3 shards rank like one pool of every cell: same scores position by position (rows
    # with equal text tie) and the same 40 rows
    np.testing.assert_allclose(hits["score"], ref["score"].iloc[:40], atol=1e-5)
    assert set(hits["row_key"]) == set(ref.index[:40])
    np.testing.assert_allclose(few["score"], ref["score"].iloc[:5], atol=1e-5)


def test_diversity_and_cap_options(corpus):
    _, task, store = corpus
    retriever = Retriever(store, RetrieveConfig(top_n=10, per_dataset_cap=4, diversity=True))
    try:
        q = retriever.query(task.instruction, [e.input for e in task.examples],
                            [e.output for e in task.examples])
        hits = pd.DataFrame(retriever.search(
            q, exclude={"bbc_copy": "test", "news_topic_test": "test"}).hits)
    finally:
        retriever.close()
    # two datasets left after the exclusions, at most 4 rows each: 8 < top_n rows
    assert hits["dataset"].value_counts().to_dict() == {"headlines": 4, "chat_qa": 4}
    assert hits["row_key"].iloc[0] == PLANTED  # MMR's first pick is the best row


def test_diversity_weight_changes_the_order(corpus):
    """MMR at weight 1 is the relevance order; a lower weight trades relevance for novelty,
    so a less relevant row comes before a more relevant one (the first pick stays the best)."""
    _, task, store = corpus
    retriever = Retriever(store, RetrieveConfig(top_n=10))
    scores = {}
    try:
        q = retriever.query(task.instruction, [e.input for e in task.examples],
                            [e.output for e in task.examples])
        for name, extra in {"plain": {}, "w1": {"diversity": True, "diversity_weight": 1.0},
                            "w0.3": {"diversity": True, "diversity_weight": 0.3}}.items():
            retriever.cfg = RetrieveConfig(top_n=10, **extra)
            scores[name] = [h for h in pd.DataFrame(retriever.search(q).hits)["score"]]
    finally:
        retriever.close()
    np.testing.assert_allclose(scores["w1"], scores["plain"], atol=1e-6)
    assert scores["w0.3"][0] == pytest.approx(scores["plain"][0])
    assert any(b > a + 1e-6 for a, b in zip(scores["w0.3"], scores["w0.3"][1:]))


def test_cli_writes_to_s3(corpus, s3_bucket):
    root, task, store = corpus
    task_file = root / "task.yaml"
    task_file.write_text(yaml.safe_dump(task.model_dump(mode="json")))
    out = f"{s3_bucket}/hits"
    result = CliRunner().invoke(__import__("rebase_ray.cli", fromlist=["app"]).app, [
        "retrieve", str(task_file), "--datastore", store, "--out", out, "--top", "5",
        "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"] == 5
    st = Storage.for_uri(out)
    st.verify(out)
    hits = st.read_parquet(st.join(out, "hits.parquet")).to_pandas()
    assert hits["row_key"].iloc[0] == PLANTED and len(hits) == 5


def test_cli_bad_datastore_is_one_clear_error(corpus):
    root, task, _ = corpus
    task_file = root / "task.yaml"
    task_file.write_text(yaml.safe_dump(task.model_dump(mode="json")))
    from rebase_ray.cli import app

    result = CliRunner().invoke(app, ["retrieve", str(task_file), "--datastore",
                                      str(root / "nowhere"), "--out", str(root / "x")])
    assert result.exit_code == 2
    assert "no datastore" in result.output


def test_cli_tampered_datastore_is_a_short_error(corpus, tmp_path):
    """The checksums are verified in the driver before the shard actors start: a few lines
    naming the file, not an ActorDiedError traceback."""
    root, task, store = corpus
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    vectors = copy / "shards" / "shard-00001" / "vectors.npy"
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF
    vectors.write_bytes(bytes(data))
    task_file = root / "task.yaml"
    task_file.write_text(yaml.safe_dump(task.model_dump(mode="json")))
    from rebase_ray.cli import app

    result = CliRunner().invoke(app, ["retrieve", str(task_file), "--datastore", str(copy),
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    said = "".join(result.output.split())  # the console wraps long lines, even at a hyphen
    assert "shard-00001/vectors.npywasmodified" in said
    assert "ActorDiedError" not in result.output and len(result.output.splitlines()) < 10


# ----------------------------------------------------------------------------- endpoint

KEY = "test-key-123"


@pytest.fixture(scope="module")
def endpoint(corpus, serve_port):
    from rebase_ray.config import ServeConfig
    from rebase_ray.serve.retriever import local_retriever

    _, task, store = corpus
    cfg = RetrieveConfig(top_n=50, resources=Resources(cpus=0.1), serve=ServeConfig(
        port=serve_port, route_prefix="/retriever", cpus=0.25, api_key=KEY,
        max_request_bytes=4000))
    with local_retriever(store, cfg) as url:
        yield url, task


def _body(task, **extra) -> dict:
    return {"instruction": task.instruction,
            "examples": [e.model_dump() for e in task.examples], **extra}


def test_endpoint_over_http(endpoint):
    import httpx

    url, task = endpoint
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60) as http:
        health = http.get(f"{url}/healthz")
        assert health.status_code == 200 and health.json()["cells"] == 124

        assert http.post(f"{url}/retrieve", json=_body(task)).status_code == 401
        assert http.post(f"{url}/retrieve", json=_body(task),
                         headers={"Authorization": "Bearer wrong"}).status_code == 401
        bad = http.post(f"{url}/retrieve", content=b"{not json", headers=auth)
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        missing = http.post(f"{url}/retrieve", json={"instruction": "x"}, headers=auth)
        assert missing.status_code == 400 and "examples" in missing.json()["error"]["message"]
        big = http.post(f"{url}/retrieve", json=_body(task, instruction="x" * 5000),
                        headers=auth)
        assert big.status_code == 413

        # the server is still up and answers correctly after the bad requests
        ok = http.post(f"{url}/retrieve", json=_body(task, top_n=5), headers=auth)
        assert ok.status_code == 200, ok.text
        rows = ok.json()["rows"]
        assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
        assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
        for r in rows:
            assert r["score"] == pytest.approx(
                (r["input_score"] + r["output_score"] + r["dataset_score"]) / 3, abs=1e-6)

        clean = http.post(f"{url}/retrieve", headers=auth, json=_body(
            task, top_n=3, exclude_datasets=["bbc_copy", "news_topic_test"])).json()["rows"]
        assert clean[0]["row_key"] == PLANTED
        assert clean[0]["row"] == {"text": task.examples[0].input, "label": "sport"}


def test_endpoint_merges_concurrent_requests(endpoint):
    """Concurrent requests share `@serve.batch` batches (healthz counts them), and each one
    gets exactly the rows it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    url, task = endpoint
    auth = {"Authorization": f"Bearer {KEY}"}
    bodies = [_body(task, instruction=f"{task.instruction} (variant {i})", top_n=4 + i % 3)
              for i in range(12)]
    with httpx.Client(timeout=60) as http:
        alone = [http.post(f"{url}/retrieve", json=b, headers=auth).json()["rows"]
                 for b in bodies]
        before = http.get(f"{url}/healthz").json()
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda b: http.post(f"{url}/retrieve", json=b,
                                                         headers=auth).json()["rows"], bodies))
        after = http.get(f"{url}/healthz").json()
    assert after["requests"] - before["requests"] == 12
    assert after["batches"] - before["batches"] < 12
    assert [[r["row_key"] for r in rows] for rows in together] == \
        [[r["row_key"] for r in rows] for rows in alone]


def test_many_tasks_in_one_call_get_the_hits_of_single_calls(corpus, tmp_path):
    """Two tasks through `run_many` (one Retriever) and each alone through `run`: the same
    rows, scores and drops; one hits folder per task; the CLI takes several task files."""
    from rebase_ray.retrieve.stage import run, run_many

    _, task, store = corpus
    other = task.model_copy(update={"name": "headline_topic", "eval": None,
                                    "instruction": "Name the topic of a short headline."})
    cfg = RetrieveConfig(top_n=12)
    both = run_many([task, other], store, str(tmp_path / "many"), cfg)
    assert [s["task"] for s in both["tasks"]] == ["news_topic", "headline_topic"]
    assert both["startup_s"] > 0 and not any(s.get("skipped") for s in both["tasks"])
    for t in (task, other):
        run(t, store, str(tmp_path / "one" / t.name), cfg)
        for name in ("hits.parquet", "dropped.parquet"):
            many = pd.read_parquet(tmp_path / "many" / t.name / name)
            one = pd.read_parquet(tmp_path / "one" / t.name / name)
            pd.testing.assert_frame_equal(many, one)
    assert set(pd.read_parquet(tmp_path / "many" / "headline_topic" / "hits.parquet")["task"]) \
        == {"headline_topic"}
    again = run_many([task, other], store, str(tmp_path / "many"), cfg)
    assert all(s["skipped"] for s in again["tasks"]) and again["startup_s"] == 0.0

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(task.model_dump(mode="json")))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(other.model_dump(mode="json")))
    from rebase_ray.cli import app

    result = CliRunner().invoke(app, [
        "retrieve", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"), "--datastore", store,
        "--out", str(tmp_path / "many"), "--top", "12", "--json"])
    assert result.exit_code == 0, result.output
    assert [s["skipped"] for s in json.loads(result.stdout)["tasks"]] == [True, True]
