"""The shapes the teacher is asked to reply in, derived from the task, as OpenAI
`response_format` / vLLM `structured_outputs` request fields. The same request constrains the
bundled CPU teacher (xgrammar), vLLM (natively) or a remote OpenAI-compatible API.

- a task example (transformation, tail synthesis): {"input", ["rationale",] "output"}; `output`
  is an enum of the task's labels, else a string with a maxLength; `input` has the
  reply's minLength and maxLength; `rationale` is present when
  the example writes its own (`cot: fewshot`, or a synthesis with `cot: annotate`) and comes
  before `output`, so the reasoning is written before the answer;
- a rationale for a given answer (BalDistill's annotation, cot: annotate):
  {"rationale", "answer"}, the answer constrained like `output`;
- a label for an input (the label check): one of the labels (`structured_outputs.choice`).
"""

from __future__ import annotations

from typing import Any

from rebase_ray.config import ReplyFormat, TaskConfig
from rebase_ray.transform.prompts import writes_rationale

EXAMPLE_SCHEMA = "task_example"
RATIONALE_SCHEMA = "rationale"


def _answer(task: TaskConfig, max_chars: int) -> dict[str, Any]:
    if task.labels:
        return {"type": "string", "enum": list(task.labels)}
    return {"type": "string", "minLength": 1, "maxLength": max_chars}


def _text(max_chars: int, min_chars: int = 1) -> dict[str, Any]:
    return {"type": "string", "minLength": min_chars, "maxLength": max_chars}


def example_schema(task: TaskConfig, max_input_chars: int, max_answer_chars: int,
                   max_rationale_chars: int, rationale: bool,
                   min_input_chars: int = 1) -> dict[str, Any]:
    props: dict[str, Any] = {"input": _text(max_input_chars, min_input_chars)}
    if rationale:
        props["rationale"] = _text(max_rationale_chars)
    props["output"] = _answer(task, max_answer_chars)
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}


def rationale_schema(task: TaskConfig, max_answer_chars: int,
                     max_rationale_chars: int) -> dict[str, Any]:
    props = {"rationale": _text(max_rationale_chars), "answer": _answer(task, max_answer_chars)}
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": True}}


def label_choice(task: TaskConfig) -> dict[str, Any]:
    """vLLM's `structured_outputs` request field for one label of the task."""
    return {"choice": list(task.labels or [])}


def reply_formats(task: TaskConfig, cfg: ReplyFormat, synthesis: bool = False,
                  label: str | None = None) -> dict[str, dict[str, Any]]:
    """The request fields for the two reply kinds, {"example": {...}, "rationale": {...}};
    empty with `structured: false`. An example has a `rationale` when it writes one
    (`prompts.writes_rationale`: transform's or, with `synthesis`, distill's). With `label`,
    an example's `output` can only be that label (a synthesis for a given label)."""
    if not cfg.structured:
        return {"example": {}, "rationale": {}}
    example = example_schema(task, cfg.max_input_chars, cfg.max_answer_chars,
                             cfg.max_rationale_chars, writes_rationale(task, synthesis),
                             cfg.min_input_chars)
    if label is not None:
        example["properties"]["output"] = {"type": "string", "enum": [label]}
    rationale = rationale_schema(task, cfg.max_answer_chars, cfg.max_rationale_chars)
    return {"example": {"response_format": response_format(EXAMPLE_SCHEMA, example)},
            "rationale": {"response_format": response_format(RATIONALE_SCHEMA, rationale)}}
