"""ReBase scoring on synthetic shards (real FAISS, numpy vectors): exact scores equal a
brute-force reference, a planted row ranks first, many shards rank like one."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from rebase_ray.retrieve.scoring import cap_per_group, diversity_order, rank_order
from rebase_ray.retrieve.shard import Shard

DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_cells(rng, n_rows: int = 300) -> tuple[pa.Table, np.ndarray]:
    """Rows of 1-4 cells over three datasets, cells in a shuffled order (a row's cells are not
    contiguous), random unit vectors."""
    records = []
    for r in range(n_rows):
        ds = f"ds{r % 3}"
        for c in range(1 + r % 4):
            records.append({"dataset": ds, "config": "default", "split": "train", "row_idx": r,
                            "column": f"col{c}", "value": f"row {r} col {c}"})
    records = [records[i] for i in rng.permutation(len(records))]
    cells = pa.Table.from_pylist(records)
    return cells, unit(rng.normal(size=(len(records), DIM)))


def flat(vectors: np.ndarray):
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def reference(cells: pa.Table, vectors: np.ndarray, inputs: np.ndarray, outputs: np.ndarray,
              instruction: np.ndarray, descriptions: dict[str, np.ndarray]) -> dict:
    """Brute force, as the paper states it: per cell the mean over examples of the cosine to
    each example, max over the row's cells; dataset score from the description; mean of 3."""
    v = vectors.astype(np.float64)
    cos = lambda a, b: (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    cell_in = cos(v, inputs.astype(np.float64)).mean(axis=1)
    cell_out = cos(v, outputs.astype(np.float64)).mean(axis=1)
    rows: dict[str, dict] = {}
    for i, c in enumerate(cells.to_pylist()):
        key = f"{c['dataset']}/{c['config']}/{c['split']}/{c['row_idx']}"
        r = rows.setdefault(key, {"dataset": c["dataset"], "in": -9.0, "out": -9.0})
        r["in"], r["out"] = max(r["in"], cell_in[i]), max(r["out"], cell_out[i])
    for r in rows.values():
        d = descriptions[r["dataset"]].astype(np.float64)
        r["ds"] = float(d @ instruction / np.linalg.norm(d) / np.linalg.norm(instruction))
        r["score"] = (r["in"] + r["out"] + r["ds"]) / 3
    return rows


@pytest.fixture()
def setup():
    rng = np.random.default_rng(0)
    cells, vectors = make_cells(rng)
    inputs, outputs = unit(rng.normal(size=(3, DIM))), unit(rng.normal(size=(3, DIM)))
    instruction = unit(rng.normal(size=DIM))
    descriptions = {f"ds{i}": unit(rng.normal(size=DIM)) for i in range(3)}
    ds_scores = {k: float(v @ instruction) for k, v in descriptions.items()}
    return cells, vectors, inputs, outputs, instruction, descriptions, ds_scores


def test_exact_scores_match_brute_force(setup):
    cells, vectors, inputs, outputs, instruction, descriptions, ds_scores = setup
    shard = Shard(flat(vectors), vectors, cells)
    out = shard.search(inputs.mean(0), outputs.mean(0), ds_scores, k=len(vectors), top=10_000)
    hits = pd.DataFrame(shard.frame(out))
    ref = reference(cells, vectors, inputs, outputs, instruction, descriptions)
    assert out["complete"] and len(hits) == len(ref) == 300
    for h in hits.itertuples():
        r = ref[h.row_key]
        assert h.input_score == pytest.approx(r["in"], abs=1e-5)
        assert h.output_score == pytest.approx(r["out"], abs=1e-5)
        assert h.dataset_score == pytest.approx(r["ds"], abs=1e-5)
        assert h.score == pytest.approx(r["score"], abs=1e-5)
    expected = sorted(ref, key=lambda k: -ref[k]["score"])
    assert hits["row_key"].tolist()[:50] == expected[:50]
    # the best columns are the cells that give the max
    best = hits.iloc[0]
    row = json.loads(best["row"])
    assert best["best_input_column"] in row and best["best_output_column"] in row
    assert set(row.values()) == {f"row {best['row_idx']} col {c}"
                                 for c in range(1 + best["row_idx"] % 4)}


def test_planted_row_ranks_first_through_ann(setup):
    cells, vectors, inputs, outputs, _, _, ds_scores = setup
    vectors = vectors.copy()
    planted = [i for i, c in enumerate(cells.to_pylist()) if c["row_idx"] == 7]  # 4 cells
    vectors[planted[0]] = unit(inputs.mean(0))
    vectors[planted[1]] = unit(outputs.mean(0))
    index = faiss.index_factory(DIM, "HNSW8,Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    shard = Shard(index, vectors, cells)
    out = shard.search(inputs.mean(0), outputs.mean(0), ds_scores, k=20, top=5)
    assert out["row_key"][0] == "ds1/default/train/7"
    assert not out["complete"] and out["candidates"] < 300


@pytest.mark.parametrize("dense_cells", [0, 20_000], ids=["restricted-ann", "dense"])
def test_dataset_bound_finds_rows_the_global_candidates_miss(setup, monkeypatch, dense_cells):
    """With a tiny k the global ANN candidates miss top rows of the high-dataset-score
    datasets; the per-dataset bound and the refinement (FAISS searches restricted to the open
    datasets' cells, or scoring small datasets in full) recover the exact top rows."""
    monkeypatch.setattr("rebase_ray.retrieve.shard.DENSE_CELLS", dense_cells)
    cells, vectors, inputs, outputs, _, _, _ = setup
    ds_scores = {"ds0": 0.9, "ds1": 0.0, "ds2": -0.9}  # far apart: ds0 rows dominate
    shard = Shard(flat(vectors), vectors, cells)
    args = (inputs.mean(0), outputs.mean(0), ds_scores)
    exact = shard.search(*args, k=len(vectors), top=15)
    small = shard.search(*args, k=3, top=15)
    global_only = Shard(flat(vectors), vectors, cells)
    _, ids = global_only.index.search(np.stack(args[:2]), 3)
    assert not set(exact["row_key"]) <= set(global_only.rows.row_key[
        global_only.rows.rows_of(ids.ravel())])  # the plain top-k would miss some
    assert small["row_key"].tolist() == exact["row_key"].tolist()
    np.testing.assert_allclose(small["score"], exact["score"], atol=1e-6)
    # a first pass without refinement misses them, and its bound says so
    plain = shard.search(*args, k=3, top=15, refine_above=None)
    assert plain["row_key"].tolist() != exact["row_key"].tolist()
    assert plain["bound"] > exact["score"][-1] and not plain["complete"]


def test_many_shards_rank_like_one(setup):
    cells, vectors, inputs, outputs, _, _, ds_scores = setup
    one = Shard(flat(vectors), vectors, cells).search(
        inputs.mean(0), outputs.mean(0), ds_scores, k=100, top=40)
    row_idx = cells["row_idx"].to_numpy()
    parts = []
    for s in range(4):
        mask = row_idx % 4 == s  # a row's cells stay together
        sub = Shard(flat(vectors[mask]), vectors[mask], cells.filter(pa.array(mask)))
        parts.append(sub.search(inputs.mean(0), outputs.mean(0), ds_scores, k=100, top=40))
    keys = np.concatenate([p["row_key"] for p in parts])
    scores = np.concatenate([p["score"] for p in parts])
    order = rank_order(scores, keys)
    assert keys[order][:40].tolist() == one["row_key"].tolist()
    np.testing.assert_allclose(scores[order][:40], one["score"], atol=1e-6)


def test_excluded_datasets_and_cap(setup):
    cells, vectors, inputs, outputs, _, _, ds_scores = setup
    shard = Shard(flat(vectors), vectors, cells)
    out = shard.search(inputs.mean(0), outputs.mean(0), ds_scores, k=len(vectors), top=30,
                       exclude=["ds0"], cap=4)
    assert "ds0" not in set(out["dataset"])
    _, counts = np.unique(out["dataset"], return_counts=True)
    assert counts.max() == 4 and len(out["rows"]) == 8
    assert set(out["excluded"]["dataset"]) == {"ds0"} and len(out["excluded"]["score"]) == 30


def test_cap_and_diversity_helpers():
    groups = np.array(["a", "b", "a", "a", "b", "c", "a"])
    assert cap_per_group(groups, 2).tolist() == [True, True, True, False, True, True, False]
    assert cap_per_group(groups, None).all()
    vecs = unit(np.array([[1, 0], [1, 0.01], [0, 1]], dtype=np.float32))
    score = np.array([0.9, 0.89, 0.5])
    assert diversity_order(score, vecs, 3, 1.0).tolist() == [0, 1, 2]  # weight 1: by score
    assert diversity_order(score, vecs, 2, 0.5).tolist() == [0, 2]  # the near-duplicate waits


def test_shard_rejects_mismatched_files(setup):
    cells, vectors, *_ = setup
    with pytest.raises(ValueError, match="shard mismatch"):
        Shard(flat(vectors[:-1]), vectors, cells)


def test_rows_that_cannot_make_the_top_are_not_rescored(setup):
    """Bounds from the similarities the search returns leave most candidate rows unscored,
    and the top rows are still the exact ones."""
    cells, vectors, inputs, outputs, _, _, ds_scores = setup
    shard = Shard(flat(vectors), vectors, cells)
    args = (inputs.mean(0), outputs.mean(0), ds_scores)
    exact = shard.search(*args, k=len(vectors), top=5)
    _, ids = shard.index.search(np.stack(args[:2]).astype(np.float32), 120)
    found = len(shard.rows.rows_of(ids.ravel()))
    pruned = shard.search(*args, k=120, top=5)
    assert pruned["candidates"] < found
    assert pruned["row_key"].tolist() == exact["row_key"].tolist()
    np.testing.assert_allclose(pruned["score"], exact["score"], atol=1e-6)
