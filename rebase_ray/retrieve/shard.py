"""One datastore shard, searched in one pass: the dataset-aware index proposes candidate
rows, exact scoring ranks them.

`Shard` holds the shard's FAISS index (over [cell ‖ a_d], see `datastore.index`), its cell
vectors (memory-mapped `vectors.npy`), the basis of its sources' descriptions and its cells
grouped by row. `search`:

1. asks the index for the `k` best cells for [mean few-shot input ‖ Bᵀ·instruction] and the
   `k` best for [mean few-shot output ‖ Bᵀ·instruction]: cells ranked by similarity +
   dataset score, so the datasets the instruction favours are searched deeper;
2. bounds every candidate row (a row owning a found cell) from the similarities the search
   returned, less the dataset part: a side with a found cell scores that cell's similarity,
   a side without one at most τ (the k-th value found on that side, less the dataset part);
3. rescores exactly, from all of their cell vectors, the `RESCORE` · top candidates with the
   best upper bounds, then every candidate whose bound still reaches the top-th exact score:
   the rows returned carry true cosines, and vectors are read only for the candidates whose
   bound reaches the top;
4. builds the hits (locations, scores, the row as {column: value}) of its top rows.

It also returns `bound`, the best score a row with no found cell could have, so that a
caller wanting the exact top can search again with a larger k (`RetrieveConfig.exact`).
With a Flat index the bounds are exact; with an ANN index they hold up to its recall.
`ShardActor` is the same thing as a Ray actor: it loads its shard once and serves batches of
searches from then on.
"""

from __future__ import annotations

from collections.abc import Collection
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from rebase_ray.config import S3Config
from rebase_ray.datastore.index import with_datasets
from rebase_ray.retrieve.scoring import (
    RowIndex,
    RowScores,
    cap_per_group,
    distinct,
    rank_order,
    score_rows,
)

RESCORE = 2  # candidates rescored first, as a multiple of top
HIT_COLUMNS = ["row_key", "dataset", "config", "split", "row_idx", "score", "input_score",
               "output_score", "dataset_score", "best_input_column", "best_output_column", "row"]


