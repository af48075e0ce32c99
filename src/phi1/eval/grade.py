"""LLM grading of completions (paper §4, Table 2): for the unconventional problems the paper asks GPT-4 for a
short verbal evaluation of each solution, then a grade from 0 to 10, because pass/fail tests miss partial
credit. The rubric is a versioned template (prompts/unconventional_grade.<v>.txt); the grade is the answer's
last "Grade: N/10" line, and an answer without one is reported as ungradable (quarantined), never guessed.
"""

from __future__ import annotations

import re
from pathlib import Path

from phi1.errors import MissingInputError
from phi1.llm import LLM, last_grade

PROMPTS = Path(__file__).parent / "prompts"
_FIELD = re.compile(r"\{(problem|solution)\}")
_GRADE = re.compile(r"grade\s*[:=]?\s*\**\s*(\d{1,2})(?:\.\d+)?\s*(?:/|out of)\s*10", re.IGNORECASE)


def parse_grade(answer: str) -> dict:
    """{"grade", "evaluation"} from the last 'Grade: N/10' of an answer."""
    grade, evaluation = last_grade(_GRADE, answer, "Grade: N/10")
    return {"grade": grade, "evaluation": evaluation}


def template(version: str) -> str:
    path = PROMPTS / f"unconventional_grade.{version}.txt"
    if not path.exists():
        raise MissingInputError(f"grading prompt version {version!r}: no {path}")
    return path.read_text()


def grade(llm: LLM, problems, completions: dict[str, list[str]], version: str = "v1") -> dict:
    """Grade the first completion of each problem. Returns {"grades": {task_id: {...}}, "mean": mean grade
    over the graded ones (0-10), "graded": n, "ungradable": [task ids]}."""
    text = template(version)
    items = []
    for p in problems:
        if completions.get(p.task_id):
            # One pass over the template: a second replace would also rewrite a "{solution}" the problem's own text
            # holds (an f-string, say), putting the completion inside the problem.
            fields = {"problem": p.prompt.rstrip(), "solution": completions[p.task_id][0]}
            content = _FIELD.sub(lambda m: fields[m.group(1)], text)
            items.append((p.task_id, [{"role": "user", "content": content}]))
    grades = llm.map(items, parse_grade, prompt_version=f"unconventional_grade.{version}", desc="grade")
    ungradable = [task_id for task_id, _ in items if task_id not in grades]
    mean = sum(g["grade"] for g in grades.values()) / len(grades) if grades else None
    return {"grades": grades, "mean": mean, "graded": len(grades), "ungradable": ungradable}
