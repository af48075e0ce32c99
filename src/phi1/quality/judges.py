"""Judges of educational value (paper §2.1): "determine its educational value for a student whose goal is to
learn basic coding concepts". A judge gives each document a 0-10 score, a rationale, and a binary label
(high/low, as the paper's classifier target) by a threshold on the score.

- `LLMJudge`: GPT-4 in the paper; any OpenAI-compatible model through phi1.llm, prompted with a versioned
  template (prompts/educational_value.<version>.txt), the grade parsed from its last "Educational value: N/10".
- `HeuristicJudge`: offline rules, for the embedded default and tests. It is a set of rules, not a model:
    self-contained   (2 points): no relative imports and at most 5 imports
    documented       (3 points): share of functions/classes with a docstring (2), comment lines (1)
    computes         (3 points): control flow (loops, branches, returns, comprehensions) per statement,
                                 against modules that are mostly assignments of constants (configuration)
    reasonable size  (2 points): 5 to 400 non-blank lines
  Code that does not parse scores 0.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from phi1.errors import MissingInputError
from phi1.llm import LLM, last_grade

PROMPTS = Path(__file__).parent / "prompts"
_GRADE = re.compile(r"educational value\s*[:=]?\s*\**\s*(\d{1,2})(?:\.\d+)?\s*/\s*10", re.IGNORECASE)


@dataclass
class Judgement:
    score: int
    rationale: str


def label(score: int, threshold: int) -> str:
    return "high" if score >= threshold else "low"


def parse_grade(answer: str) -> Judgement:
    """The last 'Educational value: N/10' of an answer; anything else is unparseable (never guessed)."""
    return Judgement(*last_grade(_GRADE, answer, "Educational value: N/10"))


class HeuristicJudge:
    name = "heuristic"
    prompt_version = "rules-v1"

    def judge_many(self, docs: list[tuple[str, str]]) -> dict[str, Judgement]:
        return {doc_id: self.judge(text) for doc_id, text in docs}

    def judge(self, code: str) -> Judgement:
        try:
            tree = ast.parse(code)
        except (SyntaxError, ValueError):
            return Judgement(0, "does not parse")
        lines = [line for line in code.splitlines() if line.strip()]
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        relative = any(isinstance(n, ast.ImportFrom) and n.level > 0 for n in imports)
        self_contained = 2 if not relative and len(imports) <= 5 else 0

        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        documented_share = sum(1 for d in defs if ast.get_docstring(d)) / len(defs) if defs else 0.0
        comments = sum(1 for line in lines if line.lstrip().startswith("#"))
        documented = round(2 * documented_share) + (1 if comments >= max(1, len(lines) // 40) else 0)

        statements = [n for n in ast.walk(tree) if isinstance(n, ast.stmt)]
        control = [n for n in ast.walk(tree) if isinstance(
            n, (ast.For, ast.While, ast.If, ast.Return, ast.ListComp, ast.DictComp, ast.SetComp, ast.GeneratorExp))]
        constant_assigns = [n for n in statements if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)]
        ratio = len(control) / max(len(statements), 1)
        computes = min(3, round(ratio * 10)) if len(constant_assigns) < 0.5 * max(len(statements), 1) else 0

        size = 2 if 5 <= len(lines) <= 400 else 0
        score = self_contained + documented + computes + size
        rationale = (f"self-contained {self_contained}/2 ({len(imports)} imports{', relative' if relative else ''}); "
                     f"documented {documented}/3 ({documented_share:.0%} of definitions, {comments} comment lines); "
                     f"computes {computes}/3 ({len(control)} control-flow nodes in {len(statements)} statements); "
                     f"size {size}/2 ({len(lines)} lines)")
        return Judgement(score, rationale)


class LLMJudge:
    def __init__(self, llm: LLM, prompt_version: str = "v1", max_chars: int = 12_000):
        self.llm = llm
        self.name = llm.model
        self.prompt_version = prompt_version
        path = PROMPTS / f"educational_value.{prompt_version}.txt"
        if not path.exists():
            raise MissingInputError(f"prompt version {prompt_version!r}: no {path}")
        self.template = path.read_text()
        # Long files are cut (the paper's annotators saw snippets); 12K characters ≈ 3K tokens of GPT-4's 8K.
        self.max_chars = max_chars

    def messages(self, code: str) -> list[dict]:
        return [{"role": "user", "content": self.template.replace("{code}", code[: self.max_chars])}]

    def judge_many(self, docs: list[tuple[str, str]]) -> dict[str, Judgement]:
        return self.llm.map([(doc_id, self.messages(text)) for doc_id, text in docs], parse_grade,
                            prompt_version=self.prompt_version, desc="annotate")
