"""`Resources`: what every pool of Ray workers asks for (embedding actors, shard actors, IFD
and evaluation tasks, Ray Train workers), one model under one name in every stage, and
`moved`: the old per-stage keys (`num_cpus_per_actor`, `ifd_num_cpus`, `shard_cpus`,
`build_cpus`, `cpus_per_worker`, `torch_threads`, ...) read onto it with a warning naming the
new key (`renamed`: the validator a config class declares for that). Unset fields are resolved
from the running Ray cluster when a stage starts
(`rebase_ray.runtime.resolve_resources`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field, model_validator

from rebase_ray.config.schema import Strict

log = logging.getLogger(__name__)


class Resources(Strict):
    """One pool of Ray actors. Unset (None) values follow the resources free in the Ray cluster
    when the stage starts, so a stage uses the machine with no config and never asks for more
    than is free (an actor pool waiting for CPUs that never free up would wait forever)."""

    actors: int | None = Field(
        default=None, gt=0, description="actors in the pool; None: as many as the free CPUs "
        "hold at `cpus` each (at 1 each when `cpus` is unset), or the free GPUs at `gpus` "
        "each when gpus > 0, at least 1, at most the stage's work")
    cpus: float | None = Field(
        default=None, ge=0, description="CPUs Ray reserves per actor; None: the free CPUs "
        "shared among the actors (1 for a GPU actor)")
    gpus: float = Field(default=0, ge=0, description="GPUs per actor (> 0: the actor runs "
                        "on CUDA)")
    threads: int | None = Field(
        default=None, gt=0, description="torch (or FAISS) threads per actor; None: the actor's "
        "share of the CPUs free when the stage starts, rounded (at least its own CPUs "
        "rounded up, at most one node's CPUs)")


Rename = str | tuple[str, Callable[[Any], Any]]


def moved(data: Any, section: str, keys: dict[str, Rename], into: str | None = "resources",
          defaults: dict[str, Any] | None = None) -> Any:
    """A `model_validator(mode="before")`'s work: each old key of `keys` found in `data` moves
    to `data[into][new]` (`data[new]` when `into` is None), through the tuple's function if
    any, with a logged deprecation warning naming the new key. An old key beside its new one
    is an error naming both. `defaults`: the section's own defaults under `into`, kept for
    the keys a user's `into` leaves out (pydantic would take the plain model's)."""
    if not isinstance(data, dict) or not (defaults or any(k in data for k in keys)):
        return data
    data = dict(data)
    if into is None:
        target = data
    else:
        sub = data.get(into) or {}
        target = sub.model_dump(exclude_unset=True) if isinstance(sub, BaseModel) else dict(sub)
    where = f"{section}." + (f"{into}." if into else "")
    for old, rename in keys.items():
        if old not in data:
            continue
        new, convert = rename if isinstance(rename, tuple) else (rename, None)
        if new in target:
            raise ValueError(f"{section}.{old} and {where}{new} are both set: {old} is "
                             f"deprecated, keep {where}{new}")
        value = data.pop(old)
        target[new] = convert(value) if convert else value
        log.warning("%s.%s is deprecated and will be removed: use %s%s", section, old, where,
                    new)
    if into is not None:
        data[into] = {**(defaults or {}), **target}
    return data


def renamed(section: str, keys: dict[str, Rename], into: str | None = "resources",
            defaults: dict[str, Any] | None = None) -> Any:
    """A before-validator for a config class body (`_old_keys = renamed(...)`) that applies
    `moved` with these arguments."""

    def validate(cls: type, data: Any) -> Any:
        return moved(data, section, keys, into, defaults)

    return model_validator(mode="before")(classmethod(validate))
