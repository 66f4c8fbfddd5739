"""A task → the three ReBase query vectors.

The queries are the instruction, each few-shot input and each few-shot output, embedded with
the datastore's embedder (L2-normalised). Because every vector is unit length,
mean_i cos(c, x_i) = c · mean_i(x_i): the mean of the input vectors scores a cell's "mean cosine
to the few-shot inputs" with one dot product, and the same vector drives the ANN search.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Query:
    instruction: np.ndarray  # (dim,) unit vector
    inputs: np.ndarray  # (dim,) mean of the few-shot input vectors (not re-normalised)
    outputs: np.ndarray  # (dim,) mean of the few-shot output vectors

    @property
    def stacked(self) -> np.ndarray:
        """(3, dim): instruction, inputs, outputs (what a shard is sent)."""
        return np.stack([self.instruction, self.inputs, self.outputs]).astype(np.float32)


class CachedEmbedder:
    """`embed` remembering the vectors of the last `size` distinct texts (least recently used
    first out): a task's instruction and few-shot examples come back with each of its
    requests. `size` 0 remembers nothing."""

    def __init__(self, embed: Callable[[list[str]], np.ndarray], size: int):
        self.embed, self.size = embed, size
        self.vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.size == 0 or not texts:
            return self.embed(texts)
        new = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if new:
            self.vectors.update(zip(new, np.asarray(self.embed(new), np.float32)))
        self.misses += len(new)
        self.hits += len(texts) - len(new)
        out = np.stack([self.vectors[t] for t in texts])
        for t in texts:
            self.vectors.move_to_end(t)
        while len(self.vectors) > self.size:
            self.vectors.popitem(last=False)
        return out


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
