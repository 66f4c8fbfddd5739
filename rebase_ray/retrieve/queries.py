"""A task → the three ReBase query vectors.

The queries are the instruction, each few-shot input and each few-shot output, embedded with
the datastore's embedder (L2-normalised). Because every vector is unit length,
mean_i cos(c, x_i) = c · mean_i(x_i): the mean of the input vectors scores a cell's "mean cosine
to the few-shot inputs" with one dot product, and the same vector drives the ANN search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Query:
    instruction: np.ndarray  # (dim,) unit vector
    inputs: np.ndarray  # (dim,) mean of the few-shot input vectors (not re-normalised)
    outputs: np.ndarray  # (dim,) mean of the few-shot output vectors


def build_query(embed: Callable[[list[str]], np.ndarray], instruction: str,
                inputs: list[str], outputs: list[str]) -> Query:
    """Embed instruction + examples in one call and reduce them to the three query vectors."""
    return build_queries(embed, [(instruction, inputs, outputs)])[0]


def build_queries(embed: Callable[[list[str]], np.ndarray],
                  tasks: list[tuple[str, list[str], list[str]]]) -> list[Query]:
    """`build_query` for many (instruction, inputs, outputs), embedded in one batch."""
    for _, inputs, outputs in tasks:
        if not inputs or len(inputs) != len(outputs):
            raise ValueError("a query needs at least one example, each with an input and an "
                             "output")
    texts = [t for instruction, inputs, outputs in tasks for t in (instruction, *inputs, *outputs)]
    vecs = np.asarray(embed(texts), dtype=np.float32) if texts else np.zeros((0, 0), np.float32)
    queries, at = [], 0
    for _, inputs, _ in tasks:
        k = len(inputs)
        v = vecs[at:at + 1 + 2 * k]
        queries.append(Query(instruction=v[0], inputs=v[1:1 + k].mean(axis=0),
                             outputs=v[1 + k:].mean(axis=0)))
        at += 1 + 2 * k
    return queries
