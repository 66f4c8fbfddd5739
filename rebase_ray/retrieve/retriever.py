"""The in-memory retriever: a datastore opened once, its shards held by Ray actors.

`Retriever.search` fans a query out to every shard actor in parallel, merges their exactly
scored rows, drops contaminated rows (refilling from further candidates), optionally applies
the per-dataset cap and the diversity re-rank, and returns the top rows ranked. The stage
function (`retrieve`) and the Serve app both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray

from rebase_ray.config import RetrieveConfig, S3Config
from rebase_ray.retrieve.decontam import contamination_reason
from rebase_ray.retrieve.queries import Query, build_query
from rebase_ray.retrieve.scoring import cap_per_group, diversity_order, rank_order
from rebase_ray.retrieve.shard import HIT_COLUMNS, ShardActor
from rebase_ray.text import NgramIndex

MAX_ROUNDS = 6  # candidate pool doublings when drops leave fewer than top_n rows


@dataclass
class Retrieval:
    hits: pd.DataFrame  # HIT_COLUMNS + domain, rank; best first
    dropped: pd.DataFrame  # row_key, dataset, score, reason
    candidates: int  # rows rescored exactly, over all shards and rounds
    rounds: int


class Retriever:
    def __init__(self, datastore: str, cfg: RetrieveConfig, s3: S3Config | None = None):
        from rebase_ray.datastore import Datastore

        self.cfg = cfg
        self.store = Datastore.open(datastore, s3)
        sources = self.store.sources()
        sources = sources.to_pandas() if hasattr(sources, "to_pandas") else pd.DataFrame(sources)
        self.source_names: list[str] = sources["name"].tolist()
        self.source_vectors = np.stack(sources["vector"].map(np.asarray)).astype(np.float32)
        self.domains = dict(zip(self.source_names, sources["domain"]))
        self.actors = [ShardActor.options(num_cpus=cfg.shard_cpus).remote(datastore, i, s3)
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
        return build_query(self.store.embed, instruction, inputs, outputs)

    def dataset_scores(self, query: Query) -> dict[str, float]:
        return dict(zip(self.source_names, (self.source_vectors @ query.instruction).tolist()))

    def search(self, query: Query, top_n: int | None = None,
               exclude: dict[str, str] | None = None,
               contamination: NgramIndex | None = None) -> Retrieval:
        """The top rows for `query`. `exclude` maps source names to the reason they are
        excluded; `contamination` is the eval set's n-grams (rows overlapping it are dropped)."""
        cfg, exclude = self.cfg, exclude or {}
        top_n = top_n or cfg.top_n
        pool = 2 * top_n if cfg.diversity else top_n
        ds = self.dataset_scores(query)
        want, k, candidates = pool, max(cfg.candidates_per_query, pool), 0
        checked: dict[str, str | None] = {}  # row_key → contamination reason (None: clean)
        for rounds in range(1, MAX_ROUNDS + 1):
            parts = ray.get([a.search.remote(
                query.inputs, query.outputs, ds, k, want, list(exclude), cfg.per_dataset_cap,
                cfg.diversity) for a in self.actors])
            candidates += sum(p["candidates"] for p in parts)
            hits = pd.concat([p["hits"] for p in parts], ignore_index=True)
            hits = hits.iloc[rank_order(hits["score"].to_numpy(), hits["row_key"].to_numpy())]
            hits = hits[cap_per_group(hits["dataset"].to_numpy(), cfg.per_dataset_cap)]
            keep = []
            for i, (key, row) in enumerate(zip(hits["row_key"], hits["row"])):
                if len(keep) == pool:
                    break
                if contamination is not None and key not in checked:
                    checked[key] = contamination_reason(row, contamination)
                if checked.get(key) is None:
                    keep.append(i)
            if len(keep) == pool or all(p["complete"] for p in parts):
                break
            want, k = 2 * want, 2 * k
        contaminated = hits[hits["row_key"].map(lambda r: checked.get(r) is not None)]
        hits = hits.iloc[keep]
        if cfg.diversity and len(hits):
            pick = diversity_order(hits["score"].to_numpy(), np.stack(hits["vector"].to_numpy()),
                                   top_n, cfg.diversity_weight)
            hits = hits.iloc[pick]
        hits = hits[HIT_COLUMNS].reset_index(drop=True)
        hits.insert(5, "domain", hits["dataset"].map(self.domains))
        hits["rank"] = np.arange(1, len(hits) + 1)
        return Retrieval(hits=hits, dropped=self._dropped(parts, hits, contaminated, checked,
                                                          exclude),
                         candidates=candidates, rounds=rounds)

    @staticmethod
    def _dropped(parts: list[dict], hits: pd.DataFrame, contaminated: pd.DataFrame,
                 checked: dict[str, str | None], exclude: dict[str, str]) -> pd.DataFrame:
        """Rows that would have been retrieved but were dropped: excluded-source rows scoring
        at least the last kept row, and rows overlapping the eval set."""
        cutoff = hits["score"].min() if len(hits) else -np.inf
        by_source = pd.concat([p["excluded"] for p in parts], ignore_index=True)
        by_source = by_source[by_source["score"] >= cutoff].assign(
            reason=lambda f: f["dataset"].map(exclude))
        by_content = contaminated[["row_key", "dataset", "score"]].assign(
            reason=contaminated["row_key"].map(checked))
        dropped = pd.concat([by_source, by_content], ignore_index=True)
        dropped = dropped.iloc[rank_order(dropped["score"].to_numpy(),
                                          dropped["row_key"].to_numpy())]
        return dropped[["row_key", "dataset", "score", "reason"]].reset_index(drop=True)
