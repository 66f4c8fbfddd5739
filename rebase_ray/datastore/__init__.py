"""The ReBase datastore: cells embedded by a Ray Data actor pool into sharded FAISS indexes.

    build_datastore(sources, out, cfg, s3=None, force=False) -> summary dict  (stage.run)
    Datastore.open(uri, s3=None) -> verified, memory-mapped access to shards and sources
"""

from rebase_ray.datastore.stage import run as build_datastore
from rebase_ray.datastore.store import Datastore
from rebase_ray.storage import ChecksumError

__all__ = ["ChecksumError", "Datastore", "build_datastore"]
