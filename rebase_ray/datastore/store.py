"""Open a built datastore: manifest, per-shard index / cells / vectors, sources, query embedding.

Every file of a shard is checked against the sha256 in the manifest before the shard is read
(a tampered or truncated file raises ChecksumError). Local indexes and vectors are memory-
mapped; a datastore on S3 is downloaded shard by shard into a local cache folder first.

Hashing a 1M-cell datastore reads about 3 GB, and every shard actor, retrieve stage and
endpoint replica opens it again, so a file's hash is remembered (in the local cache folder)
with its size, inode, mtime and ctime: while those are unchanged the file is not re-read.
Any write or `touch` changes the ctime, so a modified file is hashed again. `verify="full"`
re-hashes every file on every open.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rebase_ray.config import S3Config
from rebase_ray.datastore.encoders import load_encoder
from rebase_ray.datastore.index import read_index
from rebase_ray.models import cache_dir
from rebase_ray.storage import ChecksumError, Storage, StorageError, open_storage

Verify = Literal["cached", "full"]
FORMAT_VERSION = 2  # 2: dataset-aware indexes, with basis.npy in every shard


class Datastore:
    def __init__(self, st: Storage, uri: str, manifest: dict, verify: Verify = "cached"):
        self.st, self.uri, self.manifest, self.verify = st, uri, manifest, verify
        self._verified: set[str] = set()
        self._encoder = None
        self._local = None if st.scheme == "file" else (
            cache_dir() / "datastores" / hashlib.sha256(uri.encode()).hexdigest()[:16])

    @classmethod
    def open(cls, uri: str, s3: S3Config | None = None, verify: Verify = "cached") -> Datastore:
        st, uri = open_storage(uri, s3)
        manifest = st.read_manifest(uri)
        if manifest is None:
            raise StorageError(f"{uri} is not a datastore (no manifest.json); build it with "
                               "`rebase-ray index`")
        if manifest.get("format") != FORMAT_VERSION:
            raise StorageError(
                f"{uri} is a format {manifest.get('format')} datastore; this rebase-ray reads "
                f"format {FORMAT_VERSION} (dataset-aware indexes): rebuild it with "
                "`rebase-ray index ... --force`")
        return cls(st, uri, manifest, verify)

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
                for rel_file, entry in shard["files"].items():
                    path = Path(self.st.path(self.st.join(self.uri, *rel_file.split("/"))))
                    if not path.exists():
                        raise ChecksumError(f"{path} is listed in its manifest but missing")
                    actual = file_sha256(path, trust_cache=self.verify == "cached")
                    if actual != entry["sha256"]:
                        raise ChecksumError(
                            f"{path} was modified: sha256 {actual[:12]}… does not match the "
                            f"manifest's {entry['sha256'][:12]}…; rebuild it (--force) or "
                            "restore the file")
                self._verified.add(shard["name"])
            return self.st.path(self.st.join(self.uri, *rel.split("/")))
        return self._download(rel, shard["files"][rel]["sha256"])

    def verify_all(self) -> None:
        """Check (on S3: fetch into the local cache) every shard's files now, so that a
        tampered datastore fails in the caller's process with a short ChecksumError before any
        shard actor starts (the actors then find the hashes cached)."""
        for i, shard in enumerate(self.manifest["shards"]):
            for rel in shard["files"]:
                self._path(i, rel.rsplit("/", 1)[-1])

    def _download(self, rel: str, sha256: str) -> str:
        local = Path(self._local, *rel.split("/"))
        if local.exists() and file_sha256(local, self.verify == "cached") == sha256:
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

    def load_index(self, i: int, search_params: str | None = None, mmap: bool = True):
        """Shard i's FAISS index (memory-mapped where FAISS allows, unless `mmap` is False)
        with the manifest's search params, or `search_params` (a FAISS ParameterSpace string
        such as "nprobe=8")."""
        shard = self.manifest["shards"][i]
        params = shard.get("search_params", "") if search_params is None else search_params
        return read_index(self._path(i, "index.faiss"), params, mmap)

    def load_cells(self, i: int) -> pa.Table:
        """Shard i's cells; row j is FAISS id j."""
        return pq.read_table(self._path(i, "cells.parquet"), memory_map=True)

    def load_vectors(self, i: int, mmap: bool = True) -> np.ndarray:
        """Shard i's (n, dim) float32 vectors, memory-mapped unless `mmap` is False; row j is
        FAISS id j."""
        return np.load(self._path(i, "vectors.npy"), mmap_mode="r" if mmap else None)

    def load_basis(self, i: int) -> np.ndarray:
        """Shard i's (dim, r) basis of its sources' descriptions (`datastore.index`)."""
        return np.load(self._path(i, "basis.npy"))

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
        if self._encoder is None:
            from rebase_ray.models import pick_device

            backend = self.manifest.get("index_config", {}).get("backend", "torch")
            self._encoder = load_encoder(self.embedder, pick_device(), backend)
        return self._encoder.encode(list(texts), 64)


def file_sha256(path: Path, trust_cache: bool = True) -> str:
    """The sha256 of a local file, read from the hash cache while the file's size, inode,
    mtime and ctime are the ones recorded with it (else computed and recorded)."""
    st = path.stat()
    stamp = [str(path.resolve()), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    record = cache_dir() / "hashes" / (hashlib.sha256(stamp[0].encode()).hexdigest()[:32]
                                       + ".json")
    if trust_cache and record.exists():
        try:
            cached = json.loads(record.read_text())
        except (OSError, ValueError):
            cached = {}
        if cached.get("stamp") == stamp:
            return cached["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    tmp.replace(record)
    return digest
