"""The embedder's two backends on the bundled MiniLM: ONNX Runtime (our own export, cached)
gives the vectors of sentence-transformers' torch `encode`, and `auto` picks ONNX on a CPU."""

import pytest

from rebase_ray.datastore.encoders import (
    OnnxEncoder,
    TorchEncoder,
    load_encoder,
    onnx_model,
    resolve_backend,
)
from rebase_ray.models import MINILM, load_embedder

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


def test_auto_is_onnx_on_a_cpu_and_torch_on_a_gpu():
    assert resolve_backend("auto", "cpu") == "onnx"
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    assert isinstance(load_encoder(MINILM, "cpu", "auto"), OnnxEncoder)
    with pytest.raises(ValueError, match="runs on the CPU"):
        load_encoder(MINILM, "cuda", "onnx")
