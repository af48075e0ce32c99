"""Quality gates for generated text (paper §2.2 relies on GPT-3.5's output being clean; we check).

Each gate returns a reason string when a document fails it, None when it passes; the stages apply them in
order and count the first failure per document, so the report adds up to what was generated.
- refusal: the model declined or talked about itself ("As an AI language model", "I'm sorry, but I can't").
- boilerplate: chat filler around the content ("Sure! Here is ...", "I hope this helps").
- length: outside [min_chars, max_chars].
- code: a ```python block (or the exercise's code) that does not parse.
- duplicates: exact (same text) and near (MinHash over word 5-grams, phi1.data.dedup), the first one kept.
"""

from __future__ import annotations

import ast
import hashlib
import re
import zlib

import numpy as np

from phi1.data import dedup

REFUSAL = re.compile(
    r"\b(as an ai\b|as a language model|i(?:'m| am) (?:sorry|unable|not able)|i can(?:not|'t) (?:help|assist|"
    r"provide|write|create|comply|fulfil)|i(?:'m| am) just an ai|openai(?:'s)? (?:policy|guidelines))",
    re.IGNORECASE,
)
# Filler a chat model wraps content in: at the very start or end of the answer only, where it is filler.
BOILERPLATE_START = re.compile(r"^\s*(sure|certainly|of course|absolutely|great question)\b[!,.]?", re.IGNORECASE)
BOILERPLATE_END = re.compile(r"(i hope (this|that) helps|let me know if you (have|need)|feel free to ask)[^\n]*\s*$",
                             re.IGNORECASE)
CODE_BLOCK = re.compile(r"```[ \t]*(python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
WORD = re.compile(r"\w+")


def refusal(text: str) -> str | None:
    return "refusal" if REFUSAL.search(text) else None


def boilerplate(text: str) -> str | None:
    return "boilerplate" if BOILERPLATE_START.search(text) or BOILERPLATE_END.search(text) else None


def length(text: str, min_chars: int, max_chars: int) -> str | None:
    if len(text) < min_chars:
        return "too_short"
    if len(text) > max_chars:
        return "too_long"
    return None


def python_blocks(text: str) -> list[str]:
    """The ```python (or unlabelled) code blocks of a markdown answer; interactive sessions (>>>) left out."""
    return [code for label, code in CODE_BLOCK.findall(text) if not code.lstrip().startswith(">>>")]


def code_parses(text: str, require_code: bool = True) -> str | None:
    blocks = python_blocks(text)
    if require_code and not blocks:
        return "no_code"
    for code in blocks:
        try:
            ast.parse(code)
        except (SyntaxError, ValueError):
            return "code_does_not_parse"
    return None


class Duplicates:
    """Exact and near-duplicate detection over generated texts, in the order they are offered."""

    def __init__(self, cfg):
        self.index = dedup.Index(cfg)
        self.signer = dedup.Signer(cfg) if cfg.near else None

    def check(self, text: str) -> str | None:
        content_hash = hashlib.blake2b(text.encode(), digest_size=16).digest()
        signature = None
        if self.signer:
            # words, hashed to ints, as the "tokens" of the shingles (CRC32: stable across runs and machines)
            words = np.fromiter((zlib.crc32(w.encode()) for w in WORD.findall(text.lower())), dtype=np.uint32)
            signature = self.signer.signature(words if len(words) else np.zeros(1, dtype=np.uint32))
        reason = self.index.add(content_hash, signature, "generated")
        return None if reason is None else reason.split("_")[0] + "_duplicate"
