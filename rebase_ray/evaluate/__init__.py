"""Per-domain evaluation of the student and the HTML report."""

from rebase_ray.evaluate.run import evaluate, metric_rows

__all__ = ["evaluate", "metric_rows"]
