"""BalDistill's tail synthesis prompt (versioned like transform's prompts, whose system
message, reply line and format rule it shares): a few examples of one domain → one new
example of the task for that domain."""

from __future__ import annotations

from rebase_ray.config import TaskConfig
from rebase_ray.transform.prompts import (
    format_rule,
    reply_line,
    system_message,
    writes_rationale,
)

SYNTHESIS_VERSION = "synthesis-v3"


def synthesis_messages(task: TaskConfig, domain: str, examples: list[dict[str, str]],
                       label: str | None = None) -> list[dict[str, str]]:
    """BalDistill tail synthesis: one new example for `domain` from a few of its examples;
    with `label` (domains that are labels), the example's output is that label."""
    rationale = writes_rationale(task, synthesis=True)
    shots = []
    for i, ex in enumerate(examples, 1):
        shots += [f"Example {i}", f"Input: {ex['input'].strip()}",
                  f"Output: {ex['output'].strip()}", ""]
    user = "\n".join([
        f"Task: {task.instruction.strip()}",
        *(["The output must be exactly one of: " + ", ".join(task.labels) + "."]
          if task.labels else []),
        f"Domain: {domain}",
        "",
        f"Examples of the task from the domain '{domain}':",
        *shots,
        f"Write ONE new example of the task for the domain '{domain}', different from the "
        "examples above. " + (f"Its output must be: {label}. " if label else "")
        + format_rule(task),
        reply_line(rationale),
    ])
    return [{"role": "system", "content": system_message(rationale)}, {"role": "user", "content": user}]
