"""`python -m rebase_ray.cli`: the `rebase-ray` command."""

from rebase_ray.cli import app

app()
