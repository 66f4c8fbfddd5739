"""`rebase-ray run`, `demo`, `submit` and `jobs`: the whole pipeline, here or as a Ray Job."""

from __future__ import annotations

import typer

from rebase_ray.cli.app import app
from rebase_ray.cli.console import console, fmt
from rebase_ray.cli.running import route_logs, run_verb


def _stage_progress(stage: str, status: str, brief: dict | None = None) -> None:
    """One line as a stage starts or is skipped; its brief summary when it is done."""
    if brief is None:
        console.print(f"[bold]{stage}[/bold]: {status}")
        return
    console.print(f"[bold]{stage}[/bold]: {status} — " + "; ".join(
        f"{k} {fmt(v)}" for k, v in brief.items()), soft_wrap=True)  # one line, however long


@app.command()
def run(
    pipeline: str = typer.Argument(..., help="pipeline.yaml"),
    only: list[str] | None = typer.Option(
        None, "--only", help="run only these stages (repeatable): index, retrieve, transform, "
                             "distill, baselines, evaluate"),
    force: bool = typer.Option(False, "--force", help="rerun stages even when up to date"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """The whole pipeline, resumable: index → retrieve → transform → distill → baselines →
    evaluate."""
    from rebase_ray.config import load_pipeline
    from rebase_ray.pipeline import run as run_pipeline

    def go() -> dict:
        cfg = load_pipeline(pipeline)
        route_logs(cfg.storage_root)
        return run_pipeline(cfg, only=only, force=force, on_stage=_stage_progress)

    run_verb(go, title=f"rebase-ray run {pipeline}", as_json=as_json)


def default_demo_folder():
    """examples/demo of the checkout this package is installed from (editable install)."""
    from pathlib import Path

    import rebase_ray

    return Path(rebase_ray.__file__).resolve().parent.parent / "examples" / "demo"


@app.command()
def demo(
    folder: str | None = typer.Option(
        None, "--dir", help="the demo folder (default: examples/demo of this checkout)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """The offline demo: BBC News topic classification learned from chatbot conversations,
    with the bundled models, on local Ray and local files (./artifacts/demo)."""
    from pathlib import Path

    from rebase_ray.config import load_pipeline
    from rebase_ray.demo import prepare
    from rebase_ray.pipeline import run as run_pipeline

    where = Path(folder) if folder else default_demo_folder()
    if not (where / "pipeline.yaml").exists():
        console.print(f"[red]error:[/red] no pipeline.yaml in {where} (use --dir)")
        raise typer.Exit(2)

    def go() -> dict:
        bbc = prepare(where)["bbc"]  # writes the data pipeline.yaml names: before loading it
        cfg = load_pipeline(where / "pipeline.yaml")
        route_logs(cfg.storage_root)
        console.print(f"demo data: {bbc} BBC articles (test/source) and chatterbot-corpus "
                      "conversations")
        return run_pipeline(cfg, on_stage=_stage_progress)

    summary = run_verb(go, title="rebase-ray demo", as_json=as_json)
    if summary.get("report"):
        console.print(f"report: {summary['report']}")


@app.command()
def submit(
    pipeline: str = typer.Argument(..., help="pipeline.yaml (its folder travels with the job)"),
    address: str = typer.Option(..., "--address", help="the Ray dashboard, http://HEAD:8265"),
    stage: str | None = typer.Option(None, help="one stage only (default: the whole run)"),
    wait: bool = typer.Option(False, "--wait", help="wait for the job and print its logs"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Submit the run (or one stage) to a Ray cluster as a Ray Job."""
    from rebase_ray import submit as jobs

    def go() -> dict:
        route_logs(None)
        job_id = jobs.submit(pipeline, address, stage=stage)
        info = jobs.wait(address, job_id) if wait else jobs.status(address, job_id)
        return {**info, **({"logs": jobs.logs(address, job_id)[-4000:]} if wait else {})}

    summary = run_verb(go, title="rebase-ray submit", as_json=as_json)
    if wait and summary["status"] != "SUCCEEDED":
        raise typer.Exit(1)


jobs_app = typer.Typer(no_args_is_help=True, help="Ray Jobs submitted with `submit`.")
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("status")
def jobs_status(job_id: str, address: str = typer.Option(..., "--address"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """A job's status."""
    from rebase_ray import submit as jobs

    def go() -> dict:
        route_logs(None)
        return jobs.status(address, job_id)

    run_verb(go, title=f"job {job_id}", as_json=as_json)


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: str = typer.Option(..., "--address")) -> None:
    """A job's logs."""
    from rebase_ray import submit as jobs

    typer.echo(jobs.logs(address, job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: str = typer.Option(..., "--address")) -> None:
    """Stop a running job."""
    from rebase_ray import submit as jobs

    typer.echo("stopped" if jobs.stop(address, job_id) else "not running")

