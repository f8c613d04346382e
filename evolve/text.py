"""Text helpers every stage shares: words, stop words, normalising, clipping, stemming, JSON extraction.

The only copy: keyword search, prompt layout, goal grounding, diagnosis and the LLM layer all
import from here, so "a word" means the same thing everywhere.
"""

from __future__ import annotations

import json
import re
from typing import Any

WORD = re.compile(r"[a-z0-9]+")

STOPWORDS = frozenset(
    [
        *("a", "an", "the", "of", "to", "in", "on", "at", "and", "or", "is", "are", "was", "be"),
        *("it", "its", "this", "that", "with", "for", "from", "by", "as", "you", "your"),
        *("there", "here", "into", "onto"),
    ]
)
"""Function words that carry no signal for search or for ranking actions."""

GROUNDING_STOPWORDS = STOPWORDS | frozenset(["inside", "up", "down", "some", "any", "then"])
"""Also words that never name what an action acts on (for matching actions to goal sentences)."""

_SUFFIXES = ("ing", "ed", "es", "en", "s")


def words(text: str) -> list[str]:
    """Every lower-cased alphanumeric word of ``text``, in order."""
    return WORD.findall(text.lower())


def tokenize(text: str, stop: frozenset[str] = STOPWORDS) -> list[str]:
    """Lower-cased content words of ``text`` (stop words dropped), in order."""
    return [w for w in WORD.findall(text.lower()) if w not in stop]


def stem(word: str) -> str:
    """A tiny stemmer: unlocked/unlocks/unlocking -> unlock, take/taken -> tak; never below 3 letters."""
    for suf in _SUFFIXES:
        if word.endswith(suf) and len(word) - len(suf) >= 3:
            word = word[: -len(suf)]
            break
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]
    return word


def content_stems(text: str) -> list[str]:
    """Stems of the content words of ``text`` (grounding stop words dropped)."""
    return [stem(w) for w in tokenize(text, GROUNDING_STOPWORDS)]


def normalise(text: str) -> str:
    """Lower-case, whitespace-collapsed text (for comparing observations, actions, templates)."""
    return re.sub(r"\s+", " ", text.strip().lower())


def normalise_command(text: str) -> str:
    """A command as a model may have quoted it: quotes and trailing punctuation dropped, normalised."""
    return normalise(text.strip().strip("\"'`")).rstrip(".!;:,")


def clip(text: str, limit: int, marker: str = " ...[clipped]") -> str:
    """``text`` stripped and cut to at most ``limit`` characters, ``marker`` showing the cut."""
    text = text.strip()
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(marker))].rstrip() + marker


def one_line(text: str, limit: int) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``limit`` characters with '...'."""
    return clip(" ".join(text.split()), limit, marker="...")


def extract_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object embedded in ``text`` (code fences and prose around it are skipped)."""
    decoder = json.JSONDecoder()
    i = text.find("{")
    while i >= 0:
        try:
            obj, _ = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return obj
        i = text.find("{", i + 1)
    return None


__all__ = [
    "GROUNDING_STOPWORDS",
    "STOPWORDS",
    "WORD",
    "clip",
    "content_stems",
    "extract_json_object",
    "normalise",
    "normalise_command",
    "one_line",
    "stem",
    "tokenize",
    "words",
]
