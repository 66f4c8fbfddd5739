"""`rebase-ray doctor`: what is installed, what resources there are, whether the bundled models
load and whether a storage URI is reachable. Returns a summary; the CLI renders it."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import time
from typing import Any

from rebase_ray import models
from rebase_ray.storage import open_storage

PACKAGES = ("ray", "torch", "transformers", "sentence-transformers", "peft", "faiss-cpu",
            "pyarrow", "s3fs", "pydantic", "vllm")


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def check_models(load: bool) -> list[dict[str, Any]]:
    rows = []
    for ref in (models.MINILM, models.SMOLLM2):
        t0 = time.perf_counter()
        row: dict[str, Any] = {"model": ref}
        try:
            row["path"] = models.resolve(ref)
            if load and ref == models.MINILM:
                vec = models.load_embedder(ref, device="cpu").encode(["doctor"])
                row["check"] = f"embeds to {vec.shape[1]} dims"
            elif load:
                model, tok = models.load_causal_lm(ref, device="cpu")
                ids = tok("Hello", return_tensors="pt")
                out = model.generate(**ids, max_new_tokens=3, do_sample=False)
                row["check"] = f"generated {out.shape[1] - ids['input_ids'].shape[1]} tokens"
            row["ok"] = True
        except Exception as exc:  # noqa: BLE001 - report every failure, keep checking the rest
            row["ok"] = False
            row["error"] = f"{type(exc).__name__}: {exc}"
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return rows


def check_storage(uri: str) -> dict[str, Any]:
    try:
        st, uri = open_storage(uri)
        probe = st.join(uri, f".rebase-ray-doctor-{os.getpid()}")
        st.write_bytes(probe, b"ok")
        ok = st.read_bytes(probe) == b"ok"
        st.delete(probe)
        return {"uri": uri, "ok": ok}
    except Exception as exc:  # noqa: BLE001 - the report names whatever went wrong
        return {"uri": uri, "ok": False, "error": f"{type(exc).__name__}: {exc}"}


def run_doctor(storage: str | None = None, load_models: bool = True) -> dict[str, Any]:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "versions": {p: _version(p) or "not installed" for p in PACKAGES},
        "resources": {"cpus": os.cpu_count(), "gpus": gpus,
                      "gpu_names": [torch.cuda.get_device_name(i) for i in range(gpus)]},
        "cache_dir": str(models.cache_dir()),
        "models": check_models(load_models),
    }
    ok = all(m["ok"] for m in report["models"])
    if storage:
        report["storage"] = check_storage(storage)
        ok = ok and report["storage"]["ok"]
    report["ok"] = ok
    return report
