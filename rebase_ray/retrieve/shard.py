"""One datastore shard, searched: ANN proposes candidate rows, exact scoring ranks them.

`Shard` holds the shard's FAISS index, its cell vectors (memory-mapped `vectors.npy`) and its
cells grouped by row. `search` asks the index for the `k` nearest cells to the mean few-shot
input vector and the `k` nearest to the mean output vector; every row owning one of those
cells is a candidate and is rescored exactly from all of its cell vectors, so the scores it
reports are true cosines whatever the index type. `ShardActor` is the same thing as a Ray
actor: it loads its shard once and serves searches from then on.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from itertools import pairwise

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray

from rebase_ray.config import S3Config
from rebase_ray.retrieve.scoring import RowIndex, RowScores, cap_per_group, rank_order, score_rows

REFINE_ROUNDS = 4  # dataset-restricted searches while a dataset's bound beats the cut
HIT_COLUMNS = ["row_key", "dataset", "config", "split", "row_idx", "score", "input_score",
               "output_score", "dataset_score", "best_input_column", "best_output_column", "row"]


class Shard:
    def __init__(self, index, vectors: np.ndarray, cells: pa.Table):
        if index.ntotal != len(vectors) or len(vectors) != cells.num_rows:
            raise ValueError(f"shard mismatch: index has {index.ntotal} vectors, vectors.npy "
                             f"{len(vectors)}, cells.parquet {cells.num_rows} rows")
        self.index = index
        self.vectors = vectors
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
        self._cells_by_dataset: dict[int, np.ndarray] = {}
        import faiss

        self._ivf = faiss.try_extract_index_ivf(index)

    @property
    def num_cells(self) -> int:
        return len(self.vectors)

    def info(self) -> dict:
        return {"cells": self.num_cells, "rows": self.rows.num_rows,
                "datasets": sorted(self.dataset_names.tolist())}

    def search(self, q_inputs: np.ndarray, q_outputs: np.ndarray,
               dataset_scores: dict[str, float], k: int, top: int,
               exclude: Collection[str] = (), cap: int | None = None,
               with_vectors: bool = False) -> dict:
        """The shard's `top` rows by exact ReBase score among the candidates.

        Candidates: rows owning one of the `k` nearest cells to either query vector. A row
        that is not a candidate scores at most (τ_in + τ_out + dataset score) / 3, τ being the
        k-th similarity found; while that bound beats the current top-th score for some
        dataset, that dataset alone is searched (a FAISS ID selector over its cells) with
        growing k. So the top rows are exact up to the ANN's own recall.

        Rows of `exclude`d datasets are never returned as hits; those that would have ranked
        in the top are returned separately (`excluded`) so that the caller can report them.
        `cap` keeps at most that many rows per dataset. `with_vectors` adds each hit's best
        input cell vector (for a diversity re-rank)."""
        k = min(k, self.num_cells)
        queries = np.ascontiguousarray(np.stack([q_inputs, q_outputs]), dtype=np.float32)
        sims, ids = self.index.search(queries, k)
        ds_by_code = np.array([dataset_scores.get(n, 0.0) for n in self.dataset_names],
                              dtype=np.float32)
        excluded_code = np.isin(self.dataset_names, list(exclude))
        # per dataset: the k-th similarity to each query so far, and the k to ask for next
        floor = np.tile(self._kth(sims, k, self.num_cells), (len(self.dataset_names), 1))
        next_k = np.full(len(self.dataset_names), 2 * k)
        s = score_rows(self.rows, self.vectors, self.rows.rows_of(ids.ravel()), q_inputs,
                       q_outputs)
        for _ in range(REFINE_ROUNDS):
            score = (s.input_score + s.output_score + ds_by_code[self.row_dataset[s.rows]]) / 3
            kept = np.sort(score[~excluded_code[self.row_dataset[s.rows]]])[::-1]
            cutoff = kept[top - 1] if len(kept) >= top else -np.inf
            bound = (floor.sum(axis=1) + ds_by_code) / 3
            open_ = np.flatnonzero((bound > cutoff) & ~excluded_code & np.isfinite(bound))
            if len(open_) == 0:
                break
            new = []
            for d in open_:
                ids_d, size = self._dataset_cells(d)
                kd = min(int(next_k[d]), size)
                sims, ids = self.index.search(queries, kd, params=self._selector(ids_d))
                floor[d] = self._kth(sims, kd, size)
                next_k[d] *= 2
                new.append(ids.ravel())
            rows = np.setdiff1d(self.rows.rows_of(np.concatenate(new)), s.rows)
            s = _concat(s, score_rows(self.rows, self.vectors, rows, q_inputs, q_outputs))
        rows = s.rows
        ds = ds_by_code[self.row_dataset[rows]]
        score = (s.input_score + s.output_score + ds) / 3
        order = rank_order(score, self.rows.row_key[rows])
        excluded = excluded_code[self.row_dataset[rows]]
        keep = order[~excluded[order]]
        keep = keep[cap_per_group(self.row_dataset[rows[keep]], cap)][:top]
        dropped = order[excluded[order]][:top]
        hits = self._frame(rows[keep], score[keep], s.input_score[keep], s.output_score[keep],
                           ds[keep], s.best_input_cell[keep], s.best_output_cell[keep])
        if with_vectors:
            hits["vector"] = list(np.asarray(self.vectors[s.best_input_cell[keep]]))
        return {
            "hits": hits,
            "excluded": pd.DataFrame({
                "row_key": self.rows.row_key[rows[dropped]],
                "dataset": self.dataset_names[self.row_dataset[rows[dropped]]],
                "score": score[dropped]}),
            "candidates": len(rows),
            "complete": k == self.num_cells,  # every row was a candidate
        }

    @staticmethod
    def _kth(sims: np.ndarray, k: int, size: int) -> np.ndarray:
        """The bound on the similarity of cells not found: the k-th found, or -inf when the
        search covered every cell."""
        if k >= size:
            return np.full(2, -np.inf, np.float32)
        return np.maximum(sims[:, k - 1], -1.0)  # FAISS pads missing results with -FLT_MAX

    def _dataset_cells(self, code: int) -> tuple[np.ndarray, int]:
        if code not in self._cells_by_dataset:
            cell_codes = self.row_dataset[self.rows.row_of_cell]
            self._cells_by_dataset[code] = np.flatnonzero(cell_codes == code)
        ids = self._cells_by_dataset[code]
        return ids, len(ids)

    def _selector(self, ids: np.ndarray):
        """FAISS search parameters restricting a search to `ids` (a range when contiguous,
        which it is in the datastore's (dataset, row, column) order)."""
        import faiss

        if ids[-1] - ids[0] + 1 == len(ids):
            sel = faiss.IDSelectorRange(int(ids[0]), int(ids[-1]) + 1)
        else:
            sel = faiss.IDSelectorBatch(ids.astype(np.int64))
        if self._ivf is not None:
            params = faiss.SearchParametersIVF(sel=sel, nprobe=self._ivf.nprobe)
        elif hasattr(self.index, "hnsw"):
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=self.index.hnsw.efSearch)
        else:
            params = faiss.SearchParameters(sel=sel)
        params.keep_selector = sel  # the Python object must outlive the search
        return params

    def _frame(self, rows, score, input_score, output_score, dataset_score,
               best_in, best_out) -> pd.DataFrame:
        cell_ids, run_starts = self.rows.cells_of(rows)
        columns = self.columns.take(pa.array(cell_ids)).to_pylist()
        values = self.values.take(pa.array(cell_ids)).to_pylist()
        bounds = np.append(run_starts, len(cell_ids))
        row_json = [json.dumps(dict(zip(columns[a:b], values[a:b])), ensure_ascii=False)
                    for a, b in pairwise(bounds)]
        return pd.DataFrame({
            "row_key": self.rows.row_key[rows],
            "dataset": self.dataset_names[self.row_dataset[rows]],
            "config": self.row_config[rows],
            "split": self.row_split[rows],
            "row_idx": self.row_idx[rows].astype(np.int64),
            "score": score.astype(np.float32),
            "input_score": input_score.astype(np.float32),
            "output_score": output_score.astype(np.float32),
            "dataset_score": dataset_score.astype(np.float32),
            "best_input_column": self.columns.take(pa.array(best_in)).to_pylist(),
            "best_output_column": self.columns.take(pa.array(best_out)).to_pylist(),
            "row": row_json,
        }, columns=HIT_COLUMNS)


def _concat(a: RowScores, b: RowScores) -> RowScores:
    return RowScores(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in
                       ("rows", "input_score", "output_score", "best_input_cell",
                        "best_output_cell")))


@ray.remote
class ShardActor:
    """A `Shard` loaded once (index and vectors memory-mapped) inside a Ray actor."""

    def __init__(self, datastore: str, shard: int, s3: S3Config | None = None):
        import faiss

        from rebase_ray.datastore import Datastore

        faiss.omp_set_num_threads(1)  # two queries per search: threads only add overhead
        store = Datastore.open(datastore, s3)
        self.shard = Shard(store.load_index(shard), store.load_vectors(shard),
                           store.load_cells(shard))

    def info(self) -> dict:
        return self.shard.info()

    def search(self, *args, **kwargs) -> dict:
        return self.shard.search(*args, **kwargs)
