"""One datastore shard, searched: ANN proposes candidate rows, exact scoring ranks them.

`Shard` holds the shard's FAISS index, its cell vectors (memory-mapped `vectors.npy`) and its
cells grouped by row. `search` asks the index for the `k` nearest cells to the mean few-shot
input vector and the `k` nearest to the mean output vector; every row owning one of those
cells is a candidate and is rescored exactly from all of its cell vectors, so the scores it
reports are true cosines whatever the index type. `search` returns scores as arrays only;
`frame` builds the hits (row text as JSON) for the few rows the caller finally keeps.
`ShardActor` is the same thing as a Ray actor: it loads its shard once and serves batches
of searches from then on.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from rebase_ray.config import S3Config
from rebase_ray.retrieve.scoring import RowIndex, RowScores, cap_per_group, rank_order, score_rows

REFINE_ROUNDS = 4  # restricted searches while some dataset's bound beats the cut
DENSE_CELLS = 20_000  # a dataset with at most this many cells in the shard is scored in full
HIT_COLUMNS = ["row_key", "dataset", "config", "split", "row_idx", "score", "input_score",
               "output_score", "dataset_score", "best_input_column", "best_output_column", "row"]
SCORE_FIELDS = ("rows", "score", "input_score", "output_score", "dataset_score",
                "best_input_cell", "best_output_cell")


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
        cell_dataset = self.row_dataset[self.rows.row_of_cell]
        self.dataset_cells = np.bincount(cell_dataset, minlength=len(self.dataset_names))
        self._cell_dataset = cell_dataset
        self._dataset_rows = [np.flatnonzero(self.row_dataset == d)
                              for d in range(len(self.dataset_names))]
        import faiss

        self._ivf = faiss.try_extract_index_ivf(index)
        # Flat-coded indexes return exact inner products for the cells they find
        base = self._ivf if self._ivf is not None else getattr(index, "storage", index)
        self._exact_sims = isinstance(faiss.downcast_index(base), (
            faiss.IndexFlat, faiss.IndexIVFFlat))

    @property
    def num_cells(self) -> int:
        return len(self.vectors)

    def info(self) -> dict:
        return {"cells": self.num_cells, "rows": self.rows.num_rows,
                "datasets": sorted(self.dataset_names.tolist())}

    def search(self, q_inputs: np.ndarray, q_outputs: np.ndarray,
               dataset_scores: dict[str, float], k: int, top: int,
               exclude: Collection[str] = (), cap: int | None = None,
               refine_above: float | None = -np.inf) -> dict:
        """The shard's `top` rows by exact ReBase score among the candidates, as arrays
        (SCORE_FIELDS, plus row_key and dataset); `frame` turns chosen rows into hits.

        Candidates: rows owning one of the `k` nearest cells to either query vector. A row
        that is not a candidate scores at most (τ_in + τ_out + dataset score) / 3, τ being the
        k-th similarity found. While that bound beats both the shard's top-th score and
        `refine_above` for some dataset, those datasets are searched again: in full when they
        are small (DENSE_CELLS), else by one FAISS search restricted to their cells with twice
        the k. So the rows above the cut are exact up to the ANN's own recall. `refine_above`
        None skips refinement (a first, cheap pass whose `bound` tells the caller whether
        this shard may still hold better rows than the ones found).

        Rows of `exclude`d datasets are never returned as hits; those that would have ranked
        in the top are returned separately (`excluded`) so that the caller can report them.
        `cap` keeps at most that many rows per dataset."""
        k = min(k, self.num_cells)
        queries = np.ascontiguousarray(np.stack([q_inputs, q_outputs]), dtype=np.float32)
        sims, ids = self.index.search(queries, k)
        ds_by_code = np.array([dataset_scores.get(n, 0.0) for n in self.dataset_names],
                              dtype=np.float32)
        excluded_code = np.isin(self.dataset_names, list(exclude))
        # per dataset: the bound on the similarity of its cells not found, to each query
        floor = np.tile(self._kth(sims, k, self.num_cells), (len(self.dataset_names), 1))
        candidates, pruned = self._prune(sims, ids, floor[0], ds_by_code, excluded_code, top,
                                         cap)
        s = score_rows(self.rows, self.vectors, candidates, q_inputs, q_outputs)
        next_k = 2 * k
        for _ in range(REFINE_ROUNDS if refine_above is not None else 0):
            score = (s.input_score + s.output_score + ds_by_code[self.row_dataset[s.rows]]) / 3
            kept = np.sort(score[~excluded_code[self.row_dataset[s.rows]]])[::-1]
            cutoff = max(kept[top - 1] if len(kept) >= top else -np.inf, refine_above)
            bound = (floor.sum(axis=1) + ds_by_code) / 3
            open_ = (bound > cutoff) & ~excluded_code & np.isfinite(bound)
            if not open_.any():
                break
            dense = open_ & (self.dataset_cells <= DENSE_CELLS)
            new = [self._dataset_rows[d] for d in np.flatnonzero(dense)]
            floor[dense] = -np.inf
            ann = open_ & ~dense
            if ann.any():
                size = int(self.dataset_cells[ann].sum())
                kd = min(next_k, size)
                sims, ids = self.index.search(queries, kd, params=self._selector(ann))
                floor[ann] = self._kth(sims, kd, size)
                new.append(self.rows.rows_of(ids.ravel()))
                next_k *= 2
            rows = np.setdiff1d(np.concatenate(new), s.rows)
            s = _concat(s, score_rows(self.rows, self.vectors, rows, q_inputs, q_outputs))
        rows = s.rows
        ds = ds_by_code[self.row_dataset[rows]]
        score = (s.input_score + s.output_score + ds) / 3
        order = rank_order(score, self.rows.row_key[rows])
        excluded = excluded_code[self.row_dataset[rows]]
        keep = order[~excluded[order]]
        keep = keep[cap_per_group(self.row_dataset[rows[keep]], cap)]
        cut_off, keep = len(keep) > top, keep[:top]
        dropped = order[excluded[order]][:top]
        bound = (floor.sum(axis=1) + ds_by_code) / 3
        bound = bound[~excluded_code & np.isfinite(bound)]
        return {
            "rows": rows[keep], "score": score[keep], "input_score": s.input_score[keep],
            "output_score": s.output_score[keep], "dataset_score": ds[keep],
            "best_input_cell": s.best_input_cell[keep],
            "best_output_cell": s.best_output_cell[keep],
            "row_key": self.rows.row_key[rows[keep]],
            "dataset": self.dataset_names[self.row_dataset[rows[keep]]],
            "excluded": {"row_key": self.rows.row_key[rows[dropped]],
                         "dataset": self.dataset_names[self.row_dataset[rows[dropped]]],
                         "score": score[dropped]},
            "bound": float(bound.max()) if len(bound) else -np.inf,  # best unfound row
            "candidates": len(rows),
            # every row that could be a hit was scored and returned
            "complete": len(bound) == 0 and not pruned and not cut_off,
        }

    def _prune(self, sims: np.ndarray, ids: np.ndarray, tau: np.ndarray,
               ds_by_code: np.ndarray, excluded_code: np.ndarray, top: int,
               cap: int | None) -> tuple[np.ndarray, bool]:
        """The candidate rows worth scoring exactly. The search already gives the similarity
        of the cells it found (exact for Flat-coded indexes, close otherwise), so a candidate
        row's score lies between (found in + found out + ds) / 3, a missing side counting as
        -1, and the same with each side raised to at least τ, the k-th similarity found (its
        other cells were not found, so they are below τ). Rows whose upper bound is below
        the top-th lower bound cannot make the top and are left out. No pruning with a
        per-dataset cap, or when the index is not Flat-coded (its similarities are
        estimates). Returns the rows and whether any was left out."""
        found = ids >= 0
        rows = self.rows.rows_of(ids.ravel())
        if cap is not None or not self._exact_sims or len(rows) <= top:
            return rows, False
        best = np.full((2, len(rows)), -1.0, dtype=np.float32)
        for j in range(2):
            pos = np.searchsorted(rows, self.rows.row_of_cell[ids[j][found[j]]])
            np.maximum.at(best[j], pos, sims[j][found[j]])
        ds = ds_by_code[self.row_dataset[rows]]
        lower = (best[0] + best[1] + ds) / 3
        upper = (np.maximum(best[0], tau[0]) + np.maximum(best[1], tau[1]) + ds) / 3
        excluded = excluded_code[self.row_dataset[rows]]
        keep = np.ones(len(rows), dtype=bool)
        for members in (~excluded, excluded):  # the hits, and the excluded rows reported
            lo = lower[members]
            if len(lo) > top:
                cut = np.partition(lo, len(lo) - top)[len(lo) - top]
                keep[members] = upper[members] >= cut
        return rows[keep], not keep.all()

    @staticmethod
    def _kth(sims: np.ndarray, k: int, size: int) -> np.ndarray:
        """The bound on the similarity of cells not found: the k-th found, or -inf when the
        search covered every cell."""
        if k >= size:
            return np.full(2, -np.inf, np.float32)
        return np.maximum(sims[:, k - 1], -1.0)  # FAISS pads missing results with -FLT_MAX

    def _selector(self, datasets: np.ndarray):
        """FAISS search parameters restricting a search to the cells of `datasets` (a mask
        over the shard's dataset codes), as a bitmap over the shard's cell ids."""
        import faiss

        bitmap = np.packbits(datasets[self._cell_dataset], bitorder="little")
        sel = faiss.IDSelectorBitmap(self.num_cells, faiss.swig_ptr(bitmap))
        if self._ivf is not None:
            params = faiss.SearchParametersIVF(sel=sel, nprobe=self._ivf.nprobe)
        elif hasattr(self.index, "hnsw"):
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=self.index.hnsw.efSearch)
        else:
            params = faiss.SearchParameters(sel=sel)
        params.keep_alive = (sel, bitmap)  # the Python objects must outlive the search
        return params

    def frame(self, found: dict, with_vectors: bool = False) -> dict[str, list]:
        """Hits (HIT_COLUMNS, as lists) for rows chosen from `search` results (its
        SCORE_FIELDS arrays, any subset of its rows): locations, scores, best columns and the
        row as JSON. `with_vectors` adds each row's best input cell vector (for a diversity
        re-rank)."""
        rows = np.asarray(found["rows"], dtype=np.int64)
        cell_ids, run_starts = self.rows.cells_of(rows)
        columns = self.columns.take(pa.array(cell_ids)).to_pylist()
        values = self.values.take(pa.array(cell_ids)).to_pylist()
        bounds = np.append(run_starts, len(cell_ids))
        best = self.columns.take(pa.array(np.concatenate([
            found["best_input_cell"], found["best_output_cell"]]).astype(np.int64))).to_pylist()
        out = {
            "row_key": self.rows.row_key[rows].tolist(),
            "dataset": self.dataset_names[self.row_dataset[rows]].tolist(),
            "config": self.row_config[rows].tolist(),
            "split": self.row_split[rows].tolist(),
            "row_idx": self.row_idx[rows].tolist(),
            **{f: np.asarray(found[f], dtype=np.float32).tolist()
               for f in ("score", "input_score", "output_score", "dataset_score")},
            "best_input_column": best[:len(rows)],
            "best_output_column": best[len(rows):],
            "row": [json.dumps(dict(zip(columns[a:b], values[a:b])), ensure_ascii=False)
                    for a, b in pairwise(bounds)],
        }
        if with_vectors:
            out["vector"] = list(np.asarray(self.vectors[np.asarray(
                found["best_input_cell"], dtype=np.int64)]))
        return out


def _concat(a: RowScores, b: RowScores) -> RowScores:
    return RowScores(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in
                       ("rows", "input_score", "output_score", "best_input_cell",
                        "best_output_cell")))


@ray.remote
class ShardActor:
    """A `Shard` loaded once (index and vectors memory-mapped) inside a Ray actor. Its calls
    take a list of requests, so that one round trip serves a batch of queries."""

    def __init__(self, datastore: str, shard: int, s3: S3Config | None = None,
                 verify: str = "cached", search_params: str | None = None):
        import faiss

        from rebase_ray.datastore import Datastore

        faiss.omp_set_num_threads(1)  # two queries per search: threads only add overhead
        store = Datastore.open(datastore, s3, verify=verify)
        self.shard = Shard(store.load_index(shard, search_params), store.load_vectors(shard),
                           store.load_cells(shard))

    def info(self) -> dict:
        return self.shard.info()

    def search(self, requests: list[dict]) -> list[dict]:
        return [self.shard.search(**r) for r in requests]

    def frame(self, requests: list[tuple[dict, bool]]) -> list[dict[str, list]]:
        return [self.shard.frame(found, with_vectors) for found, with_vectors in requests]
