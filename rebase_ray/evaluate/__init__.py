"""Per-domain evaluation of the student and the HTML report."""

from rebase_ray.evaluate.measure import comparison_rows, evaluate, metric_rows

__all__ = ["comparison_rows", "evaluate", "metric_rows"]
