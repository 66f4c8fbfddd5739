"""Structured outputs: JSON schemas checked for what xgrammar enforces, compiled once per
tokenizer and schema (`Grammars`), and `GrammarMask`, which masks the logits of the rows that
have a grammar and follows the rows still in the batch."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# JSON-schema keywords that the grammar enforces (or that only annotate). Anything else would
# be ignored by xgrammar without a word, so it is refused with its name.
SUPPORTED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "enum",
    "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "minLength",
    "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minItems", "maxItems", "minProperties", "maxProperties",
    # annotations
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly",
})
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # {name: schema}
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")  # [schema]
_SCHEMA_VALUES = ("items", "additionalProperties")  # schema (or bool)


class UnsupportedSchema(ValueError):
    """A response format the grammar engine cannot enforce; the message names the feature."""


def check_schema(schema: Any, path: str = "$") -> None:
    """Raise UnsupportedSchema naming the first keyword the engine would not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"{path}: a JSON schema must be an object, got "
                                f"{type(schema).__name__}")
    for key, value in schema.items():
        if key not in SUPPORTED_KEYWORDS:
            raise UnsupportedSchema(f"the JSON-schema keyword {key!r} (at {path}) is not "
                                    "supported by the grammar engine")
        if key == "pattern" and "(?" in str(value):
            raise UnsupportedSchema(f"the pattern at {path} uses a group construct '(?...)' "
                                    "(lookaround, named or flagged groups), which the grammar "
                                    "engine does not support")
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                check_schema(sub, f"{path}.{key}.{name}")
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                check_schema(sub, f"{path}.{key}[{i}]")
        elif key in _SCHEMA_VALUES:
            check_schema(value, f"{path}.{key}")


@dataclass(frozen=True)
class Constraint:
    """What one row's output must be: a JSON schema, any JSON object, or one of `choices`."""

    kind: str  # "json_schema" | "json_object" | "choice"
    spec: str = ""  # the schema or the choices as JSON

    @classmethod
    def json_schema(cls, schema: dict) -> Constraint:
        check_schema(schema)
        # keys keep their order: the grammar writes properties in the schema's order
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object")

    @classmethod
    def choice(cls, choices: Sequence[str]) -> Constraint:
        choices = [str(c) for c in choices]
        if not choices or any(not c for c in choices):
            raise UnsupportedSchema("a choice list needs at least one non-empty string")
        return cls("choice", json.dumps(choices))


class Grammars:
    """Compiles constraints for one tokenizer with xgrammar; each constraint once."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]):
        try:
            import xgrammar as xgr
        except ImportError as exc:  # pragma: no cover - the Makefile installs it
            raise ImportError("structured outputs need xgrammar: pip install --no-deps "
                              "'xgrammar>=0.2.8,<0.3' 'apache-tvm-ffi>=0.1.11'") from exc
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info)
        # Tokens holding a control byte (U+0000..U+001F). Constrained output never needs one
        # (JSON is compiled without free whitespace; choices are plain strings), but xgrammar
        # 0.2.9 lets them into strings with minLength/maxLength, which breaks strict JSON
        # parsers: they are masked for every constrained row.
        stops = set(stop_token_ids)
        self.control_tokens = [i for i, b in enumerate(info.decoded_vocab)
                               if i not in stops and any(c < 0x20 for c in b)]
        self._cache: dict[Constraint, Any] = {}
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint):
        with self._lock:
            grammar = self._cache.get(constraint)
            if grammar is None:
                grammar = self._compile(constraint)
                self._cache[constraint] = grammar
            return grammar

    def _compile(self, c: Constraint):
        if c.kind == "json_object":  # OpenAI's json_object: any JSON object (not an array)
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if c.kind == "choice":
            options = " | ".join(json.dumps(s) for s in json.loads(c.spec))
            return self.compiler.compile_grammar(f"root ::= {options}")
        try:
            return self.compiler.compile_json_schema(c.spec, any_whitespace=False)
        except Exception as exc:  # xgrammar raises RuntimeError / InvalidJSONError subclasses
            raise UnsupportedSchema(f"the grammar engine cannot compile this schema: {exc}"
                                    ) from exc

    @property
    def cached(self) -> int:
        return len(self._cache)


def grammar_mask_class():
    """GrammarMask, built on xgrammar, imported on first use."""
    import torch
    import xgrammar as xgr

    class GrammarMask:
        """Per-row xgrammar matchers over the original rows; rows whose grammar is None are
        not masked. `mask(active, scores)` masks the scores of the rows now in the batch (row
        `active[b]` in batch position b); `accept(row, token)` advances a row's matcher."""

        def __init__(self, grammars: list[Any], vocab_size: int, banned: list[int]):
            self.matchers = [None if g is None else xgr.GrammarMatcher(g) for g in grammars]
            self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
            self.banned = torch.tensor(banned, dtype=torch.long)

        def accept(self, row: int, token: int) -> None:
            m = self.matchers[row]
            if m is not None and not m.is_terminated():
                m.accept_token(token)

        def mask(self, active: list[int], scores):
            batch = [b for b, r in enumerate(active)
                     if self.matchers[r] is not None and not self.matchers[r].is_terminated()]
            if not batch:
                return scores
            for b in batch:
                self.matchers[active[b]].fill_next_token_bitmask(self.bitmask, b)
            xgr.apply_token_bitmask_inplace(scores, self.bitmask[: len(active)].to(scores.device),
                                            indices=batch)
            rows = torch.tensor(batch, device=scores.device)
            scores[rows.unsqueeze(1), self.banned.to(scores.device)] = float("-inf")
            return scores

    return GrammarMask
