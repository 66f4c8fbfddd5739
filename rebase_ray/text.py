"""Text normalisation and n-gram overlap, shared by decontamination (retrieve) and the quality
filters (transform)."""

from __future__ import annotations

import re
from collections.abc import Iterable

_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    """Lower-case words joined by single spaces (punctuation and spacing dropped)."""
    return " ".join(_WORD.findall((text or "").lower()))


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalize(text).split()
    return {tuple(words[i: i + n]) for i in range(len(words) - n + 1)}


class NgramIndex:
    """The word n-grams of a reference set (e.g. a task's eval set); `overlaps(text)` tells
    whether a text shares any n-gram with it. Texts shorter than n words are matched whole."""

    def __init__(self, texts: Iterable[str], n: int = 13):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: set[str] = set()
        for t in texts:
            grams = ngrams(t, n)
            if grams:
                self.grams |= grams
            elif normalize(t):
                self.short.add(normalize(t))

    def __len__(self) -> int:
        return len(self.grams) + len(self.short)

    def overlaps(self, text: str) -> bool:
        if not self:
            return False
        grams = ngrams(text, self.n)
        if grams & self.grams:
            return True
        return bool(self.short) and normalize(text) in self.short
