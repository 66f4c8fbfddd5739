"""Shared body of the job entrypoints: load the pipeline, run the stage(s), print the summary
as JSON (the job's logs are its record) and exit non-zero on failure."""

from __future__ import annotations

import json
import sys


def main(stage: str | None) -> None:
    from rebase_ray.config import load_pipeline
    from rebase_ray.pipeline import run

    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m jobs.{stage or 'run'} PIPELINE.yaml")
    cfg = load_pipeline(sys.argv[1])
    summary = run(cfg, only=[stage] if stage else None)
    print(json.dumps(summary, indent=2, default=str))
