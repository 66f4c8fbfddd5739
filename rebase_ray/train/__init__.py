"""Ray Train LoRA fine-tuning of the student."""

from rebase_ray.train.stage import run as train_student

__all__ = ["train_student"]
