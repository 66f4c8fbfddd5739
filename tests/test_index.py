"""The FAISS factory by shard size and width: IVF-PQ keeps 64 bytes of code for every number
of dataset dims r (the indexed width is 384 + r), and its recall after exact rescoring."""

import faiss
import numpy as np
import pytest

from rebase_ray.datastore.index import (
    PQ_BYTES,
    build_index,
    ivfpq_factory,
    read_index,
    search_params,
)


@pytest.mark.parametrize("r", range(33))
def test_every_dataset_width_gets_full_pq_codes(r):
    factory = ivfpq_factory(200_000, 384 + r)
    width = 384 if r == 0 else 448
    assert factory == (f"IVF1788,PQ{PQ_BYTES}" if r == 0 else f"Pad{width},IVF1788,PQ64")
    index = faiss.index_factory(384 + r, factory, faiss.METRIC_INNER_PRODUCT)
    assert faiss.extract_index_ivf(index).code_size == 64


def test_small_shards_and_narrow_vectors():
    assert ivfpq_factory(100, 389) == "Pad448,IVF2,PQ64x6"  # 2^6 ≤ 100 training points
    assert ivfpq_factory(10_000, 40) == "IVF256,PQ40"  # narrower than 64: one dim per byte
    assert search_params("Pad448,IVF1788,PQ64", 200_000) == "nprobe=111"


@pytest.mark.parametrize("r", [0, 5, 13])
def test_ivfpq_recall_after_exact_rescoring(tmp_path, r):
    """3,000 clustered unit vectors of width 384 + r: the top 10 by exact inner product among
    the index's 100 candidates is the brute-force top 10 for at least 90% of the hits."""
    rng = np.random.default_rng(r)
    centers = rng.normal(size=(60, 384 + r))
    x = centers[rng.integers(0, 60, 3000)] + 0.6 * rng.normal(size=(3000, 384 + r))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[rng.choice(3000, 50, replace=False)] + 0.05 * rng.normal(size=(50, 384 + r))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    factory = ivfpq_factory(len(x), x.shape[1])
    path = str(tmp_path / "index.faiss")
    faiss.write_index(build_index(x, factory, train_sample=3000), path)
    index = read_index(path, search_params(factory, len(x)))
    assert faiss.extract_index_ivf(index).code_size == 64
    _, candidates = index.search(q, 100)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    found = 0
    for i, ids in enumerate(candidates):
        ids = ids[ids >= 0]
        top = ids[np.argsort(-(x[ids] @ q[i]))[:10]]
        found += len(set(top) & set(truth[i]))
    assert found / truth.size >= 0.9


def test_factory_thresholds_by_shard_size():
    from rebase_ray.config import IndexConfig
    from rebase_ray.datastore.index import choose_factory

    cfg = IndexConfig()
    assert choose_factory(cfg.flat_max_cells, 389, cfg) == "Flat"
    assert choose_factory(cfg.flat_max_cells + 1, 389, cfg) == "HNSW32,Flat"
    assert choose_factory(cfg.hnsw_max_cells, 389, cfg) == "HNSW32,Flat"
    assert choose_factory(cfg.hnsw_max_cells + 1, 389, cfg).startswith("Pad448,IVF")
    assert choose_factory(10, 389, IndexConfig(index="ivfpq")).startswith("Pad448,IVF")
    assert choose_factory(10**6, 389, IndexConfig(factory="IVF64,Flat")) == "IVF64,Flat"
