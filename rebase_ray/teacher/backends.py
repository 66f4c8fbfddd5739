"""The teacher backend interface and the transformers backend.

A backend turns a batch of chat conversations plus one set of sampling parameters into
completions with token counts: `generate(conversations, params) -> list[list[Completion]]`,
`params.n` completions per conversation. Backends:
- `TransformersBackend` (this module): batched `generate` with left padding, CPU or CUDA,
  optionally with a peft LoRA adapter on top of the base model (the student is served this way);
- `OpenAIBackend` (`openai_backend.py`): any OpenAI-compatible server;
- vLLM is not a backend object: on GPUs the whole endpoint is Ray Serve LLM's OpenAI app
  (`vllm_backend.py`), so vLLM's own continuous batching serves the requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from rebase_ray.config import TeacherConfig

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling fields. temperature 0 means greedy decoding; `seed` seeds torch's RNG
    before the batch's generate call (so a batch is reproducible, not each row on its own)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"


class Backend(Protocol):
    def generate(self, conversations: list[Messages],
                 params: SamplingParams) -> list[list[Completion]]: ...


class TransformersBackend:
    """A causal LM from transformers (plus an optional LoRA adapter), batched with left padding."""

    def __init__(self, model: str, adapter: str | None = None, dtype: str = "auto",
                 device: str | None = None):
        from rebase_ray.models import load_adapter, load_causal_lm

        self.model, self.tokenizer = load_causal_lm(model, device=device, dtype=dtype)
        if adapter:
            self.model = load_adapter(self.model, adapter)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.eos_ids.add(self.tokenizer.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id

    def generate(self, conversations: list[Messages],
                 params: SamplingParams) -> list[list[Completion]]:
        import torch

        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.model.device)
        sample = params.temperature > 0
        # Greedy decoding gives n identical answers: decode once and repeat.
        per_prompt = params.n if sample else 1
        kwargs = {"max_new_tokens": params.max_tokens, "do_sample": sample,
                  "num_return_sequences": per_prompt, "pad_token_id": self.pad_id}
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        new_tokens = out[:, enc["input_ids"].shape[1]:].tolist()
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        results: list[list[Completion]] = []
        for i, prompt_len in enumerate(prompt_tokens):
            rows = new_tokens[i * per_prompt:(i + 1) * per_prompt]
            comps = [self._completion(r, int(prompt_len), params) for r in rows]
            results.append(comps if sample else comps * params.n)
        return results

    def _completion(self, tokens: list[int], prompt_tokens: int,
                    params: SamplingParams) -> Completion:
        count, ended = len(tokens), False
        for j, t in enumerate(tokens):
            if t in self.eos_ids or t == self.pad_id:
                count, ended = j + 1, t in self.eos_ids
                break
        text = self.tokenizer.decode(tokens[:count], skip_special_tokens=True)
        hits = [text.find(s) for s in params.stop if s in text]
        if hits:
            text, ended = text[:min(hits)], True
        reason = "stop" if ended or count < params.max_tokens else "length"
        return Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=count,
                          finish_reason=reason)


def make_backend(cfg: TeacherConfig) -> Backend:
    """The backend object for `cfg.backend` (the vLLM endpoint is built by vllm_backend)."""
    if cfg.backend == "transformers":
        from rebase_ray.models import set_torch_threads

        set_torch_threads(cfg.serve.num_cpus, cfg.torch_threads)
        device = "cuda" if cfg.serve.num_gpus > 0 else None
        return TransformersBackend(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, device=device)
    if cfg.backend == "openai":
        from rebase_ray.teacher.openai_backend import OpenAIBackend

        return OpenAIBackend.from_config(cfg)
    raise ValueError("teacher.backend: vllm is served by Ray Serve LLM as a whole app "
                     "(rebase_ray.teacher.vllm_backend.build_vllm_app), not as a backend object")
