import multiprocessing as mp

import pytest
import torch

from rebase_ray import models


def test_minilm_embeds_offline():
    emb = models.load_embedder(models.MINILM, device="cpu")
    vec = emb.encode(["a cat sat on the mat", "a kitten sat on a rug", "stock markets fell"],
                     normalize_embeddings=True)
    assert vec.shape == (3, 384)
    sims = vec @ vec.T
    assert sims[0, 1] > sims[0, 2]  # a real model, not random weights


def test_tiny_model_builds_with_real_tokenizer():
    model, tok = models.load_causal_lm(models.TINY, device="cpu")
    assert model.config.num_hidden_layers == 2
    assert tok.chat_template  # the SmolLM2 tokenizer carries its chat template
    ids = tok(["hello", "a longer prompt here"], return_tensors="pt", padding=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, ids["input_ids"].shape[1] + 4)


@pytest.mark.slow
def test_smollm2_generates():
    model, tok = models.load_causal_lm(models.SMOLLM2, device="cpu")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0
    assert torch.isfinite(model.lm_head.weight).all()  # bfloat16 where native: no numpy


def _resolve_in_child(cache, q):
    import os

    os.environ["REBASE_RAY_CACHE"] = cache
    from rebase_ray import models as m

    q.put(m.resolve(m.TINY))


@pytest.mark.slow
def test_concurrent_conversion_happens_once(tmp_path):
    """Two processes resolving the same bundled model in a fresh cache convert it once."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_child, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    paths = {q.get(), q.get()}
    assert paths == {str(tmp_path / "tiny-random-llama")}
    assert (tmp_path / "smollm2-135m-instruct" / ".complete").exists()
    assert not list(tmp_path.glob("*.tmp*"))


def test_unknown_refs():
    with pytest.raises(models.ModelError, match="unknown bundled model"):
        models.resolve("bundled:nope")
    assert models.resolve("org/some-model") == "org/some-model"


def test_auto_dtype_is_bfloat16_only_where_it_is_native(monkeypatch):
    """'auto' picks bfloat16 on CUDA and on CPUs that compute it natively (AVX512-BF16, AMX);
    on others (AVX2: emulated, 3.3x slower decoding than float32) it picks float32."""
    import torch

    from rebase_ray.models import torch_dtype

    for avx512_bf16, amx, want in ((False, False, torch.float32), (True, False, torch.bfloat16),
                                   (False, True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert torch_dtype("auto", "cpu") == want
    assert torch_dtype("auto", "cuda:0") == torch.bfloat16
    assert torch_dtype("float32", "cuda:0") == torch.float32
