"""Baselines for the distilled student: the same student, training and evaluation, other data."""

from rebase_ray.baselines.stage import run

__all__ = ["run"]
