"""The embedder's two backends on the bundled MiniLM: ONNX Runtime (our own export, cached)
gives the vectors of sentence-transformers' torch `encode`, a cached export starts without the
torch model, and `auto` keeps the faster of the two on this CPU, timed once."""

import json
import shutil
import subprocess
import sys

import pytest

from rebase_ray.datastore.encoders import (
    OnnxEncoder,
    TorchEncoder,
    backend_record,
    cpu_backend,
    load_encoder,
    onnx_model,
    resolve_backend,
    sentence_config,
)
from rebase_ray.models import MINILM, ModelError, load_embedder

TEXTS = ["a", "The prime minister said the budget would protect schools.",
         "Chelsea won the league after a 2-0 victory at home on Sunday afternoon.",
         "def add(a, b):\n    return a + b",
         "¿Dónde está la biblioteca? 图书馆在哪里？",
         " ".join(["a very long cell that the tokenizer has to cut"] * 80)]


def test_onnx_vectors_match_torch_and_the_export_is_made_once():
    torch_vectors = TorchEncoder(MINILM, "cpu").encode(TEXTS, batch_size=4)
    onnx = OnnxEncoder(MINILM, threads=1)
    onnx_vectors = onnx.encode(TEXTS, batch_size=4)  # batches of 4 and 2, padded
    assert onnx_vectors.shape == torch_vectors.shape == (len(TEXTS), 384)
    assert onnx_vectors.dtype.name == "float32"
    assert (onnx_vectors * torch_vectors).sum(axis=1).min() > 0.9999
    path = onnx_model(MINILM, load_embedder(MINILM, "cpu"))
    stamp = path.stat().st_mtime_ns
    OnnxEncoder(MINILM, threads=1)
    assert path.stat().st_mtime_ns == stamp  # the cached export, not a new one
    assert onnx.encode([], batch_size=4).shape[0] == 0


def test_auto_times_both_once_per_machine_and_keeps_the_faster(tmp_path, monkeypatch):
    export = onnx_model(MINILM).parent  # copied into an empty cache: only the timing runs
    shutil.copytree(export, tmp_path / "onnx" / export.name)
    monkeypatch.setenv("REBASE_RAY_CACHE", str(tmp_path))
    choice = cpu_backend(MINILM, threads=1)
    rates = choice["cells_per_s"]
    assert set(rates) == {"torch", "onnx"} and min(rates.values()) > 0
    assert choice["backend"] == max(rates, key=rates.get) and choice["threads"] == 1
    assert resolve_backend("auto", "cpu", MINILM, threads=1) == choice["backend"]
    (record,) = (tmp_path / "backends").glob("*.json")
    for backend, encoder in (("torch", TorchEncoder), ("onnx", OnnxEncoder)):
        record.write_text(json.dumps({**choice, "backend": backend}))  # read, not timed again
        assert isinstance(load_encoder(MINILM, "cpu", "auto", threads=1), encoder)
    assert record == backend_record(MINILM, 1) != backend_record(MINILM, 2)  # per thread count
    assert resolve_backend("auto", "cuda", MINILM) == "torch"
    assert resolve_backend("onnx", "cpu", MINILM) == "onnx"
    with pytest.raises(ValueError, match="runs on the CPU"):
        load_encoder(MINILM, "cuda", "onnx")


# A fresh process: with the export cached, the ONNX encoder reads the tokenizer, max length and
# pooling from the model's files and never imports sentence-transformers (the torch model).
CACHED_START = """
import sys
from rebase_ray.datastore.encoders import OnnxEncoder
encoder = OnnxEncoder("bundled:minilm", threads=1)
assert encoder.encode(["a cell"], batch_size=4).shape == (1, 384)
print(encoder.max_len, encoder.lower, "sentence_transformers" in sys.modules)
"""


def test_a_cached_export_starts_without_the_torch_model():
    onnx_model(MINILM)  # made here unless the cache has it
    proc = subprocess.run([sys.executable, "-c", CACHED_START], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # MiniLM's sentence_bert_config.json: max_seq_length 256, do_lower_case false
    assert proc.stdout.split() == ["256", "False", "False"]


def test_onnx_refuses_a_model_it_cannot_pool(tmp_path):
    """CLS pooling (read from the model's files, nothing loaded) is torch's to run."""
    kinds = ["Transformer", "Pooling", "Normalize"]
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": ["", "1_Pooling", "2_Normalize"][i],
         "type": f"sentence_transformers.models.{kind}"} for i, kind in enumerate(kinds)]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    with pytest.raises(ModelError, match="mean pooling.*use index.backend: torch"):
        sentence_config(str(tmp_path))
