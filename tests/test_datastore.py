"""The datastore build on real Ray, real FAISS and the moto S3 server: exact counts for every
format, layout and checksums, rerun / incremental / resumed / forced builds (counting the work
done), a build killed while embedding, a killed embedding actor, a tampered index, and
self-retrieval of cell vectors."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data import DataContext
from ray.data._internal.execution.execution_callback import ExecutionCallback
from test_sources import CFG, EXPECTED, write_corpus
from typer.testing import CliRunner

from rebase_ray.cli import app
from rebase_ray.config import IndexConfig, Resources, SourceConfig
from rebase_ray.datastore import ChecksumError, Datastore, build_datastore, stage
from rebase_ray.datastore.embed import (
    Embedder,
    column_vectors,
    embed_dataset,
    embed_plan,
    encode_batch_size,
)
from rebase_ray.datastore.encoders import CPU_ENCODE_BATCH, GPU_ENCODE_BATCH, cpu_backend
from rebase_ray.datastore.index import with_datasets
from rebase_ray.datastore.stage import staging_key
from rebase_ray.runtime import Plan
from rebase_ray.storage import StorageError, open_storage

TOTAL_CELLS = sum(c for _, c, _ in EXPECTED.values())


def run_counter() -> type:
    """An execution callback that Ray Data (`DataContext.custom_execution_callback_classes`)
    calls as each dataset execution starts in this process: it counts them. Made in a function
    so that Ray pickles it by value with the context that its tasks receive."""

    class CountedRuns(ExecutionCallback):
        runs = 0

        def before_execution_starts(self, executor) -> None:
            CountedRuns.runs += 1

    return CountedRuns


CountedRuns = run_counter()


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("corpus")
    sources = write_corpus(root)
    out = str(root / "store")
    callbacks = DataContext.get_current().custom_execution_callback_classes
    callbacks.append(CountedRuns)
    try:
        summary = build_datastore(sources, out, CFG)
    finally:
        callbacks.remove(CountedRuns)
    return sources, out, summary


def indexed(ds: Datastore, i: int) -> np.ndarray:
    """Shard i's cells as its index holds them: [cell vector ‖ its source's coordinates in the
    shard's description basis]."""
    described = {r["name"]: np.asarray(r["vector"], np.float32) for r in ds.sources().to_pylist()}
    coords = np.stack([described[d] for d in ds.load_cells(i)["dataset"].to_pylist()])
    return with_datasets(np.asarray(ds.load_vectors(i)), coords @ ds.load_basis(i))


def test_encode_batch_size_follows_the_device_unless_set():
    cpu, gpu = Plan(1, 1.0, 0.0, 2), Plan(1, 1.0, 1.0, 2)
    assert encode_batch_size(IndexConfig(), cpu) == CPU_ENCODE_BATCH == 16
    assert encode_batch_size(IndexConfig(), gpu) == GPU_ENCODE_BATCH == 64
    assert encode_batch_size(IndexConfig(encode_batch_size=32), gpu) == 32


