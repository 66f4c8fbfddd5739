import textwrap

import pytest

from rebase_ray.config import (
    ConfigError,
    IndexConfig,
    PipelineConfig,
    Resources,
    RetrieveConfig,
    SourcesFile,
    TaskConfig,
    TrainConfig,
    load_pipeline,
    load_sources,
    load_task,
    validate,
)
from rebase_ray.pipeline import run as run_pipeline


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
    # nor without a task (`rebase-ray index --config` reads only `index`); the stages that
    # need one refuse it, before Ray starts
    no_task = load_pipeline(write(tmp_path, "index.yaml", "index: {shards: 3}\n"))
    assert no_task.index.shards == 3 and no_task.task is None
    with pytest.raises(ConfigError, match="give `task`"):
        no_task.require_task()
    with pytest.raises(ConfigError, match="give `task`"):
        run_pipeline(no_task.model_copy(update={"datastore": "ds"}), only=["retrieve"])
    with pytest.raises(ConfigError, match=r"min_input_chars \(700\) is above"):
        validate({"transform": {"reply": {"min_input_chars": 700}}}, PipelineConfig,
                 "pipeline.yaml")
    with pytest.raises(ConfigError, match="empty"):
        load_task(write(tmp_path, "empty.yaml", ""))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_task(write(tmp_path, "bad.yaml", "name: [unclosed"))


OLD_RESOURCE_KEYS = """
task: task.yaml
index: {num_actors: 2, num_cpus_per_actor: 0.5, num_gpus_per_actor: 0, torch_threads: 3,
        build_cpus: 2}
retrieve: {shard_cpus: 0.1, serve: {num_cpus: 0.25}}
teacher: {torch_threads: 2, serve: {num_cpus: 0.5, num_gpus: 1}}
distill: {ifd_actors: 1, ifd_num_cpus: 0.5, ifd_num_gpus: 0, ifd_torch_threads: 2}
train: {num_workers: 2, use_gpu: true, cpus_per_worker: 0.5, torch_threads: 4}
evaluate: {num_actors: 1, num_cpus_per_actor: 2, num_gpus_per_actor: 0, torch_threads: 2}
"""


def test_old_resource_keys_load_onto_resources_with_a_warning(tmp_path, caplog):
    write(tmp_path, "task.yaml", TASK)
    with caplog.at_level("WARNING", logger="rebase_ray.config.resources"):
        cfg = load_pipeline(write(tmp_path, "pipeline.yaml", OLD_RESOURCE_KEYS))
    assert cfg.index.resources == Resources(actors=2, cpus=0.5, gpus=0, threads=3)
    assert cfg.index.build == Resources(cpus=2)
    assert cfg.retrieve.resources == Resources(cpus=0.1)
    assert (cfg.retrieve.serve.cpus, cfg.teacher.serve.cpus) == (0.25, 0.5)
    assert (cfg.teacher.serve.gpus, cfg.teacher.serve.threads) == (1, 2)
    assert cfg.distill.ifd_resources == Resources(actors=1, cpus=0.5, threads=2)
    assert cfg.train.resources == Resources(actors=2, cpus=0.5, gpus=1, threads=4)
    assert cfg.evaluate.resources == Resources(actors=1, cpus=2, threads=2)
    warned = caplog.text
    for old, new in [("index.num_cpus_per_actor", "index.resources.cpus"),
                     ("index.build_cpus", "index.build.cpus"),
                     ("retrieve.shard_cpus", "retrieve.resources.cpus"),
                     ("serve.num_cpus", "serve.cpus"),
                     ("teacher.torch_threads", "teacher.serve.threads"),
                     ("distill.ifd_num_cpus", "distill.ifd_resources.cpus"),
                     ("train.use_gpu", "train.resources.gpus"),
                     ("evaluate.num_actors", "evaluate.resources.actors")]:
        assert f"{old} is deprecated and will be removed: use {new}" in warned


def test_an_old_key_beside_its_new_one_is_an_error(tmp_path):
    write(tmp_path, "task.yaml", TASK)
    p = write(tmp_path, "pipeline.yaml", "task: task.yaml\n"
              "evaluate: {num_cpus_per_actor: 1, resources: {cpus: 2}}\n")
    with pytest.raises(ConfigError) as err:
        load_pipeline(p)
    assert "evaluate.num_cpus_per_actor" in str(err.value)
    assert "evaluate.resources.cpus" in str(err.value)


def test_unset_resource_keys_keep_the_section_defaults():
    """A partial `resources` keeps the section's own defaults (train: one worker of 1 CPU, so
    the global batch never follows the machine; retrieve: 0.25 CPU a shard actor)."""
    assert TrainConfig(resources={"threads": 2}).resources == Resources(actors=1, cpus=1,
                                                                         threads=2)
    assert IndexConfig(build={"threads": 2}).build == Resources(cpus=1, threads=2)
    assert RetrieveConfig().resources.cpus == 0.25
    with pytest.raises(ValueError, match="only `cpus` applies"):
        RetrieveConfig(resources={"threads": 2})


def test_resources_are_how_fields(tmp_path):
    """Resources change how a stage runs, never what it produces: every config hash (the
    datastore's build and embedding keys, distill's plan, the pipeline's stage keys) stays."""
    from rebase_ray.pipeline import Run

    write(tmp_path, "task.yaml", TASK)
    base = load_pipeline(write(tmp_path, "pipeline.yaml", "task: task.yaml\nsources: []\n"
                               f"storage_root: {tmp_path / 'art'}\n"))
    other = Resources(actors=3, cpus=0.5, gpus=1, threads=7)
    changed = base.model_copy(update={
        "index": base.index.model_copy(update={"resources": other, "build": other}),
        "retrieve": base.retrieve.model_copy(update={"resources": Resources(cpus=2)}),
        "distill": base.distill.model_copy(update={"ifd_resources": other}),
        "train": base.train.model_copy(update={"resources": other}),
        "evaluate": base.evaluate.model_copy(update={"resources": other})})
    assert changed.index.build_hash() == base.index.build_hash()
    assert changed.index.embed_hash() == base.index.embed_hash()
    assert changed.distill.plan_hash() == base.distill.plan_hash()
    assert Run(changed).keys() == Run(base).keys()
    # and a field that changes what is made does change them
    assert base.index.model_copy(update={"embedder": "x"}).build_hash() != base.index.build_hash()
