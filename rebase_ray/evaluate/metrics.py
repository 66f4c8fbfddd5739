"""Per-example scores and their aggregation over domains.

- accuracy: labels and multiple choice, after normalisation (case, surrounding punctuation,
  "(B)" / "B." / "B) text" → "b" when the gold answer is a single letter; a prediction that
  names exactly one of the task's labels as a word counts as that label);
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

_LETTER = re.compile(r"^\(?([a-z])(?:[).:\]]|\s|$)")


def normalize_label(text: str) -> str:
    text = " ".join((text or "").lower().split())
    return text.strip(string.punctuation + " ")


def match_label(prediction: str, labels: list[str] | None) -> str:
    """The label a prediction names: itself when it is one, else the one label it mentions as
    a whole word (none or several → the normalised prediction, which then scores 0)."""
    pred = normalize_label(prediction)
    if not labels:
        return pred
    norm = [normalize_label(label) for label in labels]
    if pred in norm:
        return pred
    named = [lab for lab in norm if re.search(rf"\b{re.escape(lab)}\b", pred)]
    return named[0] if len(named) == 1 else pred


def accuracy_score(prediction: str, gold: str, labels: list[str] | None = None) -> float:
    gold_n = normalize_label(gold)
    pred = match_label(prediction, labels)
    if len(gold_n) == 1 and gold_n.isalpha():  # multiple choice by letter
        m = _LETTER.match(pred)
        pred = m.group(1) if m else pred
    return float(pred == gold_n)


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
