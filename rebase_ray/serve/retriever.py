"""The retriever as a Ray Serve app: one `Retriever` per replica (its shard actors load the
datastore once, memory-mapped), queried over HTTP.

Routes (under the app's route prefix, `/retriever` by default so it can share Serve's proxy
with the teacher at `/`):
- POST /retrieve {instruction, examples: [{input, output}], top_n, exclude_datasets}
  → {"rows": [{rank, row_key, dataset, domain, score, input_score, output_score,
     dataset_score, best_input_column, best_output_column, row}], "candidates": int}
- GET /healthz (no auth) → datastore size, embedding cache, requests and batches served by
  this replica (the same counts go to Ray Serve's metrics: `rebase_retriever_requests`,
  `rebase_retriever_batch_size`).
The request body is the typed `RetrieveRequest`; auth, size limit and errors come from
`serve.http` (401 / 400 / 413, JSON errors).

Concurrent requests are merged by `@serve.batch` (max batch size and wait from
`RetrieveConfig`): their texts are embedded in one call and their searches share the round
trips to the shard actors (`Retriever.search_many`).
"""

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Depends
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import metrics

from rebase_ray.config import RetrieveConfig, S3Config
from rebase_ray.retrieve.retriever import Retrieval, Retriever
from rebase_ray.serve.http import (
    Access,
    config_file,
    deployed,
    openai_style_api,
    require_api_key,
    resolve_api_key,
    wait_for_interrupt,
    without_secrets,
)

APP_NAME = "retriever"


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(min_length=1)
    output: str = Field(min_length=1)


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: str = Field(min_length=1)
    examples: list[Example] = Field(min_length=1)
    top_n: int = Field(default=10, gt=0)
    exclude_datasets: list[str] = []


api = openai_style_api("rebase-ray retriever")


@serve.deployment
@serve.ingress(api)
class RetrieverServer:
    def __init__(self, datastore: str, cfg: dict[str, Any], api_key: str | None,
                 s3: dict[str, Any] | None = None):
        self.cfg = RetrieveConfig.model_validate(cfg)
        self.retriever = Retriever(datastore, self.cfg, S3Config.model_validate(s3 or {}))
        self.retriever.store.embed(["warm up"])  # load the embedder now, not on a request
        self.search_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.search_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.access = Access(api_key, self.cfg.serve.max_request_bytes)
        self.datastore = datastore
        self.served = {"requests": 0, "batches": 0}  # this replica's, since it started
        self.requests = metrics.Counter("rebase_retriever_requests",
                                        description="retrieve requests answered")
        self.batch_size = metrics.Histogram(
            "rebase_retriever_batch_size", description="requests per @serve.batch batch",
            boundaries=[1, 2, 4, 8, 16, 32, 64])

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        cache = self.retriever.embed
        return {"status": "ok", "datastore": self.datastore, "cells": self.retriever.num_cells,
                "shards": len(self.retriever.shard_info),
                "embed_cache": {"texts": len(cache.vectors), "hits": cache.hits,
                                "misses": cache.misses}, **self.served}

    @api.post("/retrieve", dependencies=[Depends(require_api_key)])
    async def retrieve(self, req: RetrieveRequest) -> dict[str, Any]:
        start = time.perf_counter()
        result = await self.search_batch(req)
        rows = [{c: v for c, v in h.items() if c not in ("config", "split", "row_idx")}
                for h in result.hits]
        return {"rows": rows, "candidates": result.candidates,
                "took_ms": round(1000 * (time.perf_counter() - start), 2)}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def search_batch(self, reqs: list[RetrieveRequest]) -> list[Retrieval]:
        self.served["requests"] += len(reqs)
        self.served["batches"] += 1
        self.requests.inc(len(reqs))
        self.batch_size.observe(len(reqs))
        return await asyncio.to_thread(self._search, reqs)

    def _search(self, reqs: list[RetrieveRequest]) -> list[Retrieval]:
        """One embedding call for the batch, then one `search_many` per distinct
        (top_n, exclude_datasets) among its requests."""
        queries = self.retriever.queries([
            (r.instruction, [e.input for e in r.examples], [e.output for e in r.examples])
            for r in reqs])
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            key = (min(r.top_n, self.cfg.top_n), tuple(sorted(r.exclude_datasets)))
            groups.setdefault(key, []).append(i)
        results: list[Retrieval | None] = [None] * len(reqs)
        for (top_n, exclude), members in groups.items():
            found = self.retriever.search_many(
                [queries[i] for i in members], top_n,
                {d: "excluded by the request" for d in exclude})
            for i, r in zip(members, found):
                results[i] = r
        return results


def deployment_options(cfg: RetrieveConfig) -> dict[str, Any]:
    s = cfg.serve
    return {
        "autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                               "target_ongoing_requests": s.target_ongoing_requests},
        "ray_actor_options": {"num_cpus": s.cpus, "num_gpus": s.gpus},
    }


def build_retriever_app(datastore: str, cfg: RetrieveConfig, s3: S3Config | None = None):
    """The retriever as a Serve application; the API key is resolved here (config, else
    $REBASE_RAY_API_KEY in the process that builds the app)."""
    return RetrieverServer.options(**deployment_options(cfg)).bind(
        datastore, cfg.model_dump(mode="json"), resolve_api_key(cfg.serve.api_key),
        s3.model_dump(mode="json") if s3 else None)


def app_builder(args: dict[str, Any]):
    """Serve's application builder (`import_path` of a config file):
    args = {datastore, retrieve: RetrieveConfig fields}."""
    return build_retriever_app(args["datastore"],
                               RetrieveConfig.model_validate(args.get("retrieve", {})))


def serve_config(datastore: str, cfg: RetrieveConfig, name: str = APP_NAME) -> dict[str, Any]:
    """A Serve config file (`serve deploy`, KubeRay RayService) for the retriever. The API key
    and every other secret are left out: set REBASE_RAY_API_KEY on the cluster."""
    args = without_secrets(cfg.model_dump(mode="json"))
    return config_file(name, cfg.serve, {"import_path": f"{__name__}:app_builder",
                                         "args": {"datastore": datastore, "retrieve": args}})


@contextmanager
def local_retriever(datastore: str, cfg: RetrieveConfig, s3: S3Config | None = None,
                    name: str = APP_NAME) -> Iterator[str]:
    """Deploy the retriever on the running Ray (starting Serve's proxy on cfg.serve.host:port
    unless Serve already runs) and yield its base URL; the app is deleted on exit."""
    with deployed(build_retriever_app(datastore, cfg, s3), name, cfg.serve) as url:
        yield url


def serve_retriever(datastore: str, cfg: RetrieveConfig, on_ready: Callable[[str], Any],
                    s3: S3Config | None = None) -> dict[str, Any]:
    """Serve until Ctrl+C; returns a short summary."""
    started = time.time()
    with local_retriever(datastore, cfg, s3) as url:
        on_ready(url)
        wait_for_interrupt()
    return {"url": url, "datastore": datastore, "served_s": round(time.time() - started, 1)}
