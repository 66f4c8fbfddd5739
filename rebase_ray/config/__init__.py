"""Typed configuration for every stage and the three user-facing files: `schema` (storage,
sources.yaml, task.yaml), `stages` (each stage's section and pipeline.yaml), both pure pydantic,
and `load` (files → validated models, with errors that name the file and the key)."""

from rebase_ray.config.load import (
    format_errors,
    load_pipeline,
    load_sources,
    load_task,
    load_yaml,
    validate,
)
from rebase_ray.config.resources import Resources
from rebase_ray.config.schema import (
    AUTO_DTYPE,
    ConfigError,
    Dtype,
    EvalSetConfig,
    FewShot,
    S3Config,
    SourceConfig,
    SourcesFile,
    Strict,
    TaskConfig,
    config_hash,
)
from rebase_ray.config.stages import (
    DistillConfig,
    EvaluateConfig,
    IndexConfig,
    LabelCheck,
    LoraConfig,
    PipelineConfig,
    RayConfig,
    ReplyFormat,
    RetrieveConfig,
    ServeConfig,
    TeacherConfig,
    TrainConfig,
    TransformConfig,
)

__all__ = ["AUTO_DTYPE", "ConfigError", "DistillConfig", "Dtype", "EvalSetConfig",
           "EvaluateConfig", "FewShot", "IndexConfig", "LabelCheck", "LoraConfig",
           "PipelineConfig", "RayConfig", "ReplyFormat", "Resources", "RetrieveConfig", "S3Config",
           "ServeConfig", "SourceConfig", "SourcesFile", "Strict", "TaskConfig",
           "TeacherConfig", "TrainConfig", "TransformConfig", "config_hash", "format_errors",
           "load_pipeline", "load_sources", "load_task", "load_yaml", "validate"]
