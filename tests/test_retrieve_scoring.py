"""ReBase scoring on synthetic shards (real FAISS, numpy vectors): exact scores equal a
brute-force reference, a planted row ranks first, many shards rank like one."""

from __future__ import annotations

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from rebase_ray.datastore.index import dataset_basis, with_datasets
from rebase_ray.retrieve.queries import CachedEmbedder
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


def dataset_aware(cells: pa.Table, vectors: np.ndarray, descriptions: dict[str, np.ndarray],
                  factory: str = "Flat") -> Shard:
    """A shard whose index carries the dataset score, as the datastore builds it."""
    names = sorted(descriptions)
    basis = dataset_basis(np.stack([descriptions[n] for n in names]), 32)
    coords = dict(zip(names, np.stack([descriptions[n] for n in names]) @ basis))
    cell_coords = np.stack([coords[d] for d in cells["dataset"].to_pylist()])
    index = faiss.index_factory(DIM + basis.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.add(with_datasets(vectors, cell_coords))
    return Shard(index, vectors, cells, descriptions, basis)


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
    query = np.stack([instruction, inputs.mean(0), outputs.mean(0)])
    return cells, vectors, inputs, outputs, instruction, descriptions, query


def test_exact_scores_match_brute_force(setup):
    cells, vectors, inputs, outputs, instruction, descriptions, query = setup
    ref = reference(cells, vectors, inputs, outputs, instruction, descriptions)
    expected = sorted(ref, key=lambda k: -ref[k]["score"])
    for shard in (Shard(flat(vectors), vectors, cells, descriptions),
                  dataset_aware(cells, vectors, descriptions)):
        out = shard.search(query, k=len(vectors), top=10_000)
        hits = pd.DataFrame(out["hits"])
        assert out["complete"] and out["bound"] == -np.inf and len(hits) == len(ref) == 300
        for h in hits.itertuples():
            r = ref[h.row_key]
            assert h.input_score == pytest.approx(r["in"], abs=1e-5)
            assert h.output_score == pytest.approx(r["out"], abs=1e-5)
            assert h.dataset_score == pytest.approx(r["ds"], abs=1e-5)
            assert h.score == pytest.approx(r["score"], abs=1e-5)
        assert hits["row_key"].tolist()[:50] == expected[:50]
        # the best columns are the cells that give the max
        best = hits.iloc[0]
        assert best["best_input_column"] in best["row"]
        assert best["best_output_column"] in best["row"]
        assert set(best["row"].values()) == {f"row {best['row_idx']} col {c}"
                                             for c in range(1 + best["row_idx"] % 4)}


def test_planted_row_ranks_first_through_ann(setup):
    cells, vectors, inputs, outputs, _, descriptions, query = setup
    vectors = vectors.copy()
    planted = [i for i, c in enumerate(cells.to_pylist()) if c["row_idx"] == 7]  # 4 cells
    vectors[planted[0]] = unit(inputs.mean(0))
    vectors[planted[1]] = unit(outputs.mean(0))
    shard = dataset_aware(cells, vectors, descriptions, "HNSW8,Flat")
    out = shard.search(query, k=20, top=5)
    assert out["hits"]["row_key"][0] == "ds1/default/train/7"
    assert not out["complete"] and out["candidates"] < 300


def test_dataset_aware_index_finds_the_rows_a_plain_index_misses(setup):
    """ReBase adds the dataset score to every row of a source, so the top rows gather in the
    sources the instruction matches best. A plain index ranks cells by similarity alone and,
    with a small k, misses them (its bound on the rows it did not find says so); the
    dataset-aware index ranks cells by similarity + dataset score and finds them."""
    cells, vectors, inputs, outputs, _, _, _ = setup
    instruction = unit(np.ones(DIM))
    half = unit(np.r_[np.ones(DIM // 2), -np.ones(DIM // 2)])
    descriptions = {"ds0": instruction, "ds1": half, "ds2": -instruction}  # scores 1, 0, -1
    query = np.stack([instruction, inputs.mean(0), outputs.mean(0)])
    plain = Shard(flat(vectors), vectors, cells, descriptions)
    exact = plain.search(query, k=len(vectors), top=15)
    truth = exact["hits"]["row_key"]
    assert {r.split("/")[0] for r in truth} == {"ds0"}
    plain = plain.search(query, k=20, top=15)
    assert len(set(plain["hits"]["row_key"]) & set(truth)) <= 10
    assert plain["bound"] > exact["hits"]["score"][-1] and not plain["complete"]
    aware = dataset_aware(cells, vectors, descriptions).search(query, k=20, top=15)
    assert aware["hits"]["row_key"] == truth
    np.testing.assert_allclose(aware["hits"]["score"], exact["hits"]["score"], atol=1e-6)


def test_many_shards_rank_like_one(setup):
    cells, vectors, _, _, _, descriptions, query = setup
    one = dataset_aware(cells, vectors, descriptions).search(query, k=100, top=40)["hits"]
    row_idx = cells["row_idx"].to_numpy()
    parts = []
    for s in range(4):
        mask = row_idx % 4 == s  # a row's cells stay together
        sub = dataset_aware(cells.filter(pa.array(mask)), vectors[mask], descriptions)
        parts.append(sub.search(query, k=100, top=40)["hits"])
    keys = np.concatenate([p["row_key"] for p in parts])
    scores = np.concatenate([p["score"] for p in parts])
    order = rank_order(scores, keys)
    assert keys[order][:40].tolist() == one["row_key"]
    np.testing.assert_allclose(scores[order][:40], one["score"], atol=1e-6)


def test_excluded_datasets_and_cap(setup):
    cells, vectors, _, _, _, descriptions, query = setup
    shard = Shard(flat(vectors), vectors, cells, descriptions)
    out = shard.search(query, k=len(vectors), top=30, exclude=["ds0"], cap=4)
    assert "ds0" not in set(out["hits"]["dataset"])
    _, counts = np.unique(out["hits"]["dataset"], return_counts=True)
    assert counts.max() == 4 and len(out["hits"]["row_key"]) == 8
    assert set(out["excluded"]["dataset"]) == {"ds0"} and len(out["excluded"]["score"]) == 30


def test_cap_and_diversity_helpers():
    groups = np.array(["a", "b", "a", "a", "b", "c", "a"])
    assert cap_per_group(groups, 2).tolist() == [True, True, True, False, True, True, False]
    assert cap_per_group(groups, None).all()
    vecs = unit(np.array([[1, 0], [1, 0.01], [0, 1]], dtype=np.float32))
    score = np.array([0.9, 0.89, 0.5])
    assert diversity_order(score, vecs, 3, 1.0).tolist() == [0, 1, 2]  # weight 1: by score
    assert diversity_order(score, vecs, 2, 0.5).tolist() == [0, 2]  # the near-duplicate waits


def test_rank_order_breaks_ties_by_row_key():
    keys = np.array(["b", "a", "c", "d"], dtype=object)
    assert rank_order(np.array([0.5, 0.5, 0.9, 0.1]), keys).tolist() == [2, 1, 0, 3]
    assert rank_order(np.array([0.2, 0.5, 0.9, 0.1]), keys).tolist() == [2, 1, 0, 3]


def test_shard_rejects_mismatched_files(setup):
    cells, vectors, _, _, _, descriptions, _ = setup
    with pytest.raises(ValueError, match="shard mismatch"):
        Shard(flat(vectors[:-1]), vectors, cells, descriptions)
    with pytest.raises(ValueError, match="dimensions"):  # an index with a dataset part
        Shard(flat(np.hstack([vectors, vectors[:, :3]])), vectors, cells, descriptions)
    with pytest.raises(ValueError, match="no description vector"):
        Shard(flat(vectors), vectors, cells, {"ds0": vectors[0]})


def test_only_rows_that_can_make_the_top_are_rescored(setup):
    """The similarities the search returns bound every candidate row; vectors are read only
    for the rows whose bound reaches the top, and the top rows are still the exact ones."""
    cells, vectors, _, _, instruction, descriptions, query = setup
    shard = dataset_aware(cells, vectors, descriptions)
    exact = shard.search(query, k=len(vectors), top=5)
    z = shard.basis.T @ instruction
    _, ids = shard.index.search(with_datasets(query[1:], np.tile(z, (2, 1))), 120)
    found = len(shard.rows.rows_of(ids.ravel()))
    pruned = shard.search(query, k=120, top=5)
    assert pruned["candidates"] < found
    assert pruned["hits"]["row_key"] == exact["hits"]["row_key"]
    np.testing.assert_allclose(pruned["hits"]["score"], exact["hits"]["score"], atol=1e-6)


def test_cached_embedder_embeds_each_text_once_and_forgets_the_oldest():
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return np.stack([np.full(4, len(t), np.float32) for t in texts])

    cached = CachedEmbedder(embed, size=3)
    first = cached(["a", "bb", "a"])
    assert calls == [["a", "bb"]] and first[:, 0].tolist() == [1, 2, 1]
    again = cached(["bb", "ccc", "a"])  # only the new text is embedded
    assert calls[-1] == ["ccc"] and again[:, 0].tolist() == [2, 3, 1]
    assert (cached.hits, cached.misses) == (3, 3)
    cached(["dddd"])  # a 4th text: "bb", the least recently used, is forgotten
    cached(["bb"])
    assert calls[-2:] == [["dddd"], ["bb"]] and len(cached.vectors) == 3
    off = CachedEmbedder(embed, size=0)
    off(["a"])
    off(["a"])
    assert calls[-2:] == [["a"], ["a"]] and not off.vectors
