"""Documents to token ids for packing: the ids `tokenizers` gives, ~3× faster per core on Python source.

A byte-level BPE tokenizer (GPT-2's, codegen's, the local one) cuts text into pieces with one regex, then runs
BPE on each piece on its own, so a piece's ids never depend on its neighbours. Code repeats its pieces
(`self`, ` return`, `    `, `):`) endlessly: 20 MB of the standard library holds 4.4M pieces but only 65K
distinct ones. `Encoder` cuts ASCII text with Python's `re` (the same pattern, spelled for ASCII), looks each
piece up in a cache of ids and asks the tokenizer only for pieces it has not seen. One thread, the first 20 MB
of the standard library (3,486 files, 65 of them with non-ASCII text), 51,200-token BPE: `encode_batch_fast`
6.9 s, this 2.1 s from an empty cache; the ASCII files alone 1.5 s, 0.9 s with the cache warm.

Exactness: text outside ASCII is left to the tokenizer, since its regex engine's Unicode tables are its own.
A document that holds some non-ASCII is cut at each newline between two printable ASCII characters (where the
pieces are the same on either side of the cut as in the whole text, see _LINE_CUT), and only the parts with
non-ASCII text go to the tokenizer. Added tokens (`<|endoftext|>`, codegen's runs of spaces and
tabs) are split off first, longest first, as `tokenizers` does. Tokenizers of any other shape (a normalizer,
another pre-tokenizer, BPE dropout, added tokens that strip) are encoded by `tokenizers` alone. On creation the
encoder checks itself against the tokenizer on every ASCII character in many contexts and falls back to the
tokenizer if anything differs.
"""

from __future__ import annotations

import json
import logging
import random
import re
from itertools import chain, islice

import numpy as np

log = logging.getLogger(__name__)

