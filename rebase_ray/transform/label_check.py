"""Label quality from a weak teacher: after a label example is generated, the teacher labels
the generated input again, constrained to the label set (`structured_outputs.choice`).

- roundtrip: one greedy label; the example is kept only when it agrees with the generated one;
- vote: `votes` sampled labels (one request each, each with its own seed); the majority label
  is kept (it may replace the generated label: flag `relabelled`) when its share is at least
  `min_agreement` (Prompt2Model's multi-vote), else the example is rejected.

Every label request is a teacher call and counts against the client's budget.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rebase_ray.config import LabelCheck, TaskConfig
from rebase_ray.teacher.client import BudgetExceeded, TeacherClient, request_seed
from rebase_ray.transform.filters import FilterContext, canonical_label
from rebase_ray.transform.prompts import classify_messages
from rebase_ray.transform.schema import label_choice


@dataclass
class LabelVerdict:
    label: str | None  # the label to keep; None: reject with `reason`
    reason: str | None = None
    detail: str = ""
    votes: dict[str, int] = field(default_factory=dict)
    requests: int = 0  # label requests sent
    prompt_tokens: int = 0
    completion_tokens: int = 0


def check_labels(client: TeacherClient, task: TaskConfig, ctx: FilterContext,
                 examples: list[tuple[str, str]], cfg: LabelCheck, seed: int,
                 max_tokens: int = 16) -> list[LabelVerdict]:
    """One verdict per (input, generated label)."""
    if cfg.mode == "none" or not examples:
        return [LabelVerdict(label) for _, label in examples]
    k = 1 if cfg.mode == "roundtrip" else cfg.votes
    prompts = [classify_messages(task, inp) for inp, _ in examples]
    sampling = {"temperature": 0.0 if k == 1 else cfg.temperature, "max_tokens": max_tokens,
                "structured_outputs": label_choice(task)}
    # one round over every example per vote, each request with its own seed: k samples, not
    # one sample repeated
    rounds = [client.chat_many(prompts, **sampling, per_request=[
        {"seed": request_seed(seed, "label", inp, j)} for inp, _ in examples]) for j in range(k)]
    return [_verdict([r[i] for r in rounds], label, ctx, cfg)
            for i, (_, label) in enumerate(examples)]


def _verdict(replies: list, label: str, ctx: FilterContext, cfg: LabelCheck) -> LabelVerdict:
    v = LabelVerdict(None)
    votes: Counter[str] = Counter()
    for r in replies:
        if isinstance(r, BudgetExceeded):
            continue
        v.requests += 1
        if isinstance(r, Exception):
            continue
        v.prompt_tokens += r.prompt_tokens
        v.completion_tokens += r.completion_tokens
        votes[canonical_label(r.text, ctx) or r.text.strip()[:40]] += 1
    v.votes = dict(votes)
    if not votes:
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        v.reason = "budget_exhausted" if isinstance(failed, BudgetExceeded) else "teacher_error"
        v.detail = f"label check: {type(failed).__name__}: {failed}"[:500]
        return v
    top, count = votes.most_common(1)[0]
    share = count / sum(votes.values())
    if cfg.mode == "roundtrip":
        ok = top == label
    else:
        ok = share >= cfg.min_agreement and canonical_label(top, ctx) is not None
    if ok:
        v.label = top
    else:
        v.reason = "label_unconfirmed"
        v.detail = f"generated {label!r}, teacher labels {dict(votes)}"
    return v
