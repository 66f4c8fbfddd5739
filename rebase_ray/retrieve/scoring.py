"""Exact ReBase row scoring over one shard's cells (numpy only, no I/O).

A shard's cells are stored one per line (the FAISS id is the line number); `RowIndex` groups
them by row. For a set of candidate rows, `score_rows` reads every cell vector of those rows
and computes, per row:

- input score  = max over the row's cells of c · mean(few-shot input vectors)
- output score = max over the row's cells of c · mean(few-shot output vectors)

and the cells that gave each maximum. The row score is the mean of those two and the
dataset score (cosine of the instruction and the source description), computed by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class RowIndex:
    """Cells grouped by row: the cells of row r are `order[offsets[r]:offsets[r + 1]]`."""

    row_of_cell: np.ndarray  # (n_cells,) int64
    order: np.ndarray  # (n_cells,) cell ids sorted by row
    offsets: np.ndarray  # (n_rows + 1,)
    row_key: np.ndarray  # (n_rows,) object: "dataset/config/split/row_idx"
    first_cell: np.ndarray  # (n_rows,) one cell of each row (to read its location)

    @classmethod
    def from_cells(cls, cells: pa.Table) -> RowIndex:
        keys = pc.binary_join_element_wise(
            cells["dataset"], cells["config"], cells["split"],
            pc.cast(cells["row_idx"], pa.string()), "/")
        encoded = pc.dictionary_encode(keys).combine_chunks()
        row_of_cell = encoded.indices.to_numpy().astype(np.int64)
        n_rows = len(encoded.dictionary)
        order = np.argsort(row_of_cell, kind="stable")
        counts = np.bincount(row_of_cell, minlength=n_rows)
        offsets = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(row_of_cell=row_of_cell, order=order, offsets=offsets,
                   row_key=np.asarray(encoded.dictionary.to_pylist(), dtype=object),
                   first_cell=order[offsets[:-1]])

    @property
    def num_rows(self) -> int:
        return len(self.row_key)

    def rows_of(self, cell_ids: np.ndarray) -> np.ndarray:
        """The distinct rows that hold these cells (FAISS's -1 padding ignored), sorted."""
        return distinct(self.row_of_cell[cell_ids[cell_ids >= 0]])[0]

    def cells_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cell ids of `rows`, concatenated row by row; start of each row's run in them)."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        run_starts = np.zeros(len(rows), dtype=np.int64)
        np.cumsum(lengths[:-1], out=run_starts[1:])
        positions = np.repeat(starts - run_starts, lengths) + np.arange(lengths.sum())
        return self.order[positions], run_starts


@dataclass
class RowScores:
    rows: np.ndarray  # (m,) row ids in the shard
    input_score: np.ndarray  # (m,) float32
    output_score: np.ndarray  # (m,) float32
    best_input_cell: np.ndarray  # (m,) cell ids
    best_output_cell: np.ndarray  # (m,) cell ids


def score_rows(index: RowIndex, vectors: np.ndarray, rows: np.ndarray,
               q_inputs: np.ndarray, q_outputs: np.ndarray) -> RowScores:
    """Exact input/output scores of `rows` from their cell vectors (`vectors[cell_id]`)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        empty = np.zeros(0, dtype=np.float32)
        none = np.zeros(0, dtype=np.int64)
        return RowScores(rows, empty, empty, none, none)
    cell_ids, run_starts = index.cells_of(rows)
    sims = np.asarray(vectors[cell_ids], dtype=np.float32) @ np.stack(
        [q_inputs, q_outputs]).astype(np.float32).T  # (cells, 2)
    best = np.maximum.reduceat(sims, run_starts, axis=0)  # (rows, 2)
    lengths = np.diff(np.append(run_starts, len(cell_ids)))
    run_of = np.repeat(np.arange(len(rows)), lengths)
    best_cells = []
    for j in range(2):
        hit = np.flatnonzero(sims[:, j] == best[run_of, j])  # in row order
        first = np.flatnonzero(np.r_[True, np.diff(run_of[hit]) != 0])  # a row's first maximal cell
        best_cells.append(cell_ids[hit[first]])
    return RowScores(rows, best[:, 0], best[:, 1], best_cells[0], best_cells[1])


def distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the sorted distinct values, the position of each one's first occurrence): np.unique's
    answer with return_index, by one stable sort (np.unique hashes integers, slower here)."""
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    first = np.r_[True, ranked[1:] != ranked[:-1]] if len(ranked) else np.zeros(0, bool)
    return ranked[first], order[first]


def rank_order(score: np.ndarray, row_key: np.ndarray) -> np.ndarray:
    """Indices sorting by score descending, ties broken by row key (a stable, shard-independent
    order). Keys are compared only within runs of equal scores."""
    neg = -np.asarray(score, dtype=np.float64)
    order = np.argsort(neg, kind="stable")
    ranked = neg[order]
    start = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    end = np.r_[start[1:], len(order)]
    keys = np.asarray(row_key, dtype=object)
    for a, b in zip(start[end - start > 1], end[end - start > 1]):
        tied = order[a:b]
        order[a:b] = tied[np.argsort(keys[tied], kind="stable")]
    return order


def cap_per_group(groups: np.ndarray, cap: int | None) -> np.ndarray:
    """A mask keeping the first `cap` items of each group, in the given (ranked) order."""
    if cap is None:
        return np.ones(len(groups), dtype=bool)
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    by_group = np.argsort(inverse, kind="stable")  # ranked order kept within each group
    group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_in_group = np.empty(len(groups), dtype=np.int64)
    rank_in_group[by_group] = np.arange(len(groups)) - group_start[inverse[by_group]]
    return rank_in_group < cap


def diversity_order(score: np.ndarray, vectors: np.ndarray, n: int,
                    weight: float) -> np.ndarray:
    """Maximal-marginal-relevance re-rank: repeatedly pick the item maximising
    weight · score − (1 − weight) · (max cosine to the items already picked).
    `score` must be sorted descending; returns the chosen indices in pick order."""
    n = min(n, len(score))
    chosen: list[int] = []
    closest = np.full(len(score), -np.inf, dtype=np.float32)
    free = np.ones(len(score), dtype=bool)
    vecs = np.asarray(vectors, dtype=np.float32)
    for _ in range(n):
        penalty = np.where(np.isfinite(closest), closest, 0.0)
        gain = weight * score - (1 - weight) * penalty
        gain[~free] = -np.inf
        pick = int(np.argmax(gain))
        chosen.append(pick)
        free[pick] = False
        closest = np.maximum(closest, vecs @ vecs[pick])
    return np.asarray(chosen, dtype=np.int64)
