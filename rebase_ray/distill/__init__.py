"""BalDistill: multi-stage, fixed-budget, head/tail-balanced distillation of the student."""

from rebase_ray.distill.domains import assign_domains, gini, long_tail_stats
from rebase_ray.distill.ifd import score_ifd
from rebase_ray.distill.planner import stage_budgets, stage_quotas
from rebase_ray.distill.stage import run as distill

__all__ = ["assign_domains", "distill", "gini", "long_tail_stats", "score_ifd",
           "stage_budgets", "stage_quotas"]
