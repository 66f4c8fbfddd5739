"""One verb per stage: doctor, index, transform, retrieve, train, eval, distill."""

from __future__ import annotations

import contextlib

import typer

from rebase_ray.cli.app import app
from rebase_ray.cli.running import route_logs, run_verb, stage_config
from rebase_ray.runtime import init_ray


@app.command()
def doctor(
    storage: str | None = typer.Option(None, help="a storage URI to check (local or s3://)"),
    load_models: bool = typer.Option(True, help="load each bundled model (slower)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check the installation: versions, resources, bundled models, storage."""
    from rebase_ray.doctor import run_doctor

    def go() -> dict:
        route_logs(None)
        return run_doctor(storage=storage, load_models=load_models)

    report = run_verb(go, title="rebase-ray doctor", as_json=as_json)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def index(
    sources: str = typer.Argument(..., help="sources.yaml"),
    out: str = typer.Option(..., "--out", help="datastore URI (local path or s3://bucket/prefix)"),
    shards: int | None = typer.Option(None, help="shard count (default: by target size)"),
    index_type: str | None = typer.Option(None, "--index", help="auto | flat | hnsw | ivfpq"),
    embedder: str | None = typer.Option(None, help="embedder ref (default bundled:minilm)"),
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml whose `index` section is the starting point"),
    force: bool = typer.Option(False, "--force", help="rebuild every shard"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Build the datastore: read sources, embed cells on Ray, write sharded FAISS indexes."""
    from rebase_ray.config import IndexConfig, load_pipeline, load_sources
    from rebase_ray.datastore import build_datastore

    def build() -> dict:
        route_logs(out)
        base = load_pipeline(config) if config else None
        cfg = stage_config(base, "index", IndexConfig, "index options",
                           {"shards": shards, "index": index_type, "embedder": embedder})
        return build_datastore(load_sources(sources).sources, out, cfg,
                               s3=base.s3 if base else None, force=force)

    run_verb(build, title=f"rebase-ray index → {out}", as_json=as_json)


@app.command()
def transform(
    task: str = typer.Argument(..., help="task.yaml"),
    hits: str = typer.Option(..., "--hits", help="retrieval output (folder or hits.parquet)"),
    teacher: str = typer.Option("local", "--teacher",
                                help="an OpenAI-compatible base URL, or `local` to start the "
                                     "configured teacher on Ray Serve for this run"),
    out: str = typer.Option(..., "--out", help="output folder URI"),
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml: its `transform` and `teacher` sections"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """ReBase transformation: retrieved rows → task examples through the teacher."""

    from rebase_ray.config import TeacherConfig, TransformConfig, load_pipeline, load_task
    from rebase_ray.serve.http import teacher_client_key
    from rebase_ray.serve.teacher import local_teacher
    from rebase_ray.transform import transform as run_transform

    def go() -> dict:
        route_logs(out)
        pipe = load_pipeline(config) if config else None
        teacher_cfg = pipe.teacher if pipe else TeacherConfig()
        key = teacher_client_key(teacher_cfg, local=teacher == "local")
        sources = pipe.sources if pipe and isinstance(pipe.sources, list) else None
        with (local_teacher(teacher_cfg) if teacher == "local"
              else contextlib.nullcontext(teacher)) as url:
            return run_transform(load_task(task), hits, url, out,
                                 pipe.transform if pipe else TransformConfig(),
                                 s3=pipe.s3 if pipe else None, api_key=key, sources=sources)

    run_verb(go, title=f"rebase-ray transform → {out}", as_json=as_json)


@app.command()
def retrieve(
    tasks: list[str] = typer.Argument(..., help="task.yaml (several: one hits folder per task, "
                                                "<out>/<task name>/, with one start of Ray)"),
    datastore: str = typer.Option(..., "--datastore", help="datastore URI (from `index`)"),
    out: str = typer.Option(..., "--out", help="output folder URI"),
    top: int | None = typer.Option(None, "--top", help="rows to keep (default 3000)"),
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml whose `retrieve` section is the starting point"),
    force: bool = typer.Option(False, "--force", help="rerun even if the output is complete"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """ReBase retrieval: score every datastore row for the task, keep the top N, decontaminate."""
    from rebase_ray.config import RetrieveConfig, load_pipeline, load_task
    from rebase_ray.retrieve.stage import run, run_many

    def go() -> dict:
        route_logs(out)
        base = load_pipeline(config) if config else None
        cfg = stage_config(base, "retrieve", RetrieveConfig, "retrieve options", {"top_n": top})
        s3 = base.s3 if base else None
        if len(tasks) == 1:
            return run(load_task(tasks[0]), datastore, out, cfg, s3=s3, force=force)
        return run_many([load_task(t) for t in tasks], datastore, out, cfg, s3=s3, force=force)

    run_verb(go, title=f"rebase-ray retrieve → {out}", as_json=as_json)


@app.command()
def train(
    examples: str = typer.Argument(..., help="examples.parquet URI (input, output, rationale)"),
    task: str = typer.Option(..., "--task", help="task.yaml"),
    out: str = typer.Option(..., "--out", help="run folder URI: adapter/, checkpoints/, summary"),
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml whose `train` section is the starting point"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="step budget"),
    model: str | None = typer.Option(None, help="student model ref"),
    workers: int | None = typer.Option(None, help="Ray Train workers"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Fine-tune the student with LoRA on Ray Train (budgets, checkpoints, fault tolerance)."""

    from rebase_ray.config import TrainConfig, load_pipeline, load_task
    from rebase_ray.train import train_student

    def go() -> dict:
        route_logs(out)
        pipe = load_pipeline(config) if config else None
        cfg = stage_config(pipe, "train", TrainConfig, "train options",
                           {"max_steps": max_steps, "model": model,
                            "resources": {"actors": workers}})
        init_ray(pipe.ray if pipe else None)
        summary = train_student(examples, load_task(task), cfg, out, s3=pipe.s3 if pipe else None)
        return summary if as_json else {k: v for k, v in summary.items() if k != "loss_curve"}

    run_verb(go, title=f"rebase-ray train → {out}", as_json=as_json)


@app.command("eval")
def eval_(
    task: str = typer.Argument(..., help="task.yaml with an `eval` set"),
    adapter: str | None = typer.Option(None, help="LoRA adapter URI (from `train`)"),
    model: str | None = typer.Option(None, help="base model ref (default: the student)"),
    out: str | None = typer.Option(None, "--out",
                                      help="folder URI for report.json and report.html"),
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml: its `evaluate` and `train` sections"),
    max_examples: int | None = typer.Option(None, "--max-examples"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Evaluate the student (and the base model as baseline) per domain; write the report."""

    from rebase_ray.config import EvaluateConfig, TrainConfig, load_pipeline, load_task
    from rebase_ray.evaluate.stage import run as evaluate_stage

    def go() -> dict:
        route_logs(out)
        pipe = load_pipeline(config) if config else None
        cfg = stage_config(pipe, "evaluate", EvaluateConfig, "eval options",
                           {"max_examples": max_examples})
        task_cfg = load_task(task)
        init_ray(pipe.ray if pipe else None)
        ref = model or (pipe.train.model if pipe else TrainConfig().model)
        return evaluate_stage(task_cfg, ref, adapter, cfg, out=out,
                              s3=pipe.s3 if pipe else None)

    run_verb(go, title=f"rebase-ray eval {task}", as_json=as_json)


@app.command()
def distill(
    pipeline: str = typer.Argument(..., help="pipeline.yaml (task, teacher, distill, train, "
                                             "evaluate sections)"),
    examples: str | None = typer.Option(
        None, "--examples", help="example pool URI (default: <storage_root>/transform)"),
    out: str | None = typer.Option(None, "--out",
                                      help="output URI (default: <storage_root>/distill)"),
    teacher: str | None = typer.Option(
        None, "--teacher", help="an OpenAI-compatible base URL, or `local` to start the "
                                "configured teacher on Ray Serve (default: teacher.url or local)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """BalDistill: K budgeted stages of head/tail-balanced selection, synthesis, LoRA training
    and per-domain evaluation (resumes at the first unfinished stage)."""

    from rebase_ray.config import load_pipeline
    from rebase_ray.distill import distill as run_distill
    from rebase_ray.serve.http import teacher_client_key
    from rebase_ray.serve.teacher import local_teacher
    from rebase_ray.storage import Storage

    def go() -> dict:
        pipe = load_pipeline(pipeline)
        task = pipe.require_task(pipeline)
        pool = examples or Storage.join(pipe.storage_root, "transform")
        dest = out or Storage.join(pipe.storage_root, "distill")
        route_logs(dest)
        url = teacher or pipe.teacher.url or "local"
        key = teacher_client_key(pipe.teacher, local=url == "local")
        init_ray(pipe.ray)
        with (local_teacher(pipe.teacher) if url == "local"
              else contextlib.nullcontext(url)) as base_url:
            return run_distill(task, pool, dest, pipe.distill, pipe.train, pipe.evaluate,
                               teacher_url=base_url, api_key=key, s3=pipe.s3)

    run_verb(go, title=f"rebase-ray distill → {out or 'storage_root/distill'}", as_json=as_json)
