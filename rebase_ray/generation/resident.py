"""The student model kept in a Ray worker process from one task to the next.

On CPUs, evaluation and IFD scoring run as Ray Data tasks, not actor pools, so that the
stages of one run reuse Ray's workers: Ray keeps an idle worker process for the job's next
task, and the model that one evaluation (or IFD pass) loaded there is still in memory for the
next one — the distill stages' evaluations, the next stage's IFD, the evaluate stage, `eval`
called twice from one driver. An actor pool would start new processes, import torch again
and reload the model every time.

Each process keeps one base model (the last one asked for) and the LoRA adapters of the last
call that named any, as peft named adapters. An adapter is named after a fingerprint of its
files (location, size and modification time or ETag), so a rewritten adapter is loaded again;
the base model is trusted by its reference (`models.resolve`) and dtype.

On GPUs the batches go to an actor pool instead (`map_resident`): Ray assigns a task's GPU
through CUDA_VISIBLE_DEVICES, which a process that already started CUDA no longer follows, so
a kept process could compute on a GPU that Ray has given to another task. An actor keeps its
GPU; the model then loads once per actor, for one evaluation or IFD pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rebase_ray.config import S3Config
from rebase_ray.generation.lm import LM
from rebase_ray.runtime import Plan


@dataclass
class _Resident:
    key: tuple[str, str]
    lm: LM
    adapters: set[str] = field(default_factory=set)  # peft names: fingerprints


_resident: _Resident | None = None
LOADED = "_loaded"  # the column a batch function marks its model loads in (`loaded_marks`)


def fingerprint(adapter: str, s3: S3Config | None = None) -> str:
    """A peft name for the adapter's files as they are now: their URIs, sizes and
    modification times (ETags on S3), hashed."""
    from rebase_ray.storage import Storage

    st = Storage.for_uri(adapter, s3)
    path = st.path(adapter)
    st.fs.invalidate_cache(path)
    files = sorted(st.fs.find(path))
    if not files:
        raise FileNotFoundError(f"no adapter files under {adapter}")
    keys = "\n".join(f"{f} {st.fs.ukey(f)}" for f in files)
    return "a" + hashlib.sha256(keys.encode()).hexdigest()[:16]


def resident_lm(model: str, dtype: str = "auto", adapters: dict[str, str] | None = None,
                s3: S3Config | None = None) -> tuple[LM, bool]:
    """(the LM of `model` with `adapters` loaded, whether the base model was loaded by this
    call): loaded once per process and kept. `adapters`: {peft name: URI}, each named by the
    driver with `fingerprint` (once per evaluation, not once per batch).

    Adapters loaded for an earlier call and not named now are deleted (a call that names none
    keeps them: it uses the base model, with `using(lm, None)`)."""
    from peft import PeftModel

    from rebase_ray.models import adapter_folder, load_causal_lm

    global _resident
    key = (model, dtype)
    loaded = _resident is None or _resident.key != key
    if loaded:
        _resident = None  # the old model's memory goes before the new one loads
        lm_model, tok = load_causal_lm(model, dtype=dtype)
        _resident = _Resident(key, LM(lm_model, tok))
    res, wanted = _resident, dict(adapters or {})
    missing = {name: uri for name, uri in wanted.items() if name not in res.adapters}
    if missing:
        with tempfile.TemporaryDirectory(prefix="rebase-ray-adapter-") as tmp:
            for name, uri in missing.items():
                folder = adapter_folder(uri, s3, f"{tmp}/{name}")
                if isinstance(res.lm.model, PeftModel):
                    res.lm.model.load_adapter(folder, adapter_name=name)
                else:
                    res.lm = LM(PeftModel.from_pretrained(res.lm.model, folder,
                                                          adapter_name=name), res.lm.tokenizer)
                res.lm.model.eval()
                res.adapters.add(name)
    if wanted:
        res.lm.model.set_adapter(next(iter(wanted)))
        for stale in res.adapters - set(wanted):
            res.lm.model.delete_adapter(stale)
        res.adapters &= set(wanted)
    return res.lm, loaded


def loaded_marks(rows: int, loaded: bool) -> list[bool]:
    """The `LOADED` column of a batch of `rows`: True on its first row when the batch loaded
    the base model, so the column summed over a pass counts the pass's loads."""
    return [loaded and i == 0 for i in range(rows)]


def using(lm: LM, adapter: str | None) -> contextlib.AbstractContextManager:
    """Run `lm` with the peft adapter named `adapter` switched on, or with none (the base
    model) when `adapter` is None."""
    from peft import PeftModel

    if adapter is not None:
        lm.model.set_adapter(adapter)
        return contextlib.nullcontext()
    if isinstance(lm.model, PeftModel):
        return lm.model.disable_adapter()
    return contextlib.nullcontext()


class _OnActor:
    """A Ray Data callable class around a batch function: one actor keeps its GPU."""

    def __init__(self, fn: Callable, kwargs: dict[str, Any]):
        self.fn, self.kwargs = fn, kwargs

    def __call__(self, batch: Any) -> Any:
        return self.fn(batch, **self.kwargs)


def map_resident(ds: Any, fn: Callable, kwargs: dict[str, Any], pool: Plan, **opts: Any) -> Any:
    """`ds.map_batches(fn, **opts)` with `fn(batch, **kwargs)` on `pool`'s workers: on CPU,
    tasks whose processes Ray keeps (with the model `fn` left in them) for the run's next
    pass; on GPU, an actor pool (see above)."""
    import ray

    if pool.gpus > 0:
        return ds.map_batches(_OnActor, fn_constructor_kwargs={"fn": fn, "kwargs": kwargs},
                              compute=ray.data.ActorPoolStrategy(size=pool.actors),
                              num_cpus=pool.cpus, num_gpus=pool.gpus, **opts)
    return ds.map_batches(fn, fn_kwargs=kwargs, concurrency=pool.actors, num_cpus=pool.cpus,
                          **opts)
