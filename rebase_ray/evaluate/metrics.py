"""Per-example scores and their aggregation over domains.

Label tasks (the task's `labels`, multiple choice by letter included), as lm-evaluation-harness
scores multiple choice, plus the generated answer beside it:
- acc: the label with the highest log-likelihood after the student's prompt is the gold one;
- acc_norm: the same with each log-likelihood divided by the label's length in characters;
- gen_strict: the generated final answer in exactly the trained format (`formats.strict_answer`)
  is the gold label, up to surrounding whitespace and case;
- gen_flexible: the generated final answer (`formats.final_answer`) names the gold label
  (`formats.flexible_score`, `formats.named_label`): it is the label, or a choice letter "B" /
  "(B)" / "B." / "B)" / "B:" at its start followed by nothing or by the choice's text, or it
  names that one label as a whole word. A one-letter label is never read from a word ("a good
  movie" is not choice A), and no synonym, plural or other inflection maps to a label
  ("Sports" does not name "sport").

Other tasks:
- exact match and token F1: the official SQuAD v1.1 evaluation script's definitions
  (lower case, no punctuation, no articles a/an/the, whitespace collapsed; max over golds);
- pass@1: computed in `code_exec`.

Aggregation: per domain the mean of each score; macro = mean over domains of the domain
means; micro = mean over all examples.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable

from rebase_ray.formats import normalize_label

# ----------------------------------------------------------------------------- SQuAD v1.1


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (SQuAD v1.1)."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def squad_scores(prediction: str, golds: str | list[str]) -> dict[str, float]:
    """{'exact_match', 'f1'}: the max over the gold answers, as the official script does."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    return {"exact_match": max(exact_match_score(prediction, g) for g in golds),
            "f1": max(f1_score(prediction, g) for g in golds)}


# ----------------------------------------------------------------------------- labels

def gold_index(gold: str, labels: list[str]) -> int:
    """The position of the gold answer in `labels` (case and surrounding punctuation aside)."""
    norm = [normalize_label(label) for label in labels]
    try:
        return norm.index(normalize_label(gold))
    except ValueError:
        raise ValueError(f"gold answer {gold!r} is not one of the labels {labels}") from None


def strict_score(answer: str, gold: str) -> float:
    """1.0 when the answer is the gold label, up to surrounding whitespace and case."""
    return float(answer.strip().casefold() == gold.strip().casefold())


def length_normalized(logprobs: list[float], labels: list[str]) -> list[float]:
    """Each label's log-likelihood per character of the label (lm-evaluation-harness acc_norm)."""
    return [lp / len(label) for lp, label in zip(logprobs, labels)]


def argmax(values: list[float]) -> int:
    """The position of the largest value (the first of equal maxima)."""
    return max(range(len(values)), key=values.__getitem__)


def ranked_scores(logprobs: list[float], labels: list[str], gold: int) -> dict[str, float]:
    """{'acc', 'acc_norm'}: whether the most likely label, by summed log-likelihood and by
    log-likelihood per character, is `labels[gold]`."""
    return {"acc": float(argmax(logprobs) == gold),
            "acc_norm": float(argmax(length_normalized(logprobs, labels)) == gold)}


# ----------------------------------------------------------------------------- aggregation


def aggregate(scored: Iterable[dict], keys: list[str]) -> dict:
    """{'domains': {domain: {'n', key...}}, 'macro': {key...}, 'micro': {'n', key...}} from
    rows carrying `domain` and each score in `keys`."""
    by_domain: dict[str, list[dict]] = collections.defaultdict(list)
    rows = list(scored)
    for row in rows:
        by_domain[str(row["domain"])].append(row)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    domains = {d: {"n": len(rs), **{k: mean([r[k] for r in rs]) for k in keys}}
               for d, rs in sorted(by_domain.items())}
    macro = {k: mean([v[k] for v in domains.values()]) for k in keys}
    micro = {"n": len(rows), **{k: mean([r[k] for r in rows]) for k in keys}}
    return {"domains": domains, "macro": macro, "micro": micro}
