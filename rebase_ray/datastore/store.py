"""Open a built datastore: manifest, per-shard index / cells / vectors, sources, query embedding.

Every file of a shard is checked against the sha256 in the manifest before the shard is read
(a tampered or truncated file raises ChecksumError). Local indexes and vectors are memory-
mapped; a datastore on S3 is downloaded shard by shard into a local cache folder first.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rebase_ray.config import S3Config
from rebase_ray.datastore.embed import encode
from rebase_ray.datastore.index import read_index
from rebase_ray.models import cache_dir
from rebase_ray.storage import ChecksumError, Storage, StorageError, open_storage


class Datastore:
    def __init__(self, st: Storage, uri: str, manifest: dict):
        self.st, self.uri, self.manifest = st, uri, manifest
        self._verified: set[str] = set()
        self._model = None
        self._local = None if st.scheme == "file" else (
            cache_dir() / "datastores" / hashlib.sha256(uri.encode()).hexdigest()[:16])

    @classmethod
    def open(cls, uri: str, s3: S3Config | None = None) -> Datastore:
        st, uri = open_storage(uri, s3)
        manifest = st.read_manifest(uri)
        if manifest is None:
            raise StorageError(f"{uri} is not a datastore (no manifest.json); build it with "
                               "`rebase-ray index`")
        return cls(st, uri, manifest)

    # -- manifest -------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def embedder(self) -> str:
        return self.manifest["embedder"]

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def shard_count(self, i: int) -> int:
        return int(self.manifest["shards"][i]["cells"])

    # -- files ----------------------------------------------------------------------------

    def _path(self, i: int, name: str) -> str:
        """A verified local path for one file of shard i (downloaded first for S3)."""
        shard = self.manifest["shards"][i]
        rel = f"shards/{shard['name']}/{name}"
        if self._local is None:
            if shard["name"] not in self._verified:
                self.st.verify(self.uri, {"files": shard["files"]})
                self._verified.add(shard["name"])
            return self.st.path(self.st.join(self.uri, *rel.split("/")))
        return self._download(rel, shard["files"][rel]["sha256"])

    def _download(self, rel: str, sha256: str) -> str:
        local = Path(self._local, *rel.split("/"))
        if local.exists() and _sha256_file(local) == sha256:
            return str(local)
        data = self.st.read_bytes(self.st.join(self.uri, *rel.split("/")))
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ChecksumError(
                f"{self.st.join(self.uri, rel)} was modified: sha256 {actual[:12]}… does not "
                f"match the manifest's {sha256[:12]}…; rebuild it (--force) or restore the file")
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_suffix(local.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(local)
        return str(local)

    def load_index(self, i: int):
        """Shard i's FAISS index (memory-mapped where FAISS allows), search params applied."""
        shard = self.manifest["shards"][i]
        return read_index(self._path(i, "index.faiss"), shard.get("search_params", ""))

    def load_cells(self, i: int) -> pa.Table:
        """Shard i's cells; row j is FAISS id j."""
        return pq.read_table(self._path(i, "cells.parquet"), memory_map=True)

    def load_vectors(self, i: int) -> np.ndarray:
        """Shard i's (n, dim) float32 vectors, memory-mapped; row j is FAISS id j."""
        return np.load(self._path(i, "vectors.npy"), mmap_mode="r")

    def sources(self) -> pa.Table:
        """name, description, vector, domain, license, rows, cells of every source."""
        entry = self.manifest["files"]["sources.parquet"]
        uri = self.st.join(self.uri, "sources.parquet")
        data = self.st.read_bytes(uri)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ChecksumError(f"{uri} was modified: it does not match the manifest's sha256")
        return pq.read_table(io.BytesIO(data))

    # -- queries --------------------------------------------------------------------------

    def embed(self, texts: list[str]) -> np.ndarray:
        """Texts → L2-normalised float32 vectors with the datastore's own embedder."""
        if self._model is None:
            from rebase_ray.models import load_embedder

            self._model = load_embedder(self.embedder)
        return encode(self._model, list(texts), 64)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
