"""The teacher's `vllm` backend: Ray Serve LLM's OpenAI app (`ray.serve.llm.build_openai_app`) running the
vLLM engine, with vLLM's own continuous batching. Our code only translates `TeacherConfig` into
an `LLMConfig`; everything else is Ray Serve LLM's. Structured outputs are vLLM's own: requests
reach its OpenAI server unchanged, so `response_format` (json_object, json_schema) and
`structured_outputs` (choice, json, regex, grammar) are enforced by vLLM's grammar backend.

vLLM and `ray[llm]` are imported lazily (they are CUDA-only and live in the `gpu` extra). This
path cannot run in the development workplace (no vLLM-capable GPU there): it is tested up to the
config translation and the error raised when vLLM is missing.
"""

from __future__ import annotations

from typing import Any

from rebase_ray.config import ConfigError, TeacherConfig

IMPORT_PATH = "ray.serve.llm:build_openai_app"


class VLLMUnavailable(ImportError):
    """The vllm backend was asked for where vLLM / Ray Serve LLM is not installed."""


def served_name(cfg: TeacherConfig) -> str:
    return cfg.served_model_name or cfg.model


def llm_config(cfg: TeacherConfig) -> dict[str, Any]:
    """`TeacherConfig` → the keyword arguments of `ray.serve.llm.LLMConfig`."""
    if cfg.adapter:
        raise ConfigError("teacher.adapter: LoRA adapters are served by the transformers "
                          "backend; for vLLM merge the adapter into the model first")
    if cfg.model.startswith("bundled:"):
        raise ConfigError(f"teacher.model: the vllm backend loads a hub id or a path, not "
                          f"{cfg.model!r} (bundled models are for the transformers backend)")
    s = cfg.serve
    engine: dict[str, Any] = {"tensor_parallel_size": max(1, int(s.gpus))}
    if cfg.dtype != "auto":
        engine["dtype"] = cfg.dtype
    if cfg.max_model_len:
        engine["max_model_len"] = cfg.max_model_len
    return {
        "model_loading_config": {"model_id": served_name(cfg), "model_source": cfg.model},
        "engine_kwargs": engine,
        "deployment_config": {
            "autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                   "target_ongoing_requests": s.target_ongoing_requests},
        },
    }


def openai_app_args(cfg: TeacherConfig) -> dict[str, Any]:
    """The `args` of `build_openai_app` (also what a Serve config file carries)."""
    return {"llm_configs": [llm_config(cfg)]}


def build_vllm_app(cfg: TeacherConfig):
    """Ray Serve LLM's OpenAI app (/v1/chat/completions, /v1/models) for `cfg`."""
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as exc:
        raise VLLMUnavailable(
            "the vllm teacher backend needs vLLM and Ray Serve LLM on a CUDA machine: "
            "pip install 'rebase-ray[gpu]' (or use the rayproject/ray-llm image); "
            f"import failed with: {exc}") from exc
    args = openai_app_args(cfg)
    return build_openai_app({"llm_configs": [LLMConfig(**c) for c in args["llm_configs"]]})
