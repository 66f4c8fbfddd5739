"""`rebase-ray serve teacher|retriever|student`: the Ray Serve applications."""

from __future__ import annotations

import typer

from rebase_ray.cli.app import app
from rebase_ray.cli.console import console
from rebase_ray.cli.running import route_logs, run_verb, stage_config, user_errors
from rebase_ray.config import RayConfig
from rebase_ray.runtime import init_ray

serve_app = typer.Typer(no_args_is_help=True,
                        help="Run an endpoint on Ray Serve (until Ctrl+C).")
app.add_typer(serve_app, name="serve")


@serve_app.command("teacher")
def serve_teacher(
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml whose `teacher` section is the starting point"),
    model: str | None = typer.Option(None, help="model ref (bundled:..., hub id or path)"),
    backend: str | None = typer.Option(None, help="transformers | vllm"),
    adapter: str | None = typer.Option(None, help="a LoRA adapter folder or s3:// URI"),
    host: str | None = typer.Option(None, help="default 127.0.0.1"),
    port: int | None = typer.Option(None, help="default 8000; 0 = a free port"),
    route_prefix: str | None = typer.Option(None, help="default /"),
    max_batch_size: int | None = typer.Option(None, help="dynamic batching: rows per batch"),
    min_replicas: int | None = typer.Option(None),
    max_replicas: int | None = typer.Option(None),
    num_cpus: float | None = typer.Option(None, help="CPUs per replica"),
    num_gpus: float | None = typer.Option(None, help="GPUs per replica"),
    address: str | None = typer.Option(None, help="Ray address (default: local Ray)"),
    print_config: bool = typer.Option(
        False, "--print-config",
        help="print the Serve config YAML (serve deploy / KubeRay RayService) and exit"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """The teacher LLM behind OpenAI's chat API (API key: $REBASE_RAY_API_KEY)."""
    import yaml

    from rebase_ray.config import TeacherConfig, load_pipeline

    top = {"model": model, "backend": backend, "adapter": adapter,
           "max_batch_size": max_batch_size}
    served = {"host": host, "port": port, "route_prefix": route_prefix,
              "min_replicas": min_replicas, "max_replicas": max_replicas,
              "cpus": num_cpus, "gpus": num_gpus}
    with user_errors():
        cfg = stage_config(load_pipeline(config) if config else None, "teacher", TeacherConfig,
                           "serve teacher options", top, serve=served)
    from rebase_ray.serve.teacher import serve_config
    from rebase_ray.serve.teacher import serve_teacher as run_teacher
    from rebase_ray.serve.vllm_app import VLLMUnavailable

    if print_config:
        with user_errors():
            typer.echo(yaml.safe_dump(serve_config(cfg), sort_keys=False), nl=False)
        return

    def go() -> dict:
        route_logs(None)
        init_ray(RayConfig(address=address))
        return run_teacher(cfg, lambda url: console.print(f"teacher at {url} (Ctrl+C stops)"))

    try:
        run_verb(go, title="rebase-ray serve teacher", as_json=as_json)
    except VLLMUnavailable as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None



@serve_app.command("retriever")
def serve_retriever(
    datastore: str = typer.Option(..., "--datastore", help="datastore URI (from `index`)"),
    config: str | None = typer.Option(
        None, "--config", help="a pipeline.yaml whose `retrieve` section is the starting point"),
    host: str | None = typer.Option(None, help="default 127.0.0.1"),
    port: int | None = typer.Option(None, help="default 8000; 0 = a free port"),
    route_prefix: str | None = typer.Option(None, help="default /retriever"),
    min_replicas: int | None = typer.Option(None),
    max_replicas: int | None = typer.Option(None),
    num_cpus: float | None = typer.Option(None, help="CPUs per replica"),
    address: str | None = typer.Option(None, help="Ray address (default: local Ray)"),
    print_config: bool = typer.Option(
        False, "--print-config",
        help="print the Serve config YAML (serve deploy / KubeRay RayService) and exit"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """The retriever: POST /retrieve {instruction, examples, top_n} (key: $REBASE_RAY_API_KEY)."""
    import yaml

    from rebase_ray.config import RetrieveConfig, load_pipeline

    served = {"host": host, "port": port, "route_prefix": route_prefix,
              "min_replicas": min_replicas, "max_replicas": max_replicas, "cpus": num_cpus}
    with user_errors():
        pipe = load_pipeline(config) if config else None
        cfg = stage_config(pipe, "retrieve", RetrieveConfig, "serve retriever options", {},
                           serve=served)
    from rebase_ray.serve.retriever import serve_config
    from rebase_ray.serve.retriever import serve_retriever as run_retriever

    if print_config:
        typer.echo(yaml.safe_dump(serve_config(datastore, cfg), sort_keys=False), nl=False)
        return

    def go() -> dict:
        route_logs(None)
        init_ray(RayConfig(address=address))
        return run_retriever(
            datastore, cfg, lambda url: console.print(f"retriever at {url}/retrieve (Ctrl+C stops)"),
            s3=pipe.s3 if pipe else None)

    run_verb(go, title="rebase-ray serve retriever", as_json=as_json)


@serve_app.command("student")
def serve_student(
    adapter: str = typer.Option(..., "--adapter", help="the LoRA adapter (folder or s3:// URI)"),
    model: str | None = typer.Option(
        None, help="the base model (default: the pipeline's train.model)"),
    config: str | None = typer.Option(None, "--config", help="a pipeline.yaml"),
    host: str | None = typer.Option(None, help="default 127.0.0.1"),
    port: int | None = typer.Option(None, help="default 8000; 0 = a free port"),
    address: str | None = typer.Option(None, help="Ray address (default: local Ray)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """The trained student (base model + LoRA adapter) behind the teacher's OpenAI API."""
    from rebase_ray.config import TrainConfig, load_pipeline

    with user_errors():
        base_model = model or (load_pipeline(config).train if config else TrainConfig()).model
    serve_teacher(config=config, model=base_model, backend="transformers", adapter=adapter,
                  host=host, port=port, route_prefix=None, max_batch_size=None,
                  min_replicas=None, max_replicas=None, num_cpus=None, num_gpus=None,
                  address=address, print_config=False, as_json=as_json)
