"""Sentence encoders behind one `encode(texts, batch_size)`: sentence-transformers on torch, or
the same model exported to ONNX and run by ONNX Runtime (`index.backend: onnx`; minimum cosine
0.9999998 between the two vectors of a cell).

Which is faster depends on the CPU (benchmarks/embed_onnx.py, 2 cores: ONNX 1.62x and 1.07x the
cells/s of torch on an AVX512-BF16 and an AVX2 machine, 0.76x on an AVX512-BF16 machine with
AMX), so `auto` on a CPU times both once per machine, model and thread count on the same sample
(`cpu_backend`) and keeps the faster; the choice is recorded in the model cache. On CUDA `auto`
is torch.

The export is our own (`torch.onnx.export`, dynamic batch and sequence axes): the
sentence-transformers `backend="onnx"` needs optimum-onnx, which pins transformers<4.58.
It is written once per model into the model cache (a file lock keeps concurrent actors from
exporting twice) and the pooling the model declares (mean over the attention mask, then L2
normalisation) is applied to ONNX Runtime's output. Vectors are L2-normalised float32.
Tokenizer, max length and pooling are read from the model's files, so an encoder whose export
is cached never builds the torch model (an embedding actor or a query starts faster).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import numpy as np

Backend = Literal["auto", "torch", "onnx"]
ONNX_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
OPSET = 17
# Texts per forward pass on a CPU. An embedding call sorts its texts by length, and smaller
# batches of sorted texts pad less: 2048-cell calls of the 802-source datastore's cells ran at
# 222.7 cells/s in batches of 16, 211.5 in 32, 195.0 in 64 (2 threads).
CPU_ENCODE_BATCH = 16
GPU_ENCODE_BATCH = 64  # not measured here (no GPU): the default before CPU_ENCODE_BATCH
SAMPLE_CELLS = 128  # texts timed per backend and round by `cpu_backend`
SAMPLE_WORDS = (6, 12, 24, 48, 96, 160)  # their lengths, in words, taken in turn
SAMPLE_VOCAB = ("the of and to in is was for that on with as by at from his an which are this "
                "be or had not first new one their has after were two she other been its into "
                "who more city year team state school during people world music game film time "
                "between under three national river system series company government season "
                "church called second early family university found album known war")

log = logging.getLogger(__name__)


def resolve_backend(backend: Backend, device: str, ref: str, threads: int = 0) -> str:
    """`backend` itself unless it is auto; auto: torch on CUDA, and on a CPU the one that
    encodes `ref` faster here at `threads` threads (`cpu_backend`)."""
    if backend != "auto":
        return backend
    return cpu_backend(ref, threads)["backend"] if device == "cpu" else "torch"


class TorchEncoder:
    """sentence-transformers' own `encode`."""

    def __init__(self, ref: str, device: str):
        from rebase_ray.models import load_embedder

        self.model = load_embedder(ref, device)

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        vectors = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


class OnnxEncoder:
    """The model's transformer through ONNX Runtime, pooled as the model declares. Tokenizer,
    max length and pooling come from the model's files (`sentence_config`): the torch model is
    built only to make the export, once per model (`onnx_model`)."""

    def __init__(self, ref: str, threads: int):
        import onnxruntime as ort

        config = sentence_config(ref)
        self.tokenizer, self.lower = config.tokenizer(), config.lower
        self.max_len = self.tokenizer.model_max_length
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(onnx_model(ref)), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Batches of similar length (as sentence-transformers' `encode` sorts them)."""
        out: np.ndarray | None = None
        texts = [t.lower() for t in texts] if self.lower else texts
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                 max_length=self.max_len, return_tensors="np")
            hidden = self.session.run(None, {k: enc[k].astype(np.int64) for k in self.inputs})[0]
            mask = enc["attention_mask"][..., None].astype(np.float32)
            vectors = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
            vectors /= np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
            if out is None:
                out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def load_encoder(ref: str, device: str, backend: Backend = "auto", threads: int = 0):
    """The encoder of `ref` for `device` (cpu or cuda) and `backend`; `threads` is ONNX
    Runtime's (0: its default, every core; torch's are set by the caller) and the thread count
    that auto's choice is made for."""
    if resolve_backend(backend, device, ref, threads) == "onnx":
        if device != "cpu":
            raise ValueError("index.backend onnx runs on the CPU; use torch (or auto) on a GPU")
        return OnnxEncoder(ref, threads)
    return TorchEncoder(ref, device)


