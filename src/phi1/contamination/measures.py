"""The three similarity measures of the paper's contamination study (§5), between a benchmark problem and a
training item (both Python code).

- docstring 13-grams (§5.1): the word 13-grams of the problem's docstring that also occur in a training item's
  docstring.
- embedding L2 distance (§5.2): between L2-normalized mean-pooled embeddings of a code model (the paper's
  CodeGen-Mono-350M; any encoder of phi1.quality.embed), so d = sqrt(2 - 2 cos) in [0, 2]; 0 = same direction.
- AST match rate τ (§5.2): 1 - (edit distance between the normalized ASTs) / (size of the larger one), with
  every identifier and literal abstracted (`x` and `total` are both NAME, 3 and 7 both NUM) and docstrings
  dropped, so renaming variables changes nothing; τ = 1.0 for identical code up to names and constants. The
  tree is linearized in preorder with explicit end-of-children marks (a bracket sequence determines the
  tree), and the edit distance is Levenshtein's on those sequences (rapidfuzz, C++), an upper bound of the
  tree edit distance that is exact on the small functions exercises are.
"""

from __future__ import annotations

import ast
import re
import zlib

import numpy as np

WORD = re.compile(r"\w+")
_UP = ")"  # end of a node's children in the linearization


def docstring_words(code: str) -> list[str]:
    """Lower-cased words of the docstrings in `code` (its functions' and the module's); the whole text when it
    does not parse (a benchmark prompt may be a bare description)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return WORD.findall(code.lower())
    docs = [ast.get_docstring(n) or "" for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return WORD.findall(" ".join(docs).lower())


def ngrams(words: list[str], n: int) -> set[int]:
    """The word n-grams, as stable 64-bit hashes (CRC32 of the n-gram twice salted: compact sets)."""
    out = set()
    for i in range(len(words) - n + 1):
        gram = " ".join(words[i : i + n]).encode()
        out.add(zlib.crc32(gram) << 32 | zlib.crc32(gram, 0x5BD1E995))
    return out


class _Normalizer(ast.NodeVisitor):
    def __init__(self):
        self.labels: list[str] = []

    def generic_visit(self, node):
        label = type(node).__name__
        if isinstance(node, ast.Constant):
            label = "STR" if isinstance(node.value, (str, bytes)) else "NUM" if isinstance(
                node.value, (int, float, complex)) else repr(node.value)  # True, False, None, ... kept
        elif isinstance(node, ast.operator | ast.cmpop | ast.unaryop | ast.boolop):
            label = type(node).__name__  # Add vs Sub matters
        self.labels.append(label)
        for field, value in ast.iter_fields(node):
            if field in ("ctx", "type_comment", "kind"):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and field == "body":
                value = _without_docstring(value)
            if isinstance(value, list):
                for item in value:
                    if isinstance(item, ast.AST):
                        self.visit(item)
            elif isinstance(value, ast.AST):
                self.visit(value)
            # identifiers (names, attributes, args) are str fields: abstracted by leaving them out
        self.labels.append(_UP)


def _without_docstring(body: list) -> list:
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[1:]
    return body


def ast_labels(code: str) -> list[str] | None:
    """The normalized AST of `code` as a preorder label sequence, None if it does not parse."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    v = _Normalizer()
    for node in _without_docstring(tree.body):
        v.visit(node)
    return v.labels


def match_rate(a: list[str], b: list[str]) -> float:
    """τ = 1 - edit distance / longer length: 1.0 identical, 0.0 nothing in common."""
    from rapidfuzz.distance import Levenshtein

    if not a and not b:
        return 1.0
    return 1.0 - Levenshtein.distance(a, b) / max(len(a), len(b))


def shingle_ids(labels: list[str]) -> np.ndarray:
    """Labels as stable ints, the "tokens" whose n-gram shingles MinHash indexes (candidate pruning)."""
    return np.fromiter((zlib.crc32(label.encode()) for label in labels), dtype=np.uint32, count=len(labels))
