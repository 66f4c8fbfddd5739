"""Source readers: every format, a malformed file of each kind (exact reject counts), globs,
`columns`, `max_rows` stride sampling and stable cell ids."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rebase_ray.config import IndexConfig, SourceConfig
from rebase_ray.sources import cell_id, parse_file, read_sources, row_key, stride_sample

# name → (rows, cells, rejects) for the corpus written by `write_corpus`, with
# reject_value_chars=500 (one jsonl value is 600 chars).
EXPECTED = {
    "csv": (3, 6, 2),        # bad.csv: a 3-field row, a row with invalid UTF-8
    "jsonl": (4, 7, 5),      # bad.jsonl: broken line, non-object, invalid UTF-8; empty.jsonl;
                             # good.jsonl: one over-long value
    "json": (2, 3, 2),       # a non-record element; a truncated file
    "parquet": (3, 5, 1),    # a corrupt file
    "bigbench": (2, 4, 1),   # a task.json without examples
    "picked": (2, 2, 1),     # columns: [text, nope] → missing column
}
CFG = IndexConfig(reject_value_chars=500, shards=2, batch_size=8, encode_batch_size=8)


def write_corpus(root: Path) -> list[SourceConfig]:
    """One source per format, each a glob over a good and a malformed file."""
    (root / "csv").mkdir(parents=True)
    (root / "csv" / "good.csv").write_text("text,label\nalpha beta,x\ngamma delta,y\n")
    (root / "csv" / "bad.csv").write_bytes(
        b"text,label\none,two,three\ncaf\xe9 latte,z\nfine row,w\n")
    (root / "jsonl").mkdir()
    (root / "jsonl" / "good.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"q": "what is one plus one", "a": "two", "meta": {"k": [1, 2]}},
        {"q": "capital of France", "a": "Paris"},
        {"q": "x" * 600, "a": "long"},
    ]) + "\n")
    (root / "jsonl" / "bad.jsonl").write_bytes(
        b'{broken\n[1, 2]\n{"q": "\xff\xfe"}\n\n{"q": "ok"}\n')
    (root / "jsonl" / "empty.jsonl").write_bytes(b"")
    (root / "json").mkdir()
    (root / "json" / "records.json").write_text(json.dumps(
        [{"title": "t1", "body": "b1"}, {"title": "t2", "body": ""}, "not a record"]))
    (root / "json" / "truncated.json").write_text('[{"title": "x"')
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"], "n": [1, 2, None]}),
                   root / "parquet" / "good.parquet")
    (root / "parquet" / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    for name, task in [("t1", {"description": "Answer arithmetic questions", "examples": [
            {"input": "1+1", "target": "2"},
            {"input": "2+2", "target_scores": {"4": 1, "5": 0}}]}),
            ("t2", {"description": "a task without examples"})]:
        (root / "bigbench" / name).mkdir(parents=True)
        (root / "bigbench" / name / "task.json").write_text(json.dumps(task))
    return [
        SourceConfig(name="csv", path=str(root / "csv" / "*.csv"), description="csv rows"),
        SourceConfig(name="jsonl", path=str(root / "jsonl"), description="questions"),
        SourceConfig(name="json", path=str(root / "json" / "*.json"), license="CC0"),
        SourceConfig(name="parquet", path=str(root / "parquet" / "*.parquet"), domain="p"),
        SourceConfig(name="bigbench", path=str(root / "bigbench" / "*" / "task.json"),
                     format="bigbench"),
        SourceConfig(name="picked", path=str(root / "csv" / "good.csv"),
                     columns=["text", "nope"]),
    ]


def _parse(tmp_path: Path, name: str, data: bytes, **kw):
    path = tmp_path / name
    path.write_bytes(data)
    return parse_file(SourceConfig(name="s", path=str(path), **kw), str(path), data)


def test_parse_csv_rows_and_rejects(tmp_path):
    p = _parse(tmp_path, "a.csv", b'text,label\n"multi\nline",x\na,b,c\n\xff,y\nok,z\n')
    assert [r for _, r in p.rows] == [{"text": "multi\nline", "label": "x"},
                                      {"text": "ok", "label": "z"}]
    assert [reason for _, reason in p.rejects] == ["3 fields, header has 2",
                                                   "undecodable bytes (not UTF-8)"]
    assert p.rejects[0][0].endswith("a.csv#4")


def test_parse_jsonl_flattens_nested_values(tmp_path):
    p = _parse(tmp_path, "a.jsonl", b'{"a": {"b": [1, "x"]}, "n": 3, "f": null}\nnope\n')
    assert p.rows[0][1] == {"a": '{"b": [1, "x"]}', "n": "3", "f": ""}
    assert p.rejects == [(str(tmp_path / "a.jsonl") + "#2",
                          "unparseable JSON line: Expecting value")]


def test_parse_bigbench_auto_detected_with_description(tmp_path):
    task = {"description": "d", "examples": [{"input": "i", "target": ["t1", "t2"]}]}
    p = _parse(tmp_path, "task.json", json.dumps(task).encode())
    assert p.description == "d"
    assert p.rows[0][1] == {"input": "i", "target": '["t1", "t2"]'}


@pytest.mark.parametrize("name,data,reason", [
    ("e.csv", b"  \n", "empty file"),
    ("x.json", b'{"a": 1}', "expected a list of records, got dict"),
    ("x.json", b"[1", "unparseable JSON: Expecting ',' delimiter at line 1"),
    ("x.parquet", b"not parquet", "unreadable parquet"),
    ("x.txt", b"hello", "unknown file format"),
])
def test_parse_whole_file_rejects(tmp_path, name, data, reason):
    p = _parse(tmp_path, name, data)
    assert p.rows == [] and len(p.rejects) == 1
    assert p.rejects[0][1].startswith(reason)


def test_stride_sample_and_ids():
    assert stride_sample(10, 3) == {0, 3, 6}
    assert stride_sample(3, 5) is None
    assert row_key("d", "c", "s", 7) == "d/c/s/7"
    assert cell_id("d", "c", "s", 7, "q") == cell_id("d", "c", "s", 7, "q")
    assert cell_id("d", "c", "s", 7, "q") != cell_id("d", "c", "s", 7, "a")


def test_read_sources_exact_counts(tmp_path, ray_cluster):
    sources = write_corpus(tmp_path)
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"v": f"item {i}"}) + "\n" for i in range(10)))
    sources.append(SourceConfig(name="sampled", path=str(many), max_rows=3))
    read = read_sources(sources, CFG)
    got = {n: (s["rows"], s["cells"], s["rejects"]) for n, s in read.stats.items()}
    assert got == {**EXPECTED, "sampled": (3, 3, 0)}
    assert read.rejects.num_rows == sum(r for _, _, r in got.values())
    assert read.descriptions["bigbench"] == "Answer arithmetic questions"
    cells = read.cells.to_pandas()
    assert cells["cell_id"].is_unique
    sampled = cells[cells["dataset"] == "sampled"]
    assert sorted(zip(sampled["row_idx"], sampled["value"])) == [
        (0, "item 0"), (3, "item 3"), (6, "item 6")]
    # rows are numbered across a source's files in sorted order (bad.csv before good.csv)
    csv_rows = cells[cells["dataset"] == "csv"].sort_values(["row_idx", "column"])
    assert list(csv_rows["value"]) == ["w", "fine row", "x", "alpha beta", "y", "gamma delta"]
    reasons = dict(zip(read.rejects["location"].to_pylist(), read.rejects["reason"].to_pylist()))
    assert reasons[str(tmp_path / "csv" / "good.csv")] == "missing column 'nope'"
    assert reasons[str(tmp_path / "jsonl" / "good.jsonl") + "#3:q"].startswith(
        "value of 600 chars is over the 500-char limit")
