"""report.json + a self-contained report.html (matplotlib PNGs embedded as base64).

The report input is one JSON-able dict; every key is optional:

    {"title": str,
     "task": {...},                  # e.g. TaskConfig.model_dump()
     "evaluation": {...},            # evaluate.evaluate(...) result: macro / micro table,
                                     #   per-domain bars of the primary score (keys[0]) base
                                     #   vs trained, every score per domain beside it (label
                                     #   tasks: acc, acc_norm, gen_strict, gen_flexible),
                                     #   sample predictions
     "training": {...},              # train_student(...) summary: loss curve
     "examples": [{...}],            # training examples (input, output, rationale, domain,
                                     #   row_key, dataset, scores...): label / domain
                                     #   distributions and, with hits, the provenance view
     "hits": [{...}],                # retrieved rows (row_key, dataset, score, input_score,
                                     #   output_score, dataset_score, and the row's fields)
     "sections": [{...}]}            # more sections from other stages, rendered generically

A section is {"title": str, "text": str?, "bar_chart": {...}?, "line_chart": {...}?,
"table": [{...}]?} with
    bar_chart  = {"categories": [str], "series": {name: [number per category]}, "y_label": str}
    line_chart = {"series": {name: [[x, y], ...]}, "x_label": str, "y_label": str}
so a later stage (BalDistill: macro vs micro across stages, per-domain curves) adds its views
as data, without touching this module. The built-in views are made the same way.
"""

from __future__ import annotations

import base64
import collections
import html
import io
import json
import math
import random
from typing import Any

from rebase_ray.config import S3Config
from rebase_ray.storage import Storage

MAX_CATEGORIES = 25
PROVENANCE_SAMPLE = 12
PREDICTION_SAMPLE = 20
HIT_SCORES = ("score", "input_score", "output_score", "dataset_score", "rank")
HIT_META = ("task", "row_key", "dataset") + HIT_SCORES
# what the label scores mean, said in the evaluation section
KEY_TEXT = {
    "acc": "acc: the label with the highest log-likelihood after the student's prompt is the "
           "gold one",
    "acc_norm": "acc_norm: the same with each log-likelihood divided by the label's length in "
                "characters",
    "gen_strict": "gen_strict: the generated final answer is exactly the gold label",
    "gen_flexible": "gen_flexible: the generated final answer names the gold label (the label "
                    "as a whole word, or a choice letter)",
}


# ----------------------------------------------------------------------------- sections


def _evaluation_sections(ev: dict) -> list[dict]:
    key, keys, runs = ev["keys"][0], ev["keys"], ev["runs"]
    domains = sorted({d for agg in runs.values() for d in agg["domains"]})
    rows = [{"run": run, "average": avg, "n": agg["micro"]["n"],
             **{k: round(agg[avg][k], 4) for k in keys}}
            for run, agg in runs.items() for avg in ("macro", "micro")]
    groups = [(d, {run: agg["domains"].get(d, {}) for run, agg in runs.items()}) for d in domains]
    groups += [(f"({avg})", {run: agg[avg] for run, agg in runs.items()})
               for avg in ("macro", "micro")]
    per_domain = [{"domain": name, **{f"{run} {k}": scores[run].get(k) for k in keys
                                      for run in runs}}
                  for name, scores in groups]
    explained = "".join(f" {KEY_TEXT[k]}." for k in keys if k in KEY_TEXT)
    sections = [{"title": f"Evaluation: {ev['task']} ({ev['metric']}, {ev['n']} examples)",
                 "text": f"model {ev['model']}, adapter {ev['adapter'] or 'none'}; primary "
                         f"score {key}; macro = mean over domains, micro = mean over "
                         f"examples.{explained}",
                 "table": rows},
                {"title": f"Per-domain {key}: {' vs '.join(runs)}",
                 "bar_chart": {"categories": [name for name, _ in groups], "y_label": key,
                               "series": {run: [scores[run].get(key, 0.0) for _, scores in groups]
                                          for run in runs}}},
                {"title": f"Per-domain {', '.join(keys)}: {' vs '.join(runs)}",
                 "table": per_domain}]
    sample = [{"domain": p["domain"], "input": p["input"], "gold": p["output"],
               **{f"{run} answer": p[run]["answer"] for run in runs},
               **{f"{run} choice": p[run]["choice"] for run in runs if "choice" in p[run]},
               **{f"{run} {k}": p[run][k] for k in keys for run in runs}}
              for p in ev["predictions"][:PREDICTION_SAMPLE]]
    sections.append({"title": f"Sample predictions (first {len(sample)})", "table": sample})
    return sections


def _present(value: Any) -> bool:
    """Not missing: None, "" and NaN (pandas' missing value) are missing."""
    return value is not None and value != "" and not (isinstance(value, float)
                                                      and math.isnan(value))


def _counts(values: list[Any]) -> tuple[list[str], list[int]]:
    counts = collections.Counter(str(v) for v in values).most_common(MAX_CATEGORIES)
    return [c for c, _ in counts], [n for _, n in counts]


def _training_data_sections(examples: list[dict]) -> list[dict]:
    sections = []
    for field, title in (("output", "Label / answer distribution of the training data"),
                         ("domain", "Domain distribution of the training data"),
                         ("dataset", "Source datasets of the training data")):
        values = [e[field] for e in examples if _present(e.get(field))]
        if not values:
            continue
        cats, counts = _counts(values)
        sections.append({"title": title,
                         "text": f"{len(values)} examples, {len(set(map(str, values)))} distinct "
                                 f"values (top {len(cats)} shown).",
                         "bar_chart": {"categories": cats, "series": {"examples": counts},
                                       "y_label": "examples"}})
    return sections


