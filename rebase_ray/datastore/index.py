"""FAISS index per shard: the factory string by shard size (or forced), build and load.

Inner product on normalised vectors (= cosine). Flat for small shards, HNSW for mid-sized
ones, IVF-PQ for large ones (≤ 100 bytes per cell); IVF and PQ are trained on a random sample
of `train_sample` vectors. Search-time parameters (nprobe, efSearch) are stored with the
shard and applied on load.

The index is dataset-aware: a cell is indexed as [cell vector ‖ a_d], a_d being its source
description's coordinates in an orthonormal basis B of the shard's descriptions
(`dataset_basis`), and searched with [query ‖ Bᵀ·instruction]. Since a_d · Bᵀ·instruction =
description_d · instruction (exactly when the shard has at most `dataset_dims` sources, else
on their main directions), the index ranks cells by cell similarity + dataset score: the
two terms of a ReBase row score that one cell decides.
"""

from __future__ import annotations

import math

import numpy as np

from rebase_ray.config import IndexConfig

PQ_BYTES = 64  # PQ64 on 384 dims: 6 dims per sub-quantizer, 64 bytes of code per vector
HNSW_M = 32


def choose_factory(n: int, dim: int, cfg: IndexConfig) -> str:
    """The FAISS factory string for a shard of `n` vectors."""
    if cfg.factory:
        return cfg.factory
    kind = cfg.index
    if kind == "auto":
        kind = ("flat" if n <= cfg.flat_max_cells else
                "hnsw" if n <= cfg.hnsw_max_cells else "ivfpq")
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{HNSW_M},Flat"
    return ivfpq_factory(n, dim)


def ivfpq_factory(n: int, dim: int) -> str:
    """IVF with ~4·sqrt(n) lists (at least 39 training points each) and PQ codes of PQ_BYTES
    sub-quantizers (`dim` of them for a narrower vector); fewer code bits for tiny shards,
    since PQ needs 2^bits training points. A width that PQ_BYTES does not divide (384 + r
    dataset dims) is zero-padded to the next multiple ("Pad"): inner products are unchanged,
    and every r keeps the full code size (a divisor of 389 is 1 byte of code)."""
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    m = min(PQ_BYTES, dim)
    width = -(-dim // m) * m
    bits = min(8, max(1, int(math.log2(max(n, 2)))))
    pad = f"Pad{width}," if width != dim else ""
    return f"{pad}IVF{nlist},PQ{m}x{bits}" if bits != 8 else f"{pad}IVF{nlist},PQ{m}"


def search_params(factory: str, n: int) -> str:
    """FAISS ParameterSpace string applied when the index is loaded."""
    if factory.startswith("HNSW"):
        return "efSearch=128"
    if factory.startswith("IVF") or ",IVF" in factory:
        nlist = int(factory.split("IVF", 1)[1].split(",", 1)[0].split("_", 1)[0])
        return f"nprobe={min(nlist, max(16, nlist // 16))}"
    return ""


def dataset_basis(descriptions: np.ndarray, max_dims: int) -> np.ndarray:
    """(dim, r) orthonormal basis of the span of the (m, dim) description vectors: all of it
    when it has at most `max_dims` dimensions, else its `max_dims` main directions."""
    dim = descriptions.shape[1] if descriptions.ndim == 2 else 0
    if len(descriptions) == 0 or max_dims == 0:
        return np.zeros((dim, 0), np.float32)
    _, s, vt = np.linalg.svd(descriptions.astype(np.float64), full_matrices=False)
    r = min(max_dims, int((s > 1e-6 * s[0]).sum()))
    return np.ascontiguousarray(vt[:r].T, dtype=np.float32)


def with_datasets(vectors: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """[vector ‖ coords] per row: the index's view of cells (coords: each cell's a_d) or of
    queries (coords: Bᵀ·instruction, repeated)."""
    return np.ascontiguousarray(np.hstack([vectors, coords]), dtype=np.float32)


def build_index(vectors: np.ndarray, factory: str, train_sample: int, seed: int = 0):
    import faiss

    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    _skip_polysemous_training(index)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        take = min(len(vectors), train_sample)
        sample = vectors if take == len(vectors) else vectors[np.sort(
            rng.choice(len(vectors), take, replace=False))]
        index.train(np.ascontiguousarray(sample))
    index.add(np.ascontiguousarray(vectors))
    return index


def _skip_polysemous_training(index) -> None:
    """IVF-PQ trains a permutation of its codes for polysemous search by default; our search
    never uses it (polysemous_ht stays 0), and it was 59 s of 62 s of building a PQ64 index
    of 3,000 vectors here. The codes and the distances are the same without it."""
    import faiss

    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # not an IVF index
        return
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False


def apply_params(index, params: str):
    import faiss

    if params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, params)
        except RuntimeError as exc:
            raise ValueError(f"FAISS search params {params!r} do not apply to this "
                             f"{type(index).__name__}: {exc}") from None
    return index


def read_index(path: str, params: str = "", mmap: bool = True):
    """Load an index memory-mapped where FAISS allows it (else, or with `mmap` False, read it
    into memory)."""
    import faiss

    if mmap:
        try:
            return apply_params(faiss.read_index(
                path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY), params)
        except RuntimeError:
            pass  # an index type FAISS cannot memory-map
    return apply_params(faiss.read_index(path), params)
