"""Quality filters for generated examples. Each per-example filter returns a reject reason or
None; the duplicate filter runs over the whole set at the end. Every reject is counted and
written with its reason (see transform.stage)."""

from __future__ import annotations

from dataclasses import dataclass, field

from datasketch import MinHash, MinHashLSH

from rebase_ray.config import TaskConfig
from rebase_ray.formats import split_answer
from rebase_ray.text import NgramIndex, normalize

# Reasons, in the order the filters run (also the order of the stats table).
REASONS = ("truncated", "unparseable", "empty", "too_short", "label_not_in_set",
           "answer_not_a_span", "overlong", "copy_of_fewshot", "contaminated",
           "rationale_disagrees", "label_unconfirmed", "duplicate", "near_duplicate",
           "teacher_error", "budget_exhausted")


@dataclass
class FilterContext:
    task: TaskConfig
    max_output_chars: int = 2000
    min_input_chars: int = 1
    eval_index: NgramIndex = field(default_factory=lambda: NgramIndex([]))

    def __post_init__(self) -> None:
        self.fewshot_inputs = {normalize(e.input) for e in self.task.examples}
        self.fewshot_pairs = {(normalize(e.input), normalize(e.output))
                              for e in self.task.examples}
        self.labels = {normalize(label): label for label in self.task.labels or []}


def canonical_label(answer: str, ctx: FilterContext) -> str | None:
    """The task label an answer names (case and punctuation ignored), or None."""
    return ctx.labels.get(normalize(answer))


def check(example: dict[str, str], ctx: FilterContext) -> str | None:
    """Reject reason for one parsed example (`input`, `output`, `answer`), or None to keep.
    For label tasks the answer is rewritten to the canonical label spelling."""
    inp, out, answer = example["input"].strip(), example["output"].strip(), example["answer"]
    if not inp or not out or not answer.strip():
        return "empty"
    if len(inp) < ctx.min_input_chars:
        return "too_short"
    if ctx.labels:
        label = canonical_label(answer, ctx)
        if label is None:
            return "label_not_in_set"
        example["answer"] = label
    if ctx.task.answer == "span" and normalize(answer) not in normalize(inp):
        return "answer_not_a_span"
    if len(inp) + len(out) > ctx.max_output_chars:
        return "overlong"
    if normalize(inp) in ctx.fewshot_inputs or (normalize(inp), normalize(out)) in ctx.fewshot_pairs:
        return "copy_of_fewshot"
    if ctx.eval_index.overlaps(inp):
        return "contaminated"
    return None


def split_output(output: str, task: TaskConfig) -> tuple[str, str]:
    """(rationale, answer) of a generated output; outputs without CoT are all answer."""
    if task.cot == "none":
        return "", output.strip()
    return split_answer(output)


class Deduplicator:
    """Exact duplicates (normalised input) and near duplicates (word 3-shingles of the input
    with estimated Jaccard ≥ threshold), first one wins. MinHash LSH, tuned towards few
    false negatives, proposes candidates; each is confirmed on its MinHash estimate."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 128):
        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        self.num_perm = num_perm
        self.exact: set[str] = set()
        self.hashes: dict[str, MinHash] = {}

    def _minhash(self, text: str) -> MinHash:
        words = text.split()
        shingles = {" ".join(words[i: i + 3]) for i in range(max(1, len(words) - 2))}
        m = MinHash(num_perm=self.num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in shingles])
        return m

    def check(self, key: str, text: str) -> str | None:
        norm = normalize(text)
        if norm in self.exact:
            return "duplicate"
        m = self._minhash(norm)
        if any(m.jaccard(self.hashes[k]) >= self.threshold for k in self.lsh.query(m)):
            return "near_duplicate"
        self.exact.add(norm)
        self.hashes[key] = m
        self.lsh.insert(key, m)
        return None
