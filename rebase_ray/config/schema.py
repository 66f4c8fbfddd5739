"""The schema of the user's files: storage, `sources.yaml` and `task.yaml` (pure pydantic, no
I/O: storage and every stage import it). Every model forbids unknown keys, so a misspelled key
is an error rather than a silent default."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A user-facing configuration file is invalid; the message names file, key and expectation."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    def what(self, exclude: set[str] | None = None) -> dict[str, Any]:
        """The fields that change what a stage produces, for config hashes: the config without
        the fields declared with `how` (resources, batching, concurrency) nor `exclude`."""
        skip = {name for name, f in type(self).model_fields.items()
                if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("how")}
        return self.model_dump(exclude=skip | (exclude or set()))


def how(default: Any = None, **kwargs: Any) -> Any:
    """A field that changes how a stage runs (its resources, batching, concurrency), never what
    it produces: `Strict.what` leaves it out, so changing it reuses finished work."""
    return Field(default, json_schema_extra={"how": True}, **kwargs)


# ----------------------------------------------------------------------------- storage


class S3Config(Strict):
    """S3 connection settings; unset fields fall back to the standard AWS environment variables
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)."""

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    region: str | None = None
    anon: bool = False


# ----------------------------------------------------------------------------- sources.yaml


class SourceConfig(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    path: str = Field(min_length=1, description="local path, glob or s3:// URI")
    description: str = ""
    columns: list[str] | None = None
    max_rows: int | None = Field(default=None, gt=0)
    domain: str | None = None
    license: str | None = None
    format: Literal["auto", "csv", "jsonl", "json", "parquet", "bigbench"] = "auto"
    config: str = "default"
    split: str = "train"


class SourcesFile(Strict):
    sources: list[SourceConfig] = Field(min_length=1)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        seen: set[str] = set()
        for s in sources:
            if s.name in seen:
                raise ValueError(f"source name '{s.name}' is used twice; names must be unique")
            seen.add(s.name)
        return sources


# ----------------------------------------------------------------------------- task.yaml


class FewShot(Strict):
    input: str = Field(min_length=1)
    output: str = Field(min_length=1)


class EvalSetConfig(Strict):
    path: str
    input: str = Field(description="a column name, or a template such as '{question}\\n{choices}'")
    output: str
    domain: str | None = None
    format: Literal["auto", "csv", "jsonl", "json", "parquet"] = "auto"
    max_rows: int | None = Field(default=None, gt=0)


Answer = Literal["label", "span", "free", "code"]
# inference precision (teacher, IFD, evaluation); models.torch_dtype resolves "auto"
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
AUTO_DTYPE = ("auto: bfloat16 where the device computes it natively (CUDA, a CPU with "
              "AVX512-BF16 or AMX), else float32")


class TaskConfig(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    instruction: str = Field(min_length=1)
    examples: list[FewShot] = Field(min_length=1)
    labels: list[str] | None = None
    answer: Answer = "free"
    cot: Literal["none", "fewshot", "annotate"] = "none"
    metric: Literal["accuracy", "exact_match_f1", "pass_at_1"] | None = None
    exclude_datasets: list[str] = []
    eval: EvalSetConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        if self.answer == "label" and not self.labels:
            raise ValueError("answer: label needs a `labels` list")
        if self.metric is None:
            default = {"label": "accuracy", "span": "exact_match_f1", "free": "exact_match_f1",
                       "code": "pass_at_1"}
            object.__setattr__(self, "metric", default[self.answer])
        return self


def config_hash(*parts: BaseModel | dict | list | str | None) -> str:
    """A stable short hash of config objects, stored in manifests to decide what to rebuild."""

    def plain(p: Any) -> Any:
        return p.model_dump(mode="json") if isinstance(p, BaseModel) else p

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
