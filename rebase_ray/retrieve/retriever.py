"""The in-memory retriever: a datastore opened once, its shards held by Ray actors.

`Retriever.search_many` answers a batch of queries with one call per shard actor per round,
every query of the batch in it: each shard returns the hits of its top rows (`Shard.search`,
one pass over its dataset-aware index with exact rescoring), and the hits are merged by score.

Rows of excluded sources and rows overlapping the eval set are dropped; when that leaves
fewer than `top_n` rows, the shards are asked again for twice as many. With
`RetrieveConfig.exact`, a query is also searched again with twice the candidates while a
shard's bound on the rows it did not find beats the last row kept. The per-dataset cap and
the diversity re-rank are applied when set. The stage function (`retrieve`) and the Serve app
both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray

from rebase_ray.config import RetrieveConfig, S3Config
from rebase_ray.retrieve.decontam import contamination_reason
from rebase_ray.retrieve.queries import CachedEmbedder, Query, build_queries, build_query
from rebase_ray.retrieve.scoring import cap_per_group, diversity_order, rank_order
from rebase_ray.retrieve.shard import HIT_COLUMNS, ShardActor
from rebase_ray.runtime import resolve_resources
from rebase_ray.text import NgramIndex

MAX_ROUNDS = 6  # candidate pool doublings when drops leave fewer than top_n rows


@dataclass
class Retrieval:
    hits: list[dict]  # HIT_COLUMNS + domain, rank; best first; "row" is {column: value}
    dropped: list[dict]  # row_key, dataset, score, reason; best first
    candidates: int  # rows rescored exactly, over all shards and rounds
    rounds: int


@dataclass
class _Pending:
    """One query of a batch while it is being answered."""

    query: Query
    want: int  # rows asked of every shard
    k: int  # ANN cells per query vector
    checked: dict  # row_key → contamination reason (None: clean)
    candidates: int = 0
    rounds: int = 0
    hits: dict | None = None  # merged hit columns, best first
    excluded: list | None = None  # per shard: excluded-source rows near the top
    bound: float = np.inf  # the best score of a row no shard found
    complete: bool = False  # every shard searched all of its cells
    keep: np.ndarray | None = None  # positions in `hits` kept
    done: bool = False


class Retriever:
    def __init__(self, datastore: str, cfg: RetrieveConfig, s3: S3Config | None = None):
        from rebase_ray.datastore import Datastore

        self.cfg = cfg
        self.store = Datastore.open(datastore, s3, verify=cfg.verify)
        self.store.verify_all()  # a tampered file: one short error here, not an actor's death
        self.embed = CachedEmbedder(self.store.embed, cfg.embed_cache)
        sources = self.store.sources()
        self.source_names: list[str] = sources["name"].to_pylist()
        self.domains = dict(zip(self.source_names, sources["domain"].to_pylist()))
        # one actor per shard, one FAISS thread each (`ShardActor`)
        pool = resolve_resources(cfg.resources.model_copy(update={"actors": self.store.num_shards,
                                                        "threads": 1}))
        self.resources = pool.summary()
        self.actors = [ShardActor.options(num_cpus=pool.cpus).remote(
            datastore, i, s3, cfg.verify, cfg.search_params, cfg.load == "mmap")
            for i in range(self.store.num_shards)]
        self.shard_info = ray.get([a.info.remote() for a in self.actors])

    @property
    def num_cells(self) -> int:
        return sum(i["cells"] for i in self.shard_info)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def query(self, instruction: str, inputs: list[str], outputs: list[str]) -> Query:
        return build_query(self.embed, instruction, inputs, outputs)

    def queries(self, tasks: list[tuple[str, list[str], list[str]]]) -> list[Query]:
        """Many queries, their texts embedded in one batch."""
        return build_queries(self.embed, tasks)

    def search(self, query: Query, top_n: int | None = None,
               exclude: dict[str, str] | None = None,
               contamination: NgramIndex | None = None) -> Retrieval:
        """The top rows for `query`. `exclude` maps source names to the reason they are
        excluded; `contamination` is the eval set's n-grams (rows overlapping it are dropped)."""
        return self.search_many([query], top_n, exclude, contamination)[0]

    def search_many(self, queries: list[Query], top_n: int | None = None,
                    exclude: dict[str, str] | None = None,
                    contamination: NgramIndex | None = None) -> list[Retrieval]:
        """`search` for a batch of queries, sharing the round trips to the shard actors."""
        cfg, exclude = self.cfg, exclude or {}
        top_n = top_n or cfg.top_n
        pool = 2 * top_n if cfg.diversity else top_n
        todo = [_Pending(q, pool, max(cfg.candidates_per_query, pool), {}) for q in queries]
        for _ in range(MAX_ROUNDS):
            active = [p for p in todo if not p.done]
            if not active:
                break
            self._search(active, exclude)
            for p in active:
                p.rounds += 1
                p.keep = self._clean(p, pool, contamination)
                full = len(p.keep) == pool
                last = p.hits["score"][p.keep[-1]] if full else -np.inf
                settled = not cfg.exact or p.bound <= last
                p.done = p.complete or (full and settled)
                p.want = p.want if full else 2 * p.want
                p.k = max(2 * p.k, p.want)
        return [self._result(p, top_n, exclude) for p in todo]

    def _search(self, batch: list[_Pending], exclude: dict[str, str]) -> None:
        """One call per shard actor with every query of the batch; merges their hits."""
        requests = [{"query": p.query.stacked, "k": p.k, "top": p.want, "exclude": list(exclude),
                     "cap": self.cfg.per_dataset_cap, "with_vectors": self.cfg.diversity}
                    for p in batch]
        results = ray.get([a.search.remote(requests) for a in self.actors])
        for i, p in enumerate(batch):
            shards = [r[i] for r in results]
            p.candidates += sum(r["candidates"] for r in shards)
            p.excluded = [r["excluded"] for r in shards]
            p.bound = max(r["bound"] for r in shards)
            p.complete = all(r["complete"] for r in shards)
            p.hits = self._merge([r["hits"] for r in shards])

    def _merge(self, parts: list[dict[str, list]]) -> dict[str, list]:
        """The shards' hits as one ranked list (after the cap)."""
        merged = {c: [v for part in parts for v in part[c]] for c in parts[0]}
        order = rank_order(np.asarray(merged["score"]),
                           np.asarray(merged["row_key"], dtype=object))
        order = order[cap_per_group(np.asarray(merged["dataset"], dtype=object)[order],
                                    self.cfg.per_dataset_cap)]
        return {c: [values[i] for i in order] for c, values in merged.items()}

    def _clean(self, p: _Pending, pool: int, contamination: NgramIndex | None) -> np.ndarray:
        """Positions (in ranked order) of the first `pool` rows that do not overlap the eval
        set."""
        hits, keep = p.hits, []
        for i in range(len(hits["row_key"])):
            if len(keep) == pool:
                break
            key = hits["row_key"][i]
            if contamination is not None and key not in p.checked:
                p.checked[key] = contamination_reason(hits["row"][i], contamination)
            if p.checked.get(key) is None:
                keep.append(i)
        return np.asarray(keep, dtype=np.int64)

    def _result(self, p: _Pending, top_n: int, exclude: dict[str, str]) -> Retrieval:
        cfg, hits = self.cfg, p.hits
        keep = p.keep
        if cfg.diversity and len(keep):
            vectors = np.stack([hits["vector"][i] for i in keep])
            scores = np.asarray([hits["score"][i] for i in keep])
            keep = keep[diversity_order(scores, vectors, top_n, cfg.diversity_weight)]
        rows = [{c: hits[c][i] for c in HIT_COLUMNS} for i in keep]
        for rank, row in enumerate(rows, 1):
            row["domain"], row["rank"] = self.domains.get(row["dataset"]), rank
        contaminated = [i for i, key in enumerate(hits["row_key"])
                        if p.checked.get(key) is not None]
        by_content = {c: [hits[c][i] for i in contaminated]
                      for c in ("row_key", "dataset", "score")}
        by_content["reason"] = [p.checked[k] for k in by_content["row_key"]]
        return Retrieval(hits=rows, dropped=self._dropped(p.excluded, rows, by_content, exclude),
                         candidates=p.candidates, rounds=p.rounds)

    @staticmethod
    def _dropped(excluded: list[dict], hits: list[dict], by_content: dict[str, list],
                 exclude: dict[str, str]) -> list[dict]:
        """Rows that would have been retrieved but were dropped: excluded-source rows scoring
        at least the last kept row, and rows overlapping the eval set."""
        cutoff = min(h["score"] for h in hits) if hits else -np.inf
        cols = ("row_key", "dataset", "score")
        parts = {c: [np.asarray(e[c]) for e in excluded] + [np.asarray(by_content[c])]
                 for c in cols}
        merged = {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}
        n_source = sum(len(e["score"]) for e in excluded)
        from_source = np.arange(len(merged["score"])) < n_source
        reason = np.array([exclude.get(d) for d in merged["dataset"][:n_source]]
                          + by_content["reason"], dtype=object)
        keep = ~from_source | (merged["score"].astype(np.float64) >= cutoff)
        merged = {c: v[keep] for c, v in merged.items()} | {"reason": reason[keep]}
        order = rank_order(merged["score"], merged["row_key"])
        return [{"row_key": str(merged["row_key"][i]), "dataset": str(merged["dataset"][i]),
                 "score": float(merged["score"][i]), "reason": merged["reason"][i]}
                for i in order]