class Shard:
    def __init__(self, index, vectors: np.ndarray, cells: pa.Table,
                 descriptions: dict[str, np.ndarray], basis: np.ndarray | None = None):
        """`descriptions`: the description vector of (at least) every source in the shard,
        for the dataset scores; with `basis` (dim, r) they also make the dataset part of the
        index's vectors, without it the index holds cell vectors alone."""
        if index.ntotal != len(vectors) or len(vectors) != cells.num_rows:
            raise ValueError(f"shard mismatch: index has {index.ntotal} vectors, vectors.npy "
                             f"{len(vectors)}, cells.parquet {cells.num_rows} rows")
        dim = vectors.shape[1]
        self.basis = np.zeros((dim, 0), np.float32) if basis is None else basis
        if index.d != dim + self.basis.shape[1]:
            raise ValueError(f"shard mismatch: index has {index.d} dimensions, vectors {dim} "
                             f"and the dataset basis {self.basis.shape[1]}")
        self.index = index
        self.vectors = np.asarray(vectors)  # a plain view of the memory map: faster indexing
        self.rows = RowIndex.from_cells(cells)
        self.columns = cells["column"].combine_chunks()
        self.values = cells["value"].combine_chunks()
        first = pa.array(self.rows.first_cell)
        datasets = pc.dictionary_encode(cells["dataset"].take(first)).combine_chunks()
        self.dataset_names = np.asarray(datasets.dictionary.to_pylist(), dtype=object)
        self.row_dataset = datasets.indices.to_numpy().astype(np.int64)
        self.row_config = np.asarray(cells["config"].take(first).to_pylist(), dtype=object)
        self.row_split = np.asarray(cells["split"].take(first).to_pylist(), dtype=object)
        self.row_idx = cells["row_idx"].take(first).to_numpy()
        self.cell_dataset = self.row_dataset[self.rows.row_of_cell]
        missing = sorted(set(self.dataset_names) - set(descriptions))
        if missing:
            raise ValueError(f"no description vector for the shard's sources {missing}")
        self.descriptions = np.asarray([descriptions[n] for n in self.dataset_names],
                                       np.float32).reshape(len(self.dataset_names), dim)
        self.coords = self.descriptions @ self.basis

    @property
    def num_cells(self) -> int:
        return len(self.vectors)

    def info(self) -> dict:
        return {"cells": self.num_cells, "rows": self.rows.num_rows,
                "datasets": sorted(self.dataset_names.tolist())}

    def search(self, query: np.ndarray, k: int, top: int, exclude: Collection[str] = (),
               cap: int | None = None, with_vectors: bool = False) -> dict:
        """The shard's `top` rows by exact ReBase score among the candidates (module
        docstring) for `query`, the (3, dim) instruction, mean few-shot input and mean
        few-shot output vectors (`Query.stacked`), as hits (HIT_COLUMNS lists, plus each
        row's best input cell vector with `with_vectors`, for a diversity re-rank).

        Rows of `exclude`d datasets are never hits; those that scored in the top are returned
        separately (`excluded`) so that the caller can report them. `cap` keeps at most that
        many rows per dataset. Also returns `bound` (the best score of a row not found),
        `candidates` (rows rescored exactly) and `complete` (k covered every cell and every
        hit row fits in `top`: asking again cannot give more)."""
        instruction, q_inputs, q_outputs = np.asarray(query, np.float32)
        k = min(k, self.num_cells)
        ds = self.descriptions @ instruction  # the dataset score of each source
        out_of = np.isin(self.dataset_names, list(exclude))
        if k == 0:
            return self._result(score_rows(self.rows, self.vectors, [], q_inputs, q_outputs),
                                ds, out_of, top, cap, with_vectors, -np.inf, True)
        z = self.basis.T @ instruction
        queries = with_datasets(np.stack([q_inputs, q_outputs]), np.tile(z, (2, 1)))
        sims, ids = self.index.search(queries, k)
        shift = self.coords @ z  # what the index adds to the similarity of each dataset's cells
        rows, upper, tau = self._bounds(sims, ids, shift, k)
        best_possible = (upper[0] + upper[1] + ds[self.row_dataset[rows]]) / 3
        order = np.argsort(-best_possible, kind="stable")
        first, rest = order[:RESCORE * top], order[RESCORE * top:]
        s = score_rows(self.rows, self.vectors, rows[first], q_inputs, q_outputs)
        _, score = self._scores(s, ds)
        keep = self._ranked(s, score, out_of, cap)[2]
        cut = float(score[keep[top - 1]]) if len(keep) >= top else -np.inf
        rest = rest[best_possible[rest] >= cut]
        s = _concat(s, score_rows(self.rows, self.vectors, rows[rest], q_inputs, q_outputs))
        # a row with no found cell has every cell below τ on both sides (none when a side
        # returned every cell)
        bound = -np.inf if np.isneginf(tau).any() or out_of.all() else float(
            ((tau[0] + tau[1] - 2 * shift + ds) / 3)[~out_of].max())
        return self._result(s, ds, out_of, top, cap, with_vectors, bound,
                            k >= self.num_cells)

    def _bounds(self, sims: np.ndarray, ids: np.ndarray, shift: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate rows (sorted), per side an upper bound of their best cell similarity
        (their best found cell's, else τ less their dataset part), and τ per side: the k-th
        value found; -inf when the search returned every cell, inf when it returned fewer
        than k (an IVF search whose probed lists hold fewer cells)."""
        found = ids >= 0
        cells = [ids[j][found[j]] for j in range(2)]
        owners = [self.rows.row_of_cell[c] for c in cells]
        rows = distinct(np.concatenate(owners))[0]
        tau = np.full(2, -np.inf, np.float32)
        upper = np.empty((2, len(rows)), np.float32)
        for j in range(2):
            if not found[j].all():  # fewer than k returned: the rest were never looked at
                tau[j] = np.inf
            elif k < self.num_cells:
                tau[j] = sims[j][-1]
            upper[j] = tau[j] - shift[self.row_dataset[rows]]
            # results come best first, so a row's first found cell is its best
            owner, first = distinct(owners[j])
            upper[j][np.searchsorted(rows, owner)] = (
                sims[j][found[j]][first] - shift[self.cell_dataset[cells[j][first]]])
        return rows, upper, tau

    def _scores(self, s: RowScores, ds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset score, ReBase row score) of the scored rows."""
        row_ds = ds[self.row_dataset[s.rows]]
        return row_ds, (s.input_score + s.output_score + row_ds) / 3

    def _ranked(self, s: RowScores, score: np.ndarray, out_of: np.ndarray, cap: int | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions of the scored rows in rank order, whether each is of an excluded source,
        and the hits in rank order (not excluded, within the cap)."""
        order = rank_order(score, self.rows.row_key[s.rows])
        excluded = out_of[self.row_dataset[s.rows]]
        keep = order[~excluded[order]]
        return order, excluded, keep[cap_per_group(self.row_dataset[s.rows[keep]], cap)]

    def _result(self, s: RowScores, ds: np.ndarray, out_of: np.ndarray, top: int,
                cap: int | None, with_vectors: bool, bound: float, complete: bool) -> dict:
        row_ds, score = self._scores(s, ds)
        order, excluded, keep = self._ranked(s, score, out_of, cap)
        complete, keep = complete and len(keep) <= top, keep[:top]
        dropped = order[excluded[order]][:top]
        return {
            "hits": self._frame(s, row_ds, score, keep, with_vectors),
            "excluded": {"row_key": self.rows.row_key[s.rows[dropped]].tolist(),
                         "dataset": self.dataset_names[self.row_dataset[s.rows[dropped]]].tolist(),
                         "score": score[dropped].tolist()},
            "bound": bound,
            "candidates": len(s.rows),
            "complete": complete,
        }

    def _frame(self, s: RowScores, row_ds: np.ndarray, score: np.ndarray, keep: np.ndarray,
               with_vectors: bool) -> dict[str, list]:
        """Hits (HIT_COLUMNS, as lists) for the scored rows at positions `keep`: locations,
        scores, best columns and the row as {column: value}."""
        rows = s.rows[keep]
        cell_ids, run_starts = self.rows.cells_of(rows)
        columns = self.columns.take(pa.array(cell_ids)).to_pylist()
        values = self.values.take(pa.array(cell_ids)).to_pylist()
        bounds = np.append(run_starts, len(cell_ids))
        best = self.columns.take(pa.array(np.concatenate([
            s.best_input_cell[keep], s.best_output_cell[keep]]).astype(np.int64))).to_pylist()
        out = {
            "row_key": self.rows.row_key[rows].tolist(),
            "dataset": self.dataset_names[self.row_dataset[rows]].tolist(),
            "config": self.row_config[rows].tolist(),
            "split": self.row_split[rows].tolist(),
            "row_idx": self.row_idx[rows].tolist(),
            "score": score[keep].tolist(),
            "input_score": s.input_score[keep].tolist(),
            "output_score": s.output_score[keep].tolist(),
            "dataset_score": row_ds[keep].tolist(),
            "best_input_column": best[:len(rows)],
            "best_output_column": best[len(rows):],
            "row": [dict(zip(columns[a:b], values[a:b])) for a, b in pairwise(bounds)],
        }
        if with_vectors:
            out["vector"] = list(np.asarray(self.vectors[s.best_input_cell[keep]]))
        return out


def _concat(a: RowScores, b: RowScores) -> RowScores:
    return RowScores(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in
                       ("rows", "input_score", "output_score", "best_input_cell",
                        "best_output_cell")))


@ray.remote
class ShardActor:
    """A `Shard` loaded once (index and vectors memory-mapped, or read into memory) inside a
    Ray actor. Its calls take a list of requests, so that one round trip serves a batch of
    queries."""

    def __init__(self, datastore: str, shard: int, s3: S3Config | None = None,
                 verify: str = "cached", search_params: str | None = None, mmap: bool = True):
        import faiss

        from rebase_ray.datastore import Datastore

        faiss.omp_set_num_threads(1)  # two queries per search: threads only add overhead
        store = Datastore.open(datastore, s3, verify=verify)
        sources = store.sources()
        descriptions = {n: np.asarray(v, np.float32) for n, v in
                        zip(sources["name"].to_pylist(), sources["vector"].to_pylist())}
        self.shard = Shard(store.load_index(shard, search_params, mmap),
                           store.load_vectors(shard, mmap), store.load_cells(shard),
                           descriptions, store.load_basis(shard))

    def info(self) -> dict:
        return self.shard.info()

    def search(self, requests: list[dict]) -> list[dict]:
        return [self.shard.search(**r) for r in requests]
