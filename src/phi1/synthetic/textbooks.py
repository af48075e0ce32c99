"""The textbooks stage (paper §2.2): Python textbook passages, explanations interleaved with code, written by
GPT-3.5 (`llm=gpt35`) or any OpenAI-compatible model, each under constraints drawn from the shipped lists: a
topic, a target audience, a style and a few concept words (TinyStories-style). The paper made <1B tokens.

Output in `stage.output/`: `textbooks-s<seed>.jsonl` rows {"id", "text", "source", "meta": {"constraints",
"model", "prompt_version", "lists_version"}} (DESIGN §5 documents; `data=codetextbook` reads them), the rejected
ones with their reason, a report (counts kept and removed per gate, tokens, dollars) and examples.md (the first
documents kept and removed per gate, to read).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from phi1 import lock
from phi1.config import check, synthetic_checks
from phi1.synthetic import gates
from phi1.synthetic.generate import (Output, answers, distinct, dry_run, first_failure, generate, load_list,
                                     load_prompt, make_llm, priced, unfinished)

log = logging.getLogger(__name__)


def items(stage: DictConfig) -> list[tuple[str, dict, list[dict]]]:
    """(id, constraints, messages) for documents 0..n-1, no two prompts alike (generate.distinct): the same
    for the same seed and list versions."""
    lists = {name: load_list(name, stage.lists_version) for name in ("topics", "audiences", "styles", "concepts")}
    template = load_prompt("textbook", stage.prompt_version)
    k = stage.concepts_per_prompt

    def draw(rng) -> tuple[dict, str]:
        constraints = {
            "topic": rng.choice(lists["topics"]),
            "audience": rng.choice(lists["audiences"]),
            "style": rng.choice(lists["styles"]),
            "concepts": rng.sample(lists["concepts"], k),
        }
        return constraints, template.format(**{**constraints, "concepts": ", ".join(constraints["concepts"])})

    return [(f"textbook-{suffix}", constraints, [{"role": "user", "content": prompt}])
           for suffix, constraints, prompt in distinct(stage.seed, stage.n, draw)]


def run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    check([*synthetic_checks(stage), ("stage.concepts_per_prompt", stage.concepts_per_prompt > 0, "must be > 0")])
    # Per seed: seeds are separate sets (<stage>-s<seed>.jsonl), which may be generated at once.
    with lock.stage_output(Path(stage.output) / f"textbooks-s{stage.seed}", "textbooks"):
        return _run(cfg)


def _run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    out = Path(stage.output)
    todo = items(stage)
    version = f"textbook.{stage.prompt_version}+lists.{stage.lists_version}"
    llm = make_llm(cfg, out, "textbooks")
    if stage.dry_run:
        return dry_run(llm, todo, stage, version)
    answered = generate(llm, todo, version, "textbooks")

    # The config's values read once: OmegaConf's attribute access (~27 us) per gate and row was a tenth of the
    # stage's time
    min_chars, max_chars, prompt_version, lists_version = (stage.min_chars, stage.max_chars, stage.prompt_version,
                                                            stage.lists_version)
    duplicates = gates.Duplicates(stage.dedup)
    checks = [
        unfinished,
        lambda row: gates.refusal(row["text"]),
        lambda row: gates.boilerplate(row["text"]),
        lambda row: gates.length(row["text"], min_chars, max_chars),
        lambda row: gates.code_parses(row["text"]),
        lambda row: duplicates.check(row["text"]),
    ]
    usage, topics = Counter(), set()
    with Output(out, f"textbooks-s{stage.seed}") as output:
        for item_id, constraints, text, finish in tqdm(answers(llm, todo, answered, version, usage),
                                                       total=len(answered), desc="gates", unit="doc"):
            row = {"id": item_id, "text": text.strip() + "\n", "source": "textbooks",
                   "meta": {"constraints": constraints, "model": llm.model, "prompt_version": prompt_version,
                            "lists_version": lists_version}}
            if finish:
                row["finish_reason"] = finish
            if reason := first_failure(row, checks):
                output.reject(row, reason)
            else:
                output.keep(row)
                topics.add(constraints["topic"])
        report = {
            "requested": len(todo), "answered": len(answered), "unanswered": len(todo) - len(answered),
            "kept": output.kept, "removed": dict(output.reasons), "kept_chars": output.kept_chars,
            "topics": len(topics), "usage": priced(llm, usage), "paid_this_run": llm.summary(),
            "output": str(out / f"textbooks-s{stage.seed}.jsonl"),
        }
        log.info("textbooks: %d of %d kept; removed %s", output.kept, len(todo), dict(output.reasons))
        return output.finish(report)
