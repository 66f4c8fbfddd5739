"""The data card written beside generated examples (README.md): where the data came from,
how much each source contributed, their descriptions and licenses, and what was rejected."""

from __future__ import annotations

import pandas as pd

from rebase_ray.config import SourceConfig, TaskConfig


def data_card(task: TaskConfig, summary: dict, examples: pd.DataFrame,
              sources: list[SourceConfig] | None) -> str:
    by_name = {s.name: s for s in sources or []}
    counts = summary["counts"]
    lines = [
        f"# Generated data for task `{task.name}`", "",
        f"Task: {task.instruction}", "",
        (f"{counts['kept']} examples kept out of {counts['retrieved']} retrieved rows "
         f"(yield {counts['yield']:.1%}), made by the ReBase transformation "
         f"(prompt `{summary['prompt_version']}`) with teacher "
         f"`{examples['teacher'].iloc[0] if len(examples) else 'n/a'}`."), "",
        "## Sources", "",
        "| source | retrieved | kept | description | license |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in summary["per_source"]:
        src = by_name.get(row["dataset"])
        desc = (src.description if src else "").replace("|", "/")
        lic = (src.license if src and src.license else "not stated")
        lines.append(f"| {row['dataset']} | {row['retrieved']} | {row['kept']} | {desc} | {lic} |")
    lines += ["", "## Rejected", "", "| reason | rows |", "| --- | --- |"]
    for reason, n in summary["rejects_by_reason"].items():
        lines.append(f"| {reason} | {n} |")
    lines += ["", ("Generated examples inherit the licenses and terms of the sources they were "
                   "made from. Check each source's license before publishing this data or a "
                   "model trained on it."), ""]
    return "\n".join(lines)