def _copy(out: str, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(out, dst)
    return dst


def test_build_counts_and_layout(built):
    sources, out, summary = built
    got = {s["source"]: (s["rows"], s["cells"], s["rejects"]) for s in summary["sources"]}
    assert got == EXPECTED
    assert summary["cells"] == summary["cells_embedded"] == TOTAL_CELLS
    assert summary["descriptions_embedded"] == len(sources)
    assert (summary["shards"], summary["shards_built"], summary["index"]) == (2, 2, "Flat x2")
    # the pools' resolved resources are stated: at most one build task per shard
    assert summary["resources"]["actors"] >= 1 and summary["resources"]["threads_per_actor"] >= 1
    assert 1 <= summary["build_resources"]["actors"] <= 2
    # and the backend that auto chose for this machine at the pool's thread count
    threads = summary["resources"]["threads_per_actor"]
    assert summary["backend"] == cpu_backend(CFG.embedder, threads)["backend"]
    assert summary["encode_batch_size"] == CFG.encode_batch_size == 8  # set: kept as it is
    ds = Datastore.open(out)
    m = ds.manifest
    assert (m["embedder"], m["dim"], m["metric"]) == ("bundled:minilm", 384, "ip")
    assert ds.dim == 384 and ds.num_shards == 2
    assert {n: (v["rows"], v["cells"], v["rejects"]) for n, v in m["sources"].items()} == got
    cells = [ds.load_cells(i) for i in range(ds.num_shards)]
    assert [t.num_rows for t in cells] == [ds.shard_count(i) for i in range(2)]
    assert cells[0].column_names == ["cell_id", "dataset", "config", "split", "row_idx",
                                     "column", "value"]
    keys = [{(d, r) for d, r in zip(t["dataset"].to_pylist(), t["row_idx"].to_pylist())}
            for t in cells]
    assert not keys[0] & keys[1]  # a row's cells live in one shard
    rejects = pa.parquet.read_table(os.path.join(out, "rejects.parquet"))
    assert rejects.num_rows == sum(r for _, _, r in EXPECTED.values())
    assert rejects.column_names == ["source", "location", "reason"]
    src = ds.sources()
    assert src.column_names == ["name", "description", "vector", "domain", "license", "rows",
                                "cells"]
    by_name = {r["name"]: r for r in src.to_pylist()}
    assert by_name["bigbench"]["description"] == "Answer arithmetic questions"
    assert by_name["parquet"]["domain"] == "p" and by_name["json"]["license"] == "CC0"
    assert abs(np.linalg.norm(by_name["csv"]["vector"]) - 1) < 1e-4


def test_the_build_runs_two_ray_data_passes(built):
    """Issue 21: the counting pass (`read_sources`), then one streaming pass from the files to
    the staged embeddings (parsing, cells, shard pieces, the embedding actors and the staging
    writes in one execution), with nothing materialized in between."""
    assert CountedRuns.runs == 2


def test_cell_vector_finds_its_cell_first(built):
    _, out, _ = built
    ds = Datastore.open(out)
    described = {r["name"]: np.asarray(r["vector"]) for r in ds.sources().to_pylist()}
    instruction = ds.embed(["Answer the question"])[0]
    for i in range(ds.num_shards):
        index, vectors, cells = ds.load_index(i), ds.load_vectors(i), ds.load_cells(i)
        assert vectors.dtype == np.float32 and vectors.shape == (ds.shard_count(i), 384)
        assert isinstance(vectors, np.memmap)
        # the index's dataset part: an orthonormal basis of the shard's source descriptions,
        # in which a source's coordinates give its dataset score exactly
        basis, names = ds.load_basis(i), sorted(set(cells["dataset"].to_pylist()))
        assert basis.shape == (384, len(names)) and index.d == 384 + len(names)
        np.testing.assert_allclose(basis.T @ basis, np.eye(len(names)), atol=1e-5)
        for name in names:
            np.testing.assert_allclose((described[name] @ basis) @ (basis.T @ instruction),
                                       described[name] @ instruction, atol=1e-5)
        view = indexed(ds, i)
        scores, ids = index.search(view, 4)
        for j in range(len(vectors)):  # first, or tied first with an identical value
            tied = ids[j][scores[j] >= scores[j, 0] - 1e-5]
            assert j in tied and len(set(cells["value"].take(tied).to_pylist())) == 1
        # and a query embedded with the datastore's embedder finds the same cell
        value = cells["value"][0].as_py()
        _, ids = index.search(with_datasets(ds.embed([value]), view[:1, 384:]), 1)
        assert cells["value"][int(ids[0, 0])].as_py() == value


def test_rerun_skips_and_adding_a_source_builds_only_it(built, tmp_path):
    sources, out, _ = built
    out = _copy(out, tmp_path)
    again = build_datastore(sources, out, CFG)
    assert (again["cells_embedded"], again["shards_built"], again["shards_kept"]) == (0, 0, 2)
    assert again["descriptions_embedded"] == 0
    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"text": "a brand new row"}\n{"text": "and another", "id": 7}\n')
    more = build_datastore([*sources, SourceConfig(name="extra", path=str(extra))], out, CFG)
    assert (more["cells_embedded"], more["descriptions_embedded"]) == (3, 1)
    assert (more["shards_kept"], more["shards_built"], more["shards"]) == (2, 2, 4)
    status = {s["source"]: s["status"] for s in more["sources"]}
    assert status == {**dict.fromkeys(EXPECTED, "kept"), "extra": "built"}
    ds = Datastore.open(out)
    assert sum(ds.shard_count(i) for i in range(ds.num_shards)) == TOTAL_CELLS + 3
    assert sorted(ds.sources()["name"].to_pylist()) == sorted([*EXPECTED, "extra"])


