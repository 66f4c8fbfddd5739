"""Embedding in Ray Data: `map_batches` over an actor pool, the model loaded once per actor.

Batch size, actor count, CPUs/GPUs per actor, threads and the backend (`encoders.py`: ONNX
Runtime on a CPU, torch on CUDA by default) come from `IndexConfig`; an actor with a GPU share
encodes on CUDA. Vectors are L2-normalised float32, so inner product
is cosine similarity. Actors that die are restarted by Ray Data and their batches retried.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rebase_ray.config import IndexConfig
from rebase_ray.datastore.encoders import Backend, load_encoder

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


def embed_dataset(ds, cfg: IndexConfig, embedder_cls: type = Embedder):
    """`ds` (with a `value` column) plus a `vector` column, through an actor pool."""
    import ray

    threads = cfg.torch_threads or max(1, int(cfg.num_cpus_per_actor))
    device = "cuda" if cfg.num_gpus_per_actor > 0 else "cpu"
    return ds.map_batches(
        embedder_cls,
        fn_constructor_kwargs={"ref": cfg.embedder, "device": device, "threads": threads,
                               "encode_batch_size": cfg.encode_batch_size,
                               "backend": cfg.backend},
        batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor)
