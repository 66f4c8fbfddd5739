"""A tiny corpus and task for the retrieval tests: four sources (two of them the task's own
benchmark under other names), a planted row equal to a few-shot example, and a row that
copies an eval-set input (contamination)."""

from __future__ import annotations

import json
from pathlib import Path

from rebase_ray.config import EvalSetConfig, FewShot, SourceConfig, TaskConfig

EXAMPLES = [
    ("Chelsea won the league title after a late two-nil victory over Arsenal at the Bridge.",
     "sport"),
    ("Shares in the airline fell sharply after it warned that fuel costs would cut profits.",
     "business"),
]
EVAL = [
    (("The prime minister said the new budget would protect schools and hospitals from the "
      "spending cuts planned for next year"), "politics"),
    (("A new smartphone with a folding screen and a week of battery life went on sale in "
      "Seoul this morning to long queues"), "tech"),
]
TOPICS = ["cooking pasta", "gardening tomatoes", "repairing bicycles", "learning guitar",
          "painting walls", "baking bread", "knitting scarves", "hiking trails",
          "fixing laptops", "training puppies"]
PLANTED = "headlines/default/train/12"
CONTAMINATED = "headlines/default/train/3"


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_corpus(root: Path) -> tuple[list[SourceConfig], TaskConfig]:
    qa = [{"question": f"How do I get better at {t}?",
           "answer": f"Practice {t} a little every day and ask for feedback."}
          for t in TOPICS * 3]
    headlines = [{"text": f"Local club number {i} reports record interest in {t}.",
                  "label": "lifestyle"} for i, t in enumerate(TOPICS * 2)]
    headlines[12] = {"text": EXAMPLES[0][0], "label": EXAMPLES[0][1]}  # the planted row
    headlines[3] = {"text": EVAL[0][0], "label": EVAL[0][1]}  # an eval example, verbatim
    bench = [{"text": f"{EXAMPLES[i % 2][0]} Report {i}.", "label": EXAMPLES[i % 2][1]}
             for i in range(6)]
    sources = [
        SourceConfig(name="chat_qa", path=_jsonl(root / "qa.jsonl", qa),
                     description="Questions and answers about hobbies and everyday skills"),
        SourceConfig(name="headlines", path=_jsonl(root / "headlines.jsonl", headlines),
                     description="News headlines labelled with their topic", domain="news"),
        SourceConfig(name="news_topic_test", path=_jsonl(root / "bench.jsonl", bench),
                     description="BBC news articles labelled with one of five topics"),
        SourceConfig(name="bbc_copy", path=_jsonl(root / "copy.jsonl", bench),
                     description="BBC news articles labelled with one of five topics"),
    ]
    eval_path = _jsonl(root / "eval.jsonl", [{"text": i, "label": o} for i, o in EVAL])
    task = TaskConfig(
        name="news_topic", instruction="Classify the topic of a BBC news article.",
        examples=[FewShot(input=i, output=o) for i, o in EXAMPLES],
        labels=["business", "entertainment", "politics", "sport", "tech"], answer="label",
        exclude_datasets=["bbc_copy"],
        eval=EvalSetConfig(path=eval_path, input="text", output="label"))
    return sources, task
