"""The offline CodeExercises stand-in (DESIGN §4, paper §2.2's format): every top-level function of the
standard library (test suites left out) that has a docstring and a body, as a docstring-completion exercise
in HumanEval's shape: {"task_id", "prompt" (signature + docstring), "canonical_solution" (the body),
"entry_point", "text" (prompt + solution, what training reads), "source", "meta"}.

`prepare.py stage=stdlib_exercises` writes it; `data=stdlib_exercises` trains on the same functions directly
from the standard library (source kind `stdlib_functions`), so finetuning needs no prepare step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from phi1.data import sources

log = logging.getLogger(__name__)


def build() -> list[dict]:
    root = sources.stdlib_dir()
    rows = []
    for rel in sources._py_files(root, skip_tests=True):
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        module = rel.removesuffix(".py")
        for name, prompt, solution in sources.exercises(text):
            rows.append({"task_id": f"stdlib/{module}/{name}", "prompt": prompt, "canonical_solution": solution,
                         "entry_point": name, "text": prompt + solution, "source": "stdlib_exercises",
                         "meta": {"file": f"{module}.py"}})
    return rows


def run(cfg: DictConfig) -> dict:
    out = Path(cfg.stage.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = build()
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tmp.rename(out)
    summary = {"exercises": len(rows), "modules": len({r["meta"]["file"] for r in rows}), "output": str(out),
               "characters": sum(len(r["text"]) for r in rows)}
    log.info("stdlib_exercises: %s", summary)
    return summary