@dataclass
class SentenceConfig:
    """What encoding needs from a sentence-transformers model folder (or hub id)."""

    folder: str  # the transformer module's folder
    subfolder: str
    tokenizer_kwargs: dict
    lower: bool  # do_lower_case
    max_positions: int | None  # config.json's max_position_embeddings

    def tokenizer(self):
        """The tokenizer with the max length sentence-transformers gives it."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.folder, subfolder=self.subfolder,
                                            **self.tokenizer_kwargs)
        if "model_max_length" not in self.tokenizer_kwargs and self.max_positions:
            tok.model_max_length = min(tok.model_max_length, self.max_positions)
        return tok


def sentence_config(ref: str) -> SentenceConfig:
    """`ref`'s modules.json, sentence_bert_config.json and pooling config, read without loading
    the model; a model other than transformer + mean pooling + Normalize is refused."""
    from rebase_ray.models import ModelError, resolve

    root = resolve(ref)
    modules = _model_json(root, "modules.json") or []
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    pooling = (_model_json(root, f"{modules[1]['path']}/config.json") or {}
               if len(modules) > 1 else {})
    # sentence-transformers 3-5 and 6 spell the mode differently
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True}
    if kinds != ["Transformer", "Pooling", "Normalize"] or not (
            pooling.get("pooling_mode") == "mean" or modes == {"pooling_mode_mean_tokens"}):
        raise ModelError("index.backend onnx handles transformer + mean pooling + Normalize "
                         f"models only, not {kinds or 'a model without modules.json'} "
                         f"({pooling}); use index.backend: torch")
    sub = modules[0]["path"]
    config = _model_json(root, f"{sub}/sentence_bert_config.json".lstrip("/")) or {}
    kwargs = dict(config.get("processor_kwargs") or config.get("tokenizer_args") or {})
    if config.get("max_seq_length") is not None:
        kwargs.setdefault("model_max_length", config["max_seq_length"])
    positions = (_model_json(root, f"{sub}/config.json".lstrip("/")) or {}).get(
        "max_position_embeddings")
    return SentenceConfig(root, sub, kwargs, bool(config.get("do_lower_case")),
                          positions if positions and positions > 0 else None)


def _model_json(root: str, name: str) -> dict | list | None:
    """A JSON file of a model folder or hub repository; None where it has none."""
    path = Path(root) / name
    if not Path(root).is_dir():
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = Path(hf_hub_download(root, name))
        except EntryNotFoundError:
            return None
    return json.loads(path.read_text()) if path.is_file() else None


def onnx_model(ref: str, st=None) -> Path:
    """The ONNX export of `ref`'s transformer, made once per model (and torch, onnx and opset
    versions) into the model cache. The torch model (`st`, a loaded SentenceTransformer, when
    the caller has one) is loaded only to make the export."""
    from filelock import FileLock

    from rebase_ray.models import ModelError, cache_dir, load_embedder, resolve

    key = hashlib.sha256(f"{resolve(ref)}\x1f{version('torch')}\x1f{version('onnx')}"
                         f"\x1f{OPSET}".encode()).hexdigest()[:16]
    folder = cache_dir() / "onnx" / key
    path = folder / "model.onnx"
    if (folder / ".complete").exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / ".complete").exists():  # another actor exported it meanwhile
            return path
        import torch

        st = st if st is not None else load_embedder(ref, "cpu")
        model = st[0].auto_model.eval()
        names = [n for n in ONNX_INPUTS if n in st.tokenizer.model_input_names]
        sample = st.tokenizer(["a short one", "a padded, somewhat longer example"],
                              padding=True, return_tensors="pt")
        try:
            axes = {k: {0: "batch", 1: "seq"} for k in [*names, "hidden"]}
            torch.onnx.export(_keyword_inputs(model, names), tuple(sample[k] for k in names),
                              str(path), input_names=names, output_names=["hidden"],
                              opset_version=OPSET, dynamo=False, dynamic_axes=axes)
        except Exception as exc:  # any exporter failure: say which model and what to do
            raise ModelError(f"{ref}: the ONNX export failed ({type(exc).__name__}: {exc}); "
                             "use index.backend: torch") from exc
        (folder / ".complete").write_text(ref)
    return path


def _keyword_inputs(model, names: list[str]):
    """A module that calls the transformer with keyword inputs (its forward's positional order
    changed in transformers 5.x)."""
    import torch

    class KeywordInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(**dict(zip(names, inputs))).last_hidden_state

    return KeywordInputs()


def cpu_backend(ref: str, threads: int = 0) -> dict:
    """Which backend encodes `ref` faster on this CPU at `threads` threads (0: each library's
    default): `{"backend", "cells_per_s": {"torch", "onnx"}, "threads", "cpu"}`. Both are timed
    once on the same sample, in turn, best of two rounds each, then the record is read from
    the model cache (`backend_record`). A file lock keeps concurrent actors from timing at
    once."""
    from filelock import FileLock

    record = backend_record(ref, threads)
    if record.exists():
        return json.loads(record.read_text())
    record.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(record) + ".lock"):
        if record.exists():  # another actor timed it meanwhile
            return json.loads(record.read_text())
        rates = _time_backends(ref, threads)
        choice = {"backend": max(rates, key=rates.get), "cells_per_s": rates,
                  "threads": threads, "cpu": _cpu_signature().split("\x1f")[0]}
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(choice))
        tmp.replace(record)
    log.info("index.backend auto: %s on this CPU for %s at %s threads (cells/s %s)",
             choice["backend"], ref, threads or "default", rates)
    return choice


def backend_record(ref: str, threads: int) -> Path:
    """Where `cpu_backend` keeps its choice: keyed by the model, the CPU's name and flags, the
    thread count, the batch and the library versions, so another machine or an upgrade times
    again."""
    from rebase_ray.config import config_hash
    from rebase_ray.models import cache_dir, resolve

    key = config_hash(resolve(ref), _cpu_signature(), threads, CPU_ENCODE_BATCH,
                      version("torch"), version("onnxruntime"), version("sentence-transformers"),
                      OPSET)
    return cache_dir() / "backends" / f"{key}.json"


def _time_backends(ref: str, threads: int) -> dict[str, float]:
    """cells/s of each backend on `sample_texts()` in batches of `CPU_ENCODE_BATCH` (as the
    build's CPU actors encode), best of two rounds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        torch_encoder = TorchEncoder(ref, "cpu")
        onnx_model(ref, torch_encoder.model)  # the export, from the model loaded already
        encoders = {"torch": torch_encoder, "onnx": OnnxEncoder(ref, threads)}
        texts = sample_texts()
        best = dict.fromkeys(encoders, 0.0)
        for encoder in encoders.values():  # warm-up: first calls allocate
            encoder.encode(texts[:16], CPU_ENCODE_BATCH)
        for _ in range(2):
            for name, encoder in encoders.items():
                start = time.perf_counter()
                encoder.encode(texts, CPU_ENCODE_BATCH)
                best[name] = max(best[name], len(texts) / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(before)
    return {name: round(rate, 1) for name, rate in best.items()}


def sample_texts() -> list[str]:
    """`SAMPLE_CELLS` English-like texts of `SAMPLE_WORDS` lengths in turn, the same on every
    machine (a datastore's cells mix short and long values)."""
    words = SAMPLE_VOCAB.split()
    rng = random.Random(0)
    return [" ".join(rng.choices(words, k=SAMPLE_WORDS[i % len(SAMPLE_WORDS)])) + "."
            for i in range(SAMPLE_CELLS)]


def _cpu_signature() -> str:
    """The CPU's model name and flags (/proc/cpuinfo, else what `platform` knows) and the
    cores this process may use."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            field, _, value = line.partition(":")
            info.setdefault(field.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}\x1f{info.get('flags', '')}\x1f{cores}"
