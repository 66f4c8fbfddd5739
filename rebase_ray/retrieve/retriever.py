"""The in-memory retriever: a datastore opened once, its shards held by Ray actors.

`Retriever.search_many` answers a batch of queries in a few round trips to the shard actors
(one call per actor per round, every query of the batch in it):

1. every shard scores the candidates of its plain ANN search (no refinement);
2. the merged top rows give each query a global cut; only the shards whose bound on the rows
   they did not find beats that cut search again, refining above it (a threshold top-k, so
   the result is the exact top up to the ANN's recall without every shard searching deep);
3. the rows finally kept are turned into hits (row text) by the shards that hold them.

Rows of excluded sources and rows overlapping the eval set are dropped (refilling from
further candidates); the per-dataset cap and the diversity re-rank are applied when set.
The stage function (`retrieve`) and the Serve app both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray

from rebase_ray.config import RetrieveConfig, S3Config
from rebase_ray.retrieve.decontam import contamination_reason
from rebase_ray.retrieve.queries import Query, build_queries, build_query
from rebase_ray.retrieve.scoring import cap_per_group, diversity_order, rank_order
from rebase_ray.retrieve.shard import HIT_COLUMNS, SCORE_FIELDS, ShardActor
from rebase_ray.text import NgramIndex

MAX_ROUNDS = 6  # candidate pool doublings when drops leave fewer than top_n rows


@dataclass
class Retrieval:
    hits: pd.DataFrame  # HIT_COLUMNS + domain, rank; best first
    dropped: pd.DataFrame  # row_key, dataset, score, reason
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
    ranked: dict | None = None  # merged search results (arrays + shard), best first
    excluded: list | None = None  # per shard: excluded-source rows near the top
    keep: np.ndarray | None = None  # positions in `ranked` kept as hits
    done: bool = False


class Retriever:
    def __init__(self, datastore: str, cfg: RetrieveConfig, s3: S3Config | None = None):
        from rebase_ray.datastore import Datastore

        self.cfg = cfg
        self.store = Datastore.open(datastore, s3, verify=cfg.verify)
        sources = self.store.sources()
        sources = sources.to_pandas() if hasattr(sources, "to_pandas") else pd.DataFrame(sources)
        self.source_names: list[str] = sources["name"].tolist()
        self.source_vectors = np.stack(sources["vector"].map(np.asarray)).astype(np.float32)
        self.domains = dict(zip(self.source_names, sources["domain"]))
        self.actors = [ShardActor.options(num_cpus=cfg.shard_cpus).remote(
            datastore, i, s3, cfg.verify, cfg.search_params)
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

    def queries(self, tasks: list[tuple[str, list[str], list[str]]]) -> list[Query]:
        """Many queries, their texts embedded in one batch."""
        return build_queries(self.store.embed, tasks)

    def dataset_scores(self, query: Query) -> dict[str, float]:
        return dict(zip(self.source_names, (self.source_vectors @ query.instruction).tolist()))

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
            self._rank(active, exclude)
            frames = self._frames(active)
            for p, hits in zip(active, frames):
                p.rounds += 1
                p.keep = self._clean(p, hits, pool, contamination)
                p.ranked["hits"] = hits
                seen_all = p.ranked["complete"] and len(hits["row_key"]) == len(p.ranked["rows"])
                p.done = len(p.keep) == pool or seen_all
                p.want, p.k = 2 * p.want, 2 * p.k
        return [self._result(p, top_n, exclude) for p in todo]

    def _rank(self, batch: list[_Pending], exclude: dict[str, str]) -> None:
        """Threshold top-k over the shards for every query of the batch (module docstring)."""
        ds = [self.dataset_scores(p.query) for p in batch]

        def requests(refine: list) -> list[dict]:
            return [{"q_inputs": p.query.inputs, "q_outputs": p.query.outputs,
                     "dataset_scores": d, "k": p.k, "top": p.want, "exclude": list(exclude),
                     "cap": self.cfg.per_dataset_cap, "refine_above": r}
                    for p, d, r in zip(batch, ds, refine)]

        first = ray.get([a.search.remote(requests([None] * len(batch))) for a in self.actors])
        parts = [[first[s][i] for s in range(len(self.actors))] for i in range(len(batch))]
        cuts = [self._cut(shards, p.want) for p, shards in zip(batch, parts)]
        second = requests(cuts)
        again = {s: [i for i in range(len(batch)) if parts[i][s]["bound"] > cuts[i]]
                 for s in range(len(self.actors))}
        calls = {s: self.actors[s].search.remote([second[i] for i in todo])
                 for s, todo in again.items() if todo}
        for s, results in zip(calls, ray.get(list(calls.values()))):
            for i, result in zip(again[s], results):
                parts[i][s] = result
        for p, shards in zip(batch, parts):
            p.candidates += sum(r["candidates"] for r in shards)
            p.excluded = [r["excluded"] for r in shards]
            p.ranked = self._merge(shards)

    def _cut(self, shards: list[dict], want: int) -> float:
        """The score of the want-th best row over the shards (after the cap): rows below it
        cannot make the top."""
        merged = self._merge(shards)
        return float(merged["score"][want - 1]) if len(merged["score"]) >= want else -np.inf

    def _merge(self, shards: list[dict]) -> dict:
        """The shards' rows as one ranked set of arrays (with each row's shard)."""
        fields = (*SCORE_FIELDS, "row_key", "dataset")
        merged = {f: np.concatenate([r[f] for r in shards]) for f in fields}
        merged["shard"] = np.concatenate([np.full(len(r["rows"]), s)
                                          for s, r in enumerate(shards)])
        order = rank_order(merged["score"], merged["row_key"])
        order = order[cap_per_group(merged["dataset"][order], self.cfg.per_dataset_cap)]
        merged = {f: v[order] for f, v in merged.items()}
        merged["complete"] = all(r["complete"] for r in shards)
        return merged

    def _frames(self, batch: list[_Pending]) -> list[dict[str, list]]:
        """Hit columns for the first `want` ranked rows of every query (built by the shards
        that hold them), in ranked order."""
        per_shard: dict[int, list] = {}
        for i, p in enumerate(batch):
            shard = p.ranked["shard"][:p.want]
            for s in np.unique(shard):
                pos = np.flatnonzero(shard == s)
                per_shard.setdefault(int(s), []).append(
                    (i, pos, {f: p.ranked[f][pos] for f in SCORE_FIELDS}))
        calls = {s: self.actors[s].frame.remote([(found, self.cfg.diversity)
                                                 for _, _, found in items])
                 for s, items in per_shard.items()}
        pieces: list[list] = [[] for _ in batch]
        for s, results in zip(calls, ray.get(list(calls.values()))):
            for (i, pos, _), columns in zip(per_shard[s], results):
                pieces[i].append((pos, columns))
        return [self._in_order(p) for p in pieces]

    @staticmethod
    def _in_order(pieces: list[tuple[np.ndarray, dict]]) -> dict[str, list]:
        """The shards' column lists merged back into ranked order."""
        if not pieces:
            return {c: [] for c in HIT_COLUMNS}
        order = np.argsort(np.concatenate([pos for pos, _ in pieces]), kind="stable")
        merged = {c: [v for _, cols in pieces for v in cols[c]] for c in pieces[0][1]}
        return {c: [values[i] for i in order] for c, values in merged.items()}

    def _clean(self, p: _Pending, hits: dict[str, list], pool: int,
               contamination: NgramIndex | None) -> np.ndarray:
        """Positions (in ranked order) of the first `pool` rows that do not overlap the eval
        set."""
        keep = []
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
        cfg, hits = self.cfg, p.ranked["hits"]
        keep = p.keep
        if cfg.diversity and len(keep):
            vectors = np.stack([hits["vector"][i] for i in keep])
            scores = np.asarray([hits["score"][i] for i in keep])
            keep = keep[diversity_order(scores, vectors, top_n, cfg.diversity_weight)]
        frame = pd.DataFrame({c: [hits[c][i] for i in keep] for c in HIT_COLUMNS},
                             columns=HIT_COLUMNS)
        frame.insert(5, "domain", frame["dataset"].map(self.domains))
        frame["rank"] = np.arange(1, len(frame) + 1)
        contaminated = [i for i, key in enumerate(hits["row_key"])
                        if p.checked.get(key) is not None]
        by_content = {c: [hits[c][i] for i in contaminated]
                      for c in ("row_key", "dataset", "score")}
        by_content["reason"] = [p.checked[k] for k in by_content["row_key"]]
        return Retrieval(hits=frame, dropped=self._dropped(p.excluded, frame, by_content,
                                                           exclude),
                         candidates=p.candidates, rounds=p.rounds)

    @staticmethod
    def _dropped(excluded: list[dict], hits: pd.DataFrame, by_content: dict[str, list],
                 exclude: dict[str, str]) -> pd.DataFrame:
        """Rows that would have been retrieved but were dropped: excluded-source rows scoring
        at least the last kept row, and rows overlapping the eval set."""
        cutoff = hits["score"].min() if len(hits) else -np.inf
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
        return pd.DataFrame({c: merged[c][order] for c in (*cols, "reason")},
                            columns=[*cols, "reason"])
