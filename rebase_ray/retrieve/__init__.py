"""Retrieval (ReBase): a task → its top rows from the sharded datastore, exactly scored and
decontaminated. `retrieve` is the stage; `Retriever` the reusable in-memory searcher."""

from rebase_ray.retrieve.queries import Query, build_query
from rebase_ray.retrieve.retriever import Retrieval, Retriever
from rebase_ray.retrieve.stage import run as retrieve

__all__ = ["Query", "Retrieval", "Retriever", "build_query", "retrieve"]
