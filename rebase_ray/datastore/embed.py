"""Embedding in Ray Data: `map_batches` over an actor pool, the model loaded once per actor.

Batch size, the pool (`IndexConfig.resources`, resolved when the build starts) and the backend
(`encoders.py`; `auto` is resolved by the build before the pool starts: on a CPU the faster of
ONNX Runtime and torch on that machine, torch on CUDA) come from `IndexConfig`; an actor with a
GPU share encodes on CUDA. Vectors are L2-normalised float32, so inner product
is cosine similarity. Actors that die are restarted by Ray Data and their batches retried.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from rebase_ray.config import IndexConfig
from rebase_ray.datastore.encoders import (
    CPU_ENCODE_BATCH,
    GPU_ENCODE_BATCH,
    Backend,
    load_encoder,
)
from rebase_ray.runtime import Plan, resolve_resources

VECTOR = "vector"


def vector_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def column_vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The (n, dim) float32 matrix of a fixed-size-list vector column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


class Embedder:
    """Ray Data actor: adds a `vector` column computed from the `value` column."""

    def __init__(self, ref: str, device: str, threads: int, encode_batch_size: int,
                 backend: Backend = "auto"):
        import torch

        torch.set_num_threads(threads)
        self.encoder = load_encoder(ref, device, backend, threads)
        self.batch_size = encode_batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = self.encoder.encode(batch["value"].to_pylist(), self.batch_size)
        return batch.append_column(VECTOR, vector_column(vectors))


def embed_dataset(ds, cfg: IndexConfig, pool: Plan, embedder_cls: type = Embedder):
    """`ds` (with a `value` column) plus a `vector` column, through an actor pool of `pool`
    (`embed_plan`)."""
    import ray

    return ds.map_batches(
        embedder_cls,
        fn_constructor_kwargs={"ref": cfg.embedder, "device": "cuda" if pool.gpus else "cpu",
                               "threads": pool.threads,
                               "encode_batch_size": encode_batch_size(cfg, pool),
                               "backend": cfg.backend},
        batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus, num_gpus=pool.gpus)


def encode_batch_size(cfg: IndexConfig, pool: Plan) -> int:
    """Texts per forward pass: `cfg.encode_batch_size`, else `CPU_ENCODE_BATCH` on CPU actors
    and `GPU_ENCODE_BATCH` on GPU ones."""
    return cfg.encode_batch_size or (GPU_ENCODE_BATCH if pool.gpus else CPU_ENCODE_BATCH)


def embed_plan(cfg: IndexConfig, cells: int) -> Plan:
    """The embedding pool for `cells` values, from the resources free now: one CPU is left to
    the tasks that read and split the cells (and lent to the actors' threads)."""
    return resolve_resources(cfg.resources, most=math.ceil(cells / cfg.batch_size), reserve=1)
