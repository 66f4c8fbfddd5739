"""ReBase transformation: retrieved rows → task examples through the teacher."""

from rebase_ray.transform.stage import run as transform

__all__ = ["transform"]