def test_interrupted_build_resumes_finished_shards(built, tmp_path):
    sources, out, _ = built
    out = _copy(out, tmp_path)
    os.remove(os.path.join(out, "manifest.json"))  # as if the run died before its manifest
    resumed = build_datastore(sources, out, CFG)
    assert (resumed["shards_resumed"], resumed["shards_built"]) == (2, 0)
    assert resumed["cells_embedded"] == 0 and resumed["cells"] == TOTAL_CELLS


# A build in another process, its embedder slowed to 0.5 s a batch so that the kill lands
# mid-embedding whatever the machine's speed; the rest is the real build (MiniLM, Ray Data).
KILLED_BUILD = """
import json, sys, time
import ray
from rebase_ray.config import IndexConfig, SourceConfig
from rebase_ray.datastore import stage
from rebase_ray.datastore.embed import Embedder, embed_dataset

class Slow(Embedder):
    def __call__(self, batch):
        time.sleep(0.5)
        return super().__call__(batch)

ray.init(address=sys.argv[1], log_to_driver=False)  # the workers have the session's environment
stage.embed_dataset = lambda ds, cfg, pool: embed_dataset(ds, cfg, pool, Slow)
stage.run([SourceConfig(**s) for s in json.loads(sys.argv[2])], sys.argv[3],
                      IndexConfig.model_validate_json(sys.argv[4]))
"""


def staged_cells(out: str) -> int:
    """Cells in the complete staged pieces of `out` (a piece being written has no footer)."""
    n = 0
    for path in glob.glob(os.path.join(out, "_staging", "*", "shard=[0-9]*", "*.parquet")):
        try:
            n += pq.read_metadata(path).num_rows
        except (OSError, ValueError):
            pass
    return n


@pytest.mark.slow
def test_build_killed_while_embedding_embeds_only_the_missing_cells(built, tmp_path):
    import ray

    sources, clean_out, _ = built
    out = str(tmp_path / "store")
    # pieces of 3 cells or fewer (9+ pieces; batch_size too, else a batch spans pieces)
    cfg = CFG.model_copy(update={"piece_cells": 3, "batch_size": 3})
    args = [ray.get_runtime_context().gcs_address,
            json.dumps([s.model_dump(mode="json") for s in sources]), out,
            cfg.model_dump_json()]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while staged_cells(out) < 6:  # two pieces or more: then SIGKILL
            assert proc.poll() is None, f"the build ended before it was killed: {proc.stderr.read()}"
            assert time.time() < deadline, "no embedded piece was staged in time"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # Ray ends the dead driver's embedding actor and tasks; wait for their CPUs to be back so
    # that no late piece lands while the rerun reads the staging folder
    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.time() < deadline, "the killed build's workers hold their CPUs"
        time.sleep(0.2)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    pieces = sorted(glob.glob(os.path.join(out, "_staging", "*", "shard=[0-9]*", "*.parquet")))
    assert staged_cells(out) >= 6 and len(pieces) >= 2
    cut = pieces[0]  # as if the kill had landed while this piece was written
    with open(cut, "r+b") as fh:
        fh.truncate(os.path.getsize(cut) // 2)
    on_disk = staged_cells(out)
    assert 3 <= on_disk < TOTAL_CELLS

    resumed = build_datastore(sources, out, CFG)
    assert resumed["cells_reused"] == on_disk  # every complete piece, nothing else
    assert resumed["cells_embedded"] == TOTAL_CELLS - on_disk
    assert (resumed["cells"], resumed["shards_built"]) == (TOTAL_CELLS, 2)
    assert not os.path.exists(os.path.join(out, "_staging"))

    clean, ds = Datastore.open(clean_out), Datastore.open(out)
    assert ds.num_shards == clean.num_shards == 2
    names = ["name", "description", "rows", "cells"]
    assert ds.sources().select(names).equals(clean.sources().select(names))
    np.testing.assert_allclose(ds.sources()["vector"].to_pylist(),
                               clean.sources()["vector"].to_pylist(), atol=1e-5)
    queries = clean.embed(["what is the capital", "alpha beta", "a story about money"])
    instruction = clean.embed(["Answer the question"])[0]
    for i in range(2):
        cells = ds.load_cells(i)
        assert cells.equals(clean.load_cells(i))  # same cells in the same (FAISS id) order
        np.testing.assert_allclose(ds.load_vectors(i), clean.load_vectors(i), atol=1e-5)
        results = []
        for store in (ds, clean):  # [query ‖ basisᵀ·instruction], as the retriever searches
            basis = store.load_basis(i)
            view = with_datasets(queries, np.tile(instruction @ basis, (len(queries), 1)))
            scores, ids = store.load_index(i).search(view, 5)
            results.append((scores, [cells["value"].take(r).to_pylist() for r in ids]))
        np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5)
        assert results[0][1] == results[1][1]