# GPT-2's pre-tokenizer pattern, as `tokenizers`' ByteLevel uses it:
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# On ASCII text \p{L} is [A-Za-z], \p{N} is [0-9] and \s is the six characters below (Unicode White_Space;
# Python's own \s would add \x1c-\x1f).
_WS = r"\t\n\x0b\x0c\r "
ASCII_PIECES = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
# Where a document with non-ASCII text may be cut: at a newline between two printable ASCII characters. That
# newline is a piece of its own in context (only the whitespace alternatives hold it, and its neighbours are not
# whitespace) and at the end of the part before the cut; after a run of newlines it would not be: "é\n\n&" is
# "é", "\n", "\n", "&", but the part "é\n\n" on its own ends in one piece "\n\n".
_LINE_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~])")
# Where a long text may be cut into parts: as above, or between an ASCII letter or digit and ASCII punctuation
# (the piece before, a run of letters or digits or a contraction, ends there whatever follows; the one after
# starts there whatever precedes; no whitespace run, the only lookahead, ends there). A file without such
# cuts, one indented line after another, still has them in plenty.
_PART_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~])|(?<=[A-Za-z0-9])(?=[!-/:-@\[-`{-~])")
# Cached pieces before the cache is emptied: ~180 bytes each in a worker's resident memory (key, ids, dict slot),
# so ~12 MB. Few pieces carry the hits: a worker that sees half of 100 MB of Python meets 152K distinct ones;
# emptied at 64K it asks the tokenizer for 199K instead of 153K (5.3M characters instead of 5.0M, of 50M), and
# pack's wall clock did not move beyond this machine's noise (10 rounds alternating with 1M: median ratio 0.97).
# At 1M (~180 MB) the cache grew with the corpus: each worker +24 MB from 1x to 10x the benchmark corpus, and
# it would grow towards 180 MB on a corpus of The Stack's size.
MAX_PIECES = 1 << 16
# Text is cut into pieces this many characters at a time: a list of pieces costs ~15 bytes a character while it
# lives, and a worker keeps its high-water mark (a whole 4 MB batch at once: ~60 MB; every batch holding one
# copy of the corpus's largest file, a 4 MB one, made a worker grow from ~270 to ~360 MB over a 1 GB pack).
# Longer texts are cut into parts of about this size (Encoder._parts).
PART_CHARS = 1 << 16


class Encoder:
    """`encode(texts)` -> (all ids in order as one array of `dtype`, ids per text); the same ids as
    `tokenizer.encode_batch_fast(texts, add_special_tokens=False)`."""

    def __init__(self, tokenizer, dtype, fast: bool = True, check: bool = True):
        self.tokenizer, self.dtype = tokenizer, np.dtype(dtype)
        why_not = _unsupported(json.loads(tokenizer.to_str())) if fast else "switched off"
        self._added, self._seed = None, {}
        self.cache: dict[str, bytes] = {}
        if why_not is None:
            added = sorted({t.content for t in tokenizer.get_added_tokens_decoder().values()}, key=len, reverse=True)
            # Longest first: Python's regex takes the first alternative that matches, so at each position the
            # longest added token wins, as in `tokenizers`' leftmost-longest matching.
            self._added = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
            self._seed = {a: self._ids([tokenizer.token_to_id(a)]) for a in added}
            self.cache.update(self._seed)
            self.fast = True
            why_not = self._self_check() if check else None
            if why_not:  # a tokenizer of the right shape that the cache gets wrong: worth a user's attention
                log.warning("the piece cache is off (packing will be ~3x slower): %s", why_not)
        self.fast = why_not is None
        if not self.fast:
            self._added, self._seed, self.cache = None, {}, {}
            log.info("packing encodes with `tokenizers` alone: %s", why_not)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not self.fast:
            encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
            flat = np.fromiter((i for e in encodings for i in e.ids), dtype=self.dtype, count=int(lengths.sum()))
            return flat, lengths
        if len(self.cache) > MAX_PIECES:
            self.cache = dict(self._seed)
        parts = [self._parts(text) for text in texts]
        encoded: list[bytes] = []
        group, size = [], 0
        for part in chain.from_iterable(parts):
            group.append(part)
            size += len(part)
            if size >= PART_CHARS:
                encoded += self._encode_group(group)
                group, size = [], 0
        encoded += self._encode_group(group)
        done = iter(encoded)
        blobs = [b"".join(islice(done, len(p))) for p in parts]
        lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs)) // self.dtype.itemsize
        return np.frombuffer(b"".join(blobs), dtype=self.dtype), lengths

    def _parts(self, text: str) -> list[str]:
        """The text as its added tokens and the stretches between them, those cut into parts of about
        PART_CHARS where the pieces stay the same (_PART_CUT)."""
        segments = self._added.split(text) if self._added else [text]
        parts: list[str] = []
        for k, segment in enumerate(segments):
            if k % 2 or len(segment) <= PART_CHARS:  # odd: an added token (the split's captured group)
                parts += [segment] if segment else []
                continue
            start = 0
            while len(segment) - start > PART_CHARS and (cut := _PART_CUT.search(segment, start + PART_CHARS)):
                parts.append(segment[start : cut.start()])
                start = cut.start()
            parts.append(segment[start:])
        return parts

    def _encode_group(self, texts: list[str]) -> list[bytes]:
        """The ids of each text, asking the tokenizer once for all the pieces not seen yet."""
        cache = self.cache
        pieces = [self._pieces(text) for text in texts]
        new = [p for p in set().union(*pieces) if p not in cache]
        if new:
            for piece, encoding in zip(new, self.tokenizer.encode_batch_fast(new, add_special_tokens=False)):
                cache[piece] = self._ids(encoding.ids)
        ids = [b"".join(map(cache.__getitem__, p)) for p in pieces]
        for piece in new:  # non-ASCII stretches are mostly unique lines: not worth their memory
            if not piece.isascii():
                del cache[piece]
        return ids

    def _pieces(self, part: str) -> list[str]:
        """A part (see _parts) cut into pieces whose ids are looked up one by one: an added token is one piece
        (no stretch between added tokens can equal one: `tokenizers` would have split it off); ASCII text the
        pre-tokenizer's pieces; other text cut into lines, whole ones where they hold non-ASCII."""
        if part in self._seed:
            return [part]
        if part.isascii():
            return ASCII_PIECES.findall(part)
        pieces: list[str] = []
        for line in _LINE_CUT.split(part):
            if line.isascii():
                pieces += ASCII_PIECES.findall(line)
            elif line:
                pieces.append(line)
        return pieces

    def _ids(self, ids: list[int]) -> bytes:
        return np.asarray(ids, dtype=self.dtype).tobytes()

    def _self_check(self) -> str | None:
        """None if this encoder gives the tokenizer's ids on strings that exercise every ASCII character,
        every alternative of the pattern, the added tokens and non-ASCII lines; else what differs."""
        rng = random.Random(0)
        alphabet = [chr(c) for c in range(128)] + list(" \t\n    'sltrevmd") + ["é", "λ", "\u3000", "\xa0", "😀"]
        probes = ["".join(rng.choices(alphabet, k=rng.randint(1, 60))) for _ in range(3000)]
        added = list(self._seed)
        probes += [f"x{a}y {a}\n{a}" for a in added] + ["".join(rng.choices(alphabet[:128] + added, k=40))
                                                        for _ in range(300)]
        probes.append("".join(probes))  # ~100K characters: longer than PART_CHARS, so cut into parts
        probes += ["def f(x):\n    return x  # café\n\tpass\n", "  \n\n   \t x's 're 1.5e3 ¡no!\r\n", "é\n\n&",
                   "a = 'ü'\n\n\ndef g():\n    pass\n \nb\n\u3000\nc\n"]
        mine, lengths = self.encode(probes)
        theirs = self.tokenizer.encode_batch_fast(probes, add_special_tokens=False)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for k, (text, encoding) in enumerate(zip(probes, theirs)):
            if mine[offsets[k] : offsets[k + 1]].tolist() != encoding.ids:
                return f"its ids differ from the tokenizer's on {text[:120]!r}"
        self.cache = dict(self._seed)  # the probes' pieces are not worth keeping
        return None


def _unsupported(spec: dict) -> str | None:
    """Why this tokenizer (its tokenizer.json) cannot be encoded piece by piece; None if it can."""
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer"):
        return "it has a normalizer"
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return f"its pre-tokenizer is not GPT-2's ByteLevel ({pre})"
    if (spec.get("model") or {}).get("dropout"):
        return "its BPE has dropout"
    for token in spec.get("added_tokens", []):
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return f"added token {token['content']!r} strips or matches whole words"
    return None
