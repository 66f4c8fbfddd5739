"""Lenient, exact parsing of a teacher reply into a JSON object ({"input", "output"} and an
optional "rationale" for an example). A schema-constrained reply is plain JSON; free replies
need the leniency.

Recovered: JSON inside code fences, JSON followed or preceded by chatter, single-quoted
(Python-literal) objects, trailing commas, non-string values (made strings). Anything else
raises ParseError with the reason, which becomes the reject reason.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any


class ParseError(ValueError):
    pass


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _objects(text: str) -> list[str]:
    """Balanced {...} spans in order of appearance (string-aware)."""
    spans, depth, start, in_str, quote, escape = [], 0, -1, False, "", False
    for i, ch in enumerate(text):
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == quote:
                in_str = False
        elif ch in "\"'" and depth > 0:
            in_str, quote = True, ch
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append(text[start: i + 1])
    return spans


def _load(candidate: str) -> Any:
    for attempt in (candidate, _TRAILING_COMMA.sub(r"\1", candidate)):
        try:
            return json.loads(attempt)
        except json.JSONDecodeError:
            pass
        try:
            return ast.literal_eval(attempt)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    return None


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def parse_object(reply: str, required: tuple[str, ...],
                 optional: tuple[str, ...] = ()) -> dict[str, str]:
    """The first JSON object of a reply that has every `required` key (case-insensitive), as
    {key: str} with the `optional` keys it has too; else ParseError(reason)."""
    if not reply or not reply.strip():
        raise ParseError("empty reply")
    candidates = [m.group(1) for m in _FENCE.finditer(reply)] + [reply]
    seen_object = False
    for block in candidates:
        for obj_text in _objects(block):
            obj = _load(obj_text)
            if not isinstance(obj, dict):
                continue
            seen_object = True
            keys = {str(k).strip().lower(): v for k, v in obj.items()}
            if all(k in keys for k in required):
                return {k: _text(keys[k]) for k in (*required, *optional) if k in keys}
    if seen_object:
        names = " and ".join(f"'{k}'" for k in required)
        raise ParseError(f"JSON object without {'both ' if len(required) == 2 else ''}"
                         f"{names} key{'s' if len(required) > 1 else ''}")
    if "{" in reply:
        raise ParseError("malformed JSON object")
    raise ParseError("no JSON object in the reply")


def parse_example(reply: str) -> dict[str, str]:
    """{"input": str, "output": str[, "rationale": str]} from a teacher reply, or
    ParseError(reason)."""
    return parse_object(reply, ("input", "output"), ("rationale",))