def test_staged_embeddings_are_kept_only_for_what_they_depend_on(tmp_path):
    """The staging key changes with the embedding config, the sources and the shard layout,
    not with the index or the resources; a rerun deletes the staging of any other key."""
    key = staging_key(CFG, ["a", "b"], 0, 2)
    same = CFG.model_copy(update={"index": "hnsw", "dataset_dims": 0, "batch_size": 1,
                                  "resources": Resources(actors=3), "piece_cells": 7, "shards": 5})
    assert staging_key(same, ["b", "a"], 0, 2) == key
    others = [staging_key(CFG.model_copy(update={"embedder": "bundled:other"}), ["a", "b"], 0, 2),
              staging_key(CFG.model_copy(update={"max_value_chars": 9}), ["a", "b"], 0, 2),
              staging_key(CFG, ["a", "c"], 0, 2), staging_key(CFG, ["a", "b"], 1, 2),
              staging_key(CFG, ["a", "b"], 0, 3)]
    assert key not in others and len(set(others)) == len(others)
    st, out = open_storage(str(tmp_path))
    for k in (key, others[0]):
        st.write_bytes(st.join(out, "_staging", k, "shard=0", "piece.parquet"), b"x")
    assert stage._staging(st, out, key, force=False) == st.join(out, "_staging", key)
    assert os.listdir(tmp_path / "_staging") == [key]
    stage._staging(st, out, key, force=True)
    assert os.listdir(tmp_path / "_staging") == []


def flip_last_byte(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)[0]
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last ^ 0xFF]))


def test_tampered_index_is_refused_then_rebuilt(built, tmp_path):
    sources, out, _ = built
    out = _copy(out, tmp_path)
    flip_last_byte(os.path.join(out, "shards", "shard-00000", "index.faiss"))
    ds = Datastore.open(out)
    with pytest.raises(ChecksumError, match="shard-00000/index.faiss was modified"):
        ds.load_index(0)
    assert ds.load_index(1).ntotal == ds.shard_count(1)
    tampered = ds.shard_count(0)
    rebuilt = build_datastore(sources, out, CFG)  # only the shard that fails its checksum
    assert (rebuilt["shards_built"], rebuilt["shards_resumed"]) == (1, 1)
    assert rebuilt["cells_embedded"] == tampered
    assert Datastore.open(out).load_index(0).ntotal == Datastore.open(out).shard_count(0)


