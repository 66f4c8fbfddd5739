"""Judging one teacher reply: the single place that turns a completion into a kept example or
a reject reason, for ReBase's transformation and BalDistill's synthesis and annotation alike.

- `judge_example`: a generated example ({"input", ["rationale",] "output"}) → truncated,
  unparseable, or the per-example filters (filters.check); the answer is canonicalised;
- `judge_answer`: the answer to a given input (transform.input: row) → truncated or the
  same filters;
- `judge_rationale`: a rationale for a known answer ({"rationale", "answer"}, or free text
  ending in "Answer: ...") → truncated, rationale_disagrees, or kept.

A reply cut by max_tokens (finish_reason "length") is `truncated`, never `unparseable`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rebase_ray.formats import ANSWER_PREFIX, checked_rationale
from rebase_ray.teacher.types import Completion
from rebase_ray.transform.filters import FilterContext, check, split_output
from rebase_ray.transform.parse import ParseError, parse_example, parse_object


@dataclass
class Verdict:
    reason: str | None  # None: kept
    detail: str = ""
    input: str = ""
    output: str = ""  # the final answer (canonical label spelling for label tasks)
    rationale: str = ""


def _truncated(reply: Completion) -> Verdict | None:
    if reply.finish_reason == "length":
        return Verdict("truncated", f"cut at max_tokens ({reply.completion_tokens} tokens)")
    return None


def judge_example(reply: Completion, ctx: FilterContext) -> Verdict:
    cut = _truncated(reply)
    if cut:
        return cut
    try:
        parsed = parse_example(reply.text)
    except ParseError as exc:
        return Verdict("unparseable", str(exc)[:500])
    if "rationale" in parsed:
        rationale, answer = parsed["rationale"], parsed["output"]
    else:
        rationale, answer = split_output(parsed["output"], ctx.task)
    example = {"input": parsed["input"], "output": parsed["output"], "answer": answer}
    reason = check(example, ctx)
    return Verdict(reason, parsed["output"][:500] if reason else "", parsed["input"],
                   example["answer"], rationale)


def judge_answer(reply: Completion, input_text: str, ctx: FilterContext) -> Verdict:
    """The teacher's answer to a given input (transform.input: row): the reply is the output."""
    cut = _truncated(reply)
    if cut:
        return cut
    output = reply.text.strip()
    rationale, answer = split_output(output, ctx.task)
    example = {"input": input_text, "output": output, "answer": answer}
    reason = check(example, ctx)
    return Verdict(reason, output[:500] if reason else "", input_text, example["answer"],
                   rationale)


def judge_rationale(reply: Completion, gold: str, labels: list[str] | None) -> Verdict:
    cut = _truncated(reply)
    if cut:
        return cut
    text = reply.text
    try:
        obj = parse_object(text, ("rationale", "answer"))
        text = f"{obj['rationale']}\n{ANSWER_PREFIX} {obj['answer']}"
    except ParseError:
        pass  # a free-text reply ("... Answer: X") is judged as it is
    rationale, answer = checked_rationale(text, gold, labels)
    if not rationale:
        return Verdict("rationale_disagrees", f"answered {answer[:100]!r}", output=gold)
    return Verdict(None, output=gold, rationale=rationale)
