"""Loading `sources.yaml`, `task.yaml` and `pipeline.yaml`: pydantic's errors become messages
that name the file, the key and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from rebase_ray.config.schema import ConfigError, SourcesFile, TaskConfig
from rebase_ray.config.stages import PipelineConfig

# ----------------------------------------------------------------------------- loading

M = TypeVar("M", bound=BaseModel)


def _expected(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    return err["msg"]


def format_errors(source: str, model: type[BaseModel], exc: ValidationError) -> str:
    lines = [f"{source}: invalid {model.__name__} ({exc.error_count()} error(s))"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        line = f"  - {loc}: {_expected(err)}"
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, err["loc"][:-1])
            if parent is not None:
                line += f"; allowed keys: {', '.join(parent.model_fields)}"
        elif err["type"] not in ("missing",) and "input" in err:
            line += f" (got {err['input']!r})"
        lines.append(line)
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The nested model class at a pydantic error location, to list its allowed keys."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return None
        current = _first_model(field.annotation)
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def validate(data: Any, model: type[M], source: str = "<config>") -> M:
    if data is None:
        raise ConfigError(f"{source}: the file is empty; expected a {model.__name__} mapping")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(source, model, exc)) from None


def load_yaml(path: str | Path, model: type[M]) -> M:
    """Read one YAML file into `model`; errors name the file and the key."""
    from rebase_ray.storage import Storage  # storage imports the schema, through this package

    text = Storage.for_uri(str(path)).read_text(str(path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return validate(data, model, str(path))


def load_sources(path: str | Path) -> SourcesFile:
    sources = load_yaml(path, SourcesFile)
    base = Path(str(path)).parent
    for s in sources.sources:
        s.path = _relative_to(s.path, base)
    return sources


def load_task(path: str | Path) -> TaskConfig:
    task = load_yaml(path, TaskConfig)
    if task.eval is not None:
        task.eval.path = _relative_to(task.eval.path, Path(str(path)).parent)
    return task


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read pipeline.yaml. Input files it names (task, sources, their data) are resolved relative
    to it; `storage_root` and `datastore` stay relative to the working directory."""
    cfg = load_yaml(path, PipelineConfig)
    base = Path(str(path)).parent
    if isinstance(cfg.task, str):
        cfg.task = load_task(_relative_to(cfg.task, base))
    elif cfg.task is not None and cfg.task.eval is not None:
        cfg.task.eval.path = _relative_to(cfg.task.eval.path, base)
    if isinstance(cfg.sources, str):
        cfg.sources = load_sources(_relative_to(cfg.sources, base)).sources
    else:
        for s in cfg.sources or []:
            s.path = _relative_to(s.path, base)
    return cfg


def _relative_to(uri: str, base: Path) -> str:
    if "://" in uri or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())