def _loss_section(training: dict) -> dict:
    return {"title": "Training loss",
            "text": f"{training.get('steps')} steps, {training.get('examples')} examples, "
                    f"{training.get('tokens')} tokens; stopped by {training.get('stop_reason')}; "
                    f"{training.get('s_per_step')} s/step, "
                    f"{training.get('examples_per_s')} examples/s.",
            "line_chart": {"series": {"loss": training["loss_curve"]}, "x_label": "step",
                           "y_label": "loss (answer tokens)"}}


def _provenance_section(examples: list[dict], hits: list[dict], seed: int = 0) -> dict | None:
    by_key = {h["row_key"]: h for h in hits if h.get("row_key") is not None}
    linked = [e for e in examples if e.get("row_key") in by_key]
    if not linked:
        return None
    sample = random.Random(seed).sample(linked, min(PROVENANCE_SAMPLE, len(linked)))
    pairs = []
    for e in sample:
        hit = by_key[e["row_key"]]
        example = {k: e.get(k) for k in ("domain", "input", "rationale", "output")
                   if _present(e.get(k))}
        source = {"dataset": hit.get("dataset"), "row_key": hit["row_key"],
                  **{k: hit[k] for k in HIT_SCORES if hit.get(k) is not None},
                  **{k: v for k, v in _row_fields(hit).items()}}
        pairs.append((example, source))
    return {"title": f"Provenance: {len(sample)} of {len(linked)} training examples beside "
                     "the retrieved row each was made from",
            "pairs": pairs}


def _row_fields(hit: dict) -> dict:
    """The retrieved row's own fields: a `row`/`fields` mapping (or JSON of one), else every
    key that is not hit metadata."""
    for key in ("row", "fields"):
        value = hit.get(key)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if isinstance(value, dict):
            return value
    return {k: v for k, v in hit.items() if k not in HIT_META}


def build_sections(report: dict) -> list[dict]:
    sections: list[dict] = []
    if report.get("evaluation"):
        sections += _evaluation_sections(report["evaluation"])
    if report.get("training", {}).get("loss_curve"):
        sections.append(_loss_section(report["training"]))
    if report.get("examples"):
        sections += _training_data_sections(report["examples"])
        provenance = _provenance_section(report["examples"], report.get("hits") or [])
        if provenance:
            sections.append(provenance)
    return sections + list(report.get("sections") or [])


# ----------------------------------------------------------------------------- rendering


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def bar_png(spec: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats, series = spec["categories"], spec["series"]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(cats) * max(1, len(series))), 3.2))
    width = 0.8 / max(len(series), 1)
    for j, (name, values) in enumerate(series.items()):
        ax.bar([i + j * width - 0.4 + width / 2 for i in range(len(cats))], values, width,
               label=name)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels([c[:30] for c in cats], rotation=30, ha="right")
    ax.set_ylabel(spec.get("y_label", ""))
    if len(series) > 1:
        ax.legend()
    return _png(fig)


def line_png(spec: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, points in spec["series"].items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50
                else None, label=name)
    ax.set_xlabel(spec.get("x_label", ""))
    ax.set_ylabel(spec.get("y_label", ""))
    if len(spec["series"]) > 1:
        ax.legend()
    return _png(fig)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False)
    text = str(value)
    return html.escape(text if len(text) <= 600 else text[:600] + "…")


def _table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c, ''))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fields(d: dict) -> str:
    return "<dl>" + "".join(f"<dt>{html.escape(str(k))}</dt><dd>{_cell(v)}</dd>"
                            for k, v in d.items()) + "</dl>"


def render_section(section: dict) -> str:
    parts = [f"<section><h2>{html.escape(section['title'])}</h2>"]
    if section.get("text"):
        parts.append(f"<p>{html.escape(section['text'])}</p>")
    for kind, draw in (("bar_chart", bar_png), ("line_chart", line_png)):
        if section.get(kind):
            parts.append(f'<img class="plot" alt="{html.escape(section["title"])}" '
                         f'src="data:image/png;base64,{draw(section[kind])}">')
    if section.get("table"):
        parts.append(_table(section["table"]))
    if section.get("pairs"):
        parts.append('<table class="pairs"><thead><tr><th>training example</th>'
                     "<th>retrieved row it came from</th></tr></thead><tbody>")
        parts += [f"<tr><td>{_fields(ex)}</td><td>{_fields(src)}</td></tr>"
                  for ex, src in section["pairs"]]
        parts.append("</tbody></table>")
    parts.append("</section>")
    return "\n".join(parts)


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} td,th{border:1px solid #ddd;
padding:3px 6px;vertical-align:top;text-align:left} th{background:#f3f3f3}
img.plot{max-width:100%;display:block;margin:.5em 0} dl{margin:0} dt{font-weight:600}
dd{margin:0 0 .4em 1em;white-space:pre-wrap} table.pairs td{width:50%}
"""


def render_html(report: dict) -> str:
    title = report.get("title") or "rebase-ray report"
    body = "\n".join(render_section(s) for s in build_sections(report))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
            f"{body}\n</body></html>")


def write_report(out: str, report: dict, s3: S3Config | None = None) -> tuple[str, str]:
    """Write `<out>/report.json` and `<out>/report.html`; returns their URIs."""
    st = Storage.for_uri(out, s3)
    json_uri, html_uri = st.join(out, "report.json"), st.join(out, "report.html")
    st.write_json(json_uri, report)
    st.write_text(html_uri, render_html(report))
    return json_uri, html_uri
