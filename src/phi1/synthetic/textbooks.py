"""The textbooks stage (paper §2.2): Python textbook passages, explanations interleaved with code, written by
GPT-3.5 (`llm=gpt35`) or any OpenAI-compatible model, each under constraints drawn from the shipped lists: a
topic, a target audience, a style and a few concept words (TinyStories-style). The paper made <1B tokens.

Output in `stage.output/`: `textbooks-s<seed>.jsonl` rows {"id", "text", "source", "meta": {"constraints",
"model", "prompt_version", "lists_version"}} (DESIGN §5 documents; `data=codetextbook` reads them), the rejected
ones with their reason, and a report: counts kept and removed per gate, tokens, dollars.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from phi1.config import check, synthetic_checks
from phi1.synthetic import gates
from phi1.synthetic.generate import (apply_gates, dry_run, generate, load_list, load_prompt, make_llm, rng_for,
                                     usage, write)

log = logging.getLogger(__name__)


def items(stage: DictConfig) -> list[tuple[str, dict, list[dict]]]:
    """(id, constraints, messages) for documents 0..n-1: the same for the same seed and list versions."""
    lists = {name: load_list(name, stage.lists_version) for name in ("topics", "audiences", "styles", "concepts")}
    template = load_prompt("textbook", stage.prompt_version)
    out = []
    for i in range(stage.n):
        rng = rng_for(stage.seed, i)
        constraints = {
            "topic": rng.choice(lists["topics"]),
            "audience": rng.choice(lists["audiences"]),
            "style": rng.choice(lists["styles"]),
            "concepts": rng.sample(lists["concepts"], stage.concepts_per_prompt),
        }
        prompt = template.format(**{**constraints, "concepts": ", ".join(constraints["concepts"])})
        out.append((f"textbook-s{stage.seed}-{i:07d}", constraints, [{"role": "user", "content": prompt}]))
    return out


def run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    check([*synthetic_checks(stage), ("stage.concepts_per_prompt", stage.concepts_per_prompt > 0, "must be > 0")])
    out = Path(stage.output)
    todo = items(stage)
    version = f"textbook.{stage.prompt_version}+lists.{stage.lists_version}"
    llm = make_llm(cfg, out, "textbooks")
    if stage.dry_run:
        return dry_run(llm, todo, stage, version)
    answers = generate(llm, todo, version, "textbooks")

    duplicates = gates.Duplicates(stage.dedup)
    checks = [
        lambda row: gates.refusal(row["text"]),
        lambda row: gates.boilerplate(row["text"]),
        lambda row: gates.length(row["text"], stage.min_chars, stage.max_chars),
        lambda row: gates.code_parses(row["text"]),
        lambda row: duplicates.check(row["text"]),
    ]
    candidates = [
        {"id": item_id, "text": answers[item_id].strip() + "\n", "source": "textbooks",
         "meta": {"constraints": constraints, "model": llm.model, "prompt_version": stage.prompt_version,
                  "lists_version": stage.lists_version}}
        for item_id, constraints, _ in todo if item_id in answers
    ]
    kept, rejected, reasons = apply_gates(candidates, checks)
    report = {
        "requested": len(todo), "answered": len(answers), "unanswered": len(todo) - len(answers),
        "kept": len(kept), "removed": dict(reasons),
        "kept_chars": sum(len(r["text"]) for r in kept),
        "topics": len({r["meta"]["constraints"]["topic"] for r in kept}),
        "usage": usage(llm, todo, answers, version), "paid_this_run": llm.summary(),
        "output": str(out / f"textbooks-s{stage.seed}.jsonl"),
    }
    log.info("textbooks: %d of %d kept; removed %s", len(kept), len(todo), dict(reasons))
    return write(out, f"textbooks-s{stage.seed}", kept, rejected, report)