def test_hashes_are_cached_until_the_file_changes(built, tmp_path, monkeypatch):
    """A second open does not re-read an unchanged shard (the hash cache); a file modified
    after being cached is hashed again and refused; verify="full" always re-reads."""
    import rebase_ray.datastore.store as store_module

    _, out, _ = built
    out = _copy(out, tmp_path)
    monkeypatch.setenv("REBASE_RAY_CACHE", str(tmp_path / "cache"))
    Datastore.open(out).load_index(0)  # hashes shard 0's files and records them
    reads = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        reads.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(store_module, "open", counting_open, raising=False)
    Datastore.open(out).load_index(0)
    assert reads == []
    Datastore.open(out, verify="full").load_index(0)
    assert len(reads) == 4  # index.faiss, cells.parquet, vectors.npy, basis.npy
    flip_last_byte(os.path.join(out, "shards", "shard-00000", "vectors.npy"))
    with pytest.raises(ChecksumError, match="shard-00000/vectors.npy was modified"):
        Datastore.open(out).load_vectors(0)


@pytest.mark.slow
def test_s3_in_and_out_with_the_cli(tmp_path, s3_bucket, ray_cluster, monkeypatch):
    monkeypatch.setenv("REBASE_RAY_CACHE", str(tmp_path / "cache"))
    st, bucket = open_storage(s3_bucket)
    local = write_corpus(tmp_path / "corpus")
    st.upload_dir(str(tmp_path / "corpus"), st.join(bucket, "corpus"))
    entries = []
    for s in local:
        d = s.model_dump(exclude_defaults=True)
        d["path"] = d["path"].replace(str(tmp_path / "corpus"), f"{bucket}/corpus")
        entries.append(d)
    (tmp_path / "sources.yaml").write_text(json.dumps({"sources": entries}))
    out = f"{bucket}/store"
    args = ["index", str(tmp_path / "sources.yaml"), "--out", out, "--shards", "2", "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout[first.stdout.index("{"):])
    got = {s["source"]: (s["rows"], s["cells"], s["rejects"]) for s in summary["sources"]}
    # default reject_value_chars (100k): the 600-char value is a cell, not a reject
    assert got == {**EXPECTED, "jsonl": (4, 8, 4)}
    assert st.exists(st.join(out, "shards", "shard-00001", "index.faiss"))
    forced = CliRunner().invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    again = json.loads(forced.stdout[forced.stdout.index("{"):])
    assert (again["shards_built"], again["cells_embedded"]) == (2, summary["cells"])
    ds = Datastore.open(out)
    view = indexed(ds, 0)
    scores, _ = ds.load_index(0).search(view, 1)
    # each cell's vector (and its source's coordinates, of norm 1) is in the index
    assert np.allclose(scores[:, 0], 2, atol=1e-4)
    assert ds.load_cells(0).num_rows == ds.shard_count(0)


def _crash_once(marker: str) -> type:
    class CrashOnce(Embedder):
        """Kills its own process on the first batch it ever sees (across restarts)."""

        def __call__(self, batch):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return super().__call__(batch)

    return CrashOnce


@pytest.mark.slow
def test_killed_embedding_actor_loses_and_duplicates_nothing(tmp_path, ray_cluster):
    import ray

    n = 40
    values = [f"cell number {i}" for i in range(n)]
    ds = ray.data.from_arrow(pa.table({"cell_id": [str(i) for i in range(n)], "value": values}))
    marker = str(tmp_path / "crashed")
    out = embed_dataset(ds, CFG, embed_plan(CFG, n), _crash_once(marker)).to_arrow_refs()
    table = pa.concat_tables(ray.get(out))
    assert os.path.exists(marker)  # the actor did die once
    assert table.num_rows == n and sorted(table["cell_id"].to_pylist()) == sorted(
        str(i) for i in range(n))
    vectors = column_vectors(table["vector"])
    assert vectors.shape == (n, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


def test_a_datastore_of_an_older_format_is_refused_with_the_way_out(built, tmp_path):
    _, out, _ = built
    out = _copy(out, tmp_path)
    path = tmp_path / "copy" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 1}))
    with pytest.raises(StorageError, match="format 1 datastore.*--force"):
        Datastore.open(out)
