import textwrap

import pytest

from rebase_ray.config import (
    ConfigError,
    PipelineConfig,
    SourcesFile,
    TaskConfig,
    load_pipeline,
    load_sources,
    load_task,
    validate,
)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


SOURCES = """
sources:
  - name: bbc_news
    path: data/*.csv
    description: "BBC news articles labelled with one of five topics"
    columns: [text, category]
    max_rows: 1000
    domain: news
    license: "CC BY 4.0"
"""

TASK = """
name: news_topic
instruction: "Classify the topic of a BBC news article."
examples:
  - input: "Chelsea win the league after a 2-0 victory"
    output: "sport"
labels: [business, entertainment, politics, sport, tech]
answer: label
cot: none
exclude_datasets: [bbc_news]
eval:
  path: eval.csv
  input: text
  output: category
"""


def test_design_examples_parse(tmp_path):
    sources = load_sources(write(tmp_path, "sources.yaml", SOURCES))
    assert sources.sources[0].max_rows == 1000
    assert sources.sources[0].path == str(tmp_path / "data/*.csv")
    task = load_task(write(tmp_path, "task.yaml", TASK))
    assert task.metric == "accuracy"  # derived from answer: label
    assert task.eval.path == str(tmp_path / "eval.csv")


def test_pipeline_resolves_files(tmp_path):
    write(tmp_path, "sources.yaml", SOURCES)
    write(tmp_path, "task.yaml", TASK)
    p = write(tmp_path, "pipeline.yaml", """
        storage_root: ./artifacts
        sources: sources.yaml
        task: task.yaml
        train: {max_steps: 5, lora: {r: 4}}
    """)
    cfg = load_pipeline(p)
    assert isinstance(cfg.task, TaskConfig)
    assert cfg.sources[0].name == "bbc_news"
    assert cfg.train.max_steps == 5 and cfg.train.lora.r == 4
    assert cfg.storage_root == "./artifacts"


def test_inline_task_eval_path_is_relative_to_the_pipeline(tmp_path):
    p = write(tmp_path, "pipeline.yaml", """
        datastore: s3://bucket/ds
        task:
          name: t
          instruction: i
          examples: [{input: a, output: b}]
          eval: {path: data/eval.jsonl, input: q, output: a}
    """)
    assert load_pipeline(p).task.eval.path == str(tmp_path / "data" / "eval.jsonl")


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "task.yaml", TASK.replace("cot: none", "cott: none"))
    with pytest.raises(ConfigError) as err:
        load_task(p)
    msg = str(err.value)
    assert str(p) in msg and "cott" in msg and "unknown key" in msg
    assert "allowed keys" in msg and "cot" in msg


def test_nested_unknown_key_lists_allowed(tmp_path):
    with pytest.raises(ConfigError) as err:
        validate({"task": "t.yaml", "datastore": "x", "train": {"lora": {"rank": 8}}},
                 PipelineConfig, "pipeline.yaml")
    msg = str(err.value)
    assert "train.lora.rank: unknown key" in msg
    assert "allowed keys: r, alpha, dropout, target_modules" in msg


def test_wrong_type_and_missing_field(tmp_path):
    with pytest.raises(ConfigError) as err:
        validate({"sources": [{"name": "a", "path": "x", "max_rows": "many"}]}, SourcesFile,
                 "sources.yaml")
    assert "sources.0.max_rows" in str(err.value) and "'many'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate({"name": "t", "examples": [{"input": "a", "output": "b"}]}, TaskConfig, "task.yaml")
    assert "instruction: required key is missing" in str(err.value)


def test_semantic_errors(tmp_path):
    with pytest.raises(ConfigError, match="used twice"):
        validate({"sources": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]},
                 SourcesFile, "s.yaml")
    with pytest.raises(ConfigError, match="needs a `labels` list"):
        validate({"name": "t", "instruction": "i", "examples": [{"input": "a", "output": "b"}],
                  "answer": "label"}, TaskConfig, "task.yaml")
    # a pipeline without sources or datastore is valid (train / distill --examples need
    # neither); the stages that read a datastore refuse it
    no_data = validate({"task": "t.yaml"}, PipelineConfig, "pipeline.yaml")
    with pytest.raises(ConfigError, match="give `sources`"):
        no_data.require_data()
    with pytest.raises(ConfigError, match=r"min_input_chars \(700\) is above"):
        validate({"transform": {"reply": {"min_input_chars": 700}}}, PipelineConfig,
                 "pipeline.yaml")
    with pytest.raises(ConfigError, match="empty"):
        load_task(write(tmp_path, "empty.yaml", ""))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_task(write(tmp_path, "bad.yaml", "name: [unclosed"))
