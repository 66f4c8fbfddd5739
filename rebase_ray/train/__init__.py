"""Ray Train LoRA fine-tuning of the student."""

from rebase_ray.train.lora import train_student

__all__ = ["train_student"]
