"""What the textbooks and exercises stages share (paper §2.2): drawing constraints, asking the model, pricing
a dry run, and writing kept and rejected documents with a report.

Diversity comes from constraints drawn per document from versioned lists shipped in `lists/` (topics,
audiences, styles, concept words, function-name verbs). Document i's draw depends only on (seed, i), so
raising `n` extends a set without changing its first documents, and a rerun asks exactly the same
questions: the LLM client's cache answers them, so a killed run resumes paying only for what it lacks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from phi1.errors import InputError
from phi1.llm import LLM, ParseError

log = logging.getLogger(__name__)

HERE = Path(__file__).parent


class SyntheticError(InputError):
    pass


def load_list(name: str, version: str) -> list[str]:
    path = HERE / "lists" / f"{name}.{version}.txt"
    if not path.exists():
        known = sorted(p.name for p in (HERE / "lists").glob(f"{name}.*.txt"))
        raise SyntheticError(f"{path}: no such list (have: {', '.join(known) or 'none'})")
    items = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if len(set(items)) != len(items):
        raise SyntheticError(f"{path}: duplicate entries")
    return items


def load_prompt(name: str, version: str) -> str:
    path = HERE / "prompts" / f"{name}.{version}.txt"
    if not path.exists():
        raise SyntheticError(f"{path}: no such prompt (stage.prompt_version={version!r})")
    return path.read_text()


def rng_for(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")  # a str seed is hashed with SHA-512: the same on every machine


def nonempty(text: str) -> str:
    if not text.strip():
        raise ParseError("empty answer")
    return text


def make_llm(cfg: DictConfig, out: Path, stage_name: str) -> LLM:
    if cfg.llm.kind != "openai":
        raise SyntheticError(
            f"stage={stage_name} generates text and needs a model: llm=gpt35 (the paper's), or "
            "llm=openai_compatible llm.base_url=http://host:port/v1 (vLLM, TGI, ...); "
            f"llm={cfg.llm.name} cannot write"
        )
    return LLM.from_config(cfg.llm, cache_path=Path(cfg.paths.data_dir) / "llm_cache.sqlite",
                           quarantine_path=out / "quarantine.jsonl")


def dry_run(llm: LLM, items: list[tuple[str, dict, list[dict]]], stage: DictConfig, prompt_version: str) -> dict:
    """Tokens and dollars for this run's `n` documents and, scaled, for `stage.target_tokens` of output."""
    estimate = llm.estimate([m for _, _, m in items], stage.expected_output_tokens, prompt_version)
    result = {"dry_run": estimate}
    if stage.target_tokens:
        # Over every request, cached or not: from the uncached ones alone, a set already generated (a dry run
        # after a trial run of n) priced the target's prompts at 0 tokens.
        per_request = sum(llm.prompt_tokens(m) for _, _, m in items) / max(len(items), 1)
        requests = math.ceil(stage.target_tokens / stage.expected_output_tokens)
        prompt = round(requests * per_request)
        completion = requests * stage.expected_output_tokens
        result["target"] = {"output_tokens": stage.target_tokens, "requests": requests, "prompt_tokens": prompt,
                            "completion_tokens": completion, "dollars": round(llm.cost(prompt, completion), 2)}
    log.info("dry run: %s", json.dumps(result))
    return result


def generate(llm: LLM, items: list[tuple[str, dict, list[dict]]], prompt_version: str, desc: str) -> dict[str, str]:
    return llm.map([(item_id, messages) for item_id, _, messages in items], nonempty, prompt_version, desc)


def usage(llm: LLM, items, answers: dict, prompt_version: str) -> dict:
    """Tokens and dollars of every answer in the set, whether paid in this run or an earlier one."""
    prompt = completion = 0
    for item_id, _, messages in items:
        if item_id in answers:
            response = llm.cached_response(messages, prompt_version)
            prompt += response["prompt_tokens"]
            completion += response["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "dollars": round(llm.cost(prompt, completion), 4)}


def write(out: Path, name: str, kept: list[dict], rejected: list[dict], report: dict) -> dict:
    """<name>.jsonl (kept), <name>.rejected.jsonl (with reasons: nothing generated is lost) and
    <name>.report.json, each written whole under a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    for filename, rows in ((f"{name}.jsonl", kept), (f"{name}.rejected.jsonl", rejected)):
        tmp = out / f".{filename}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        tmp.rename(out / filename)
    (out / f"{name}.report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def apply_gates(candidates: list[dict], gates) -> tuple[list[dict], list[dict], Counter]:
    """Run each candidate row through `gates` (functions row -> reason or None) in order; the first failing
    gate's reason rejects it. Returns (kept, rejected, counts of reasons)."""
    kept, rejected, reasons = [], [], Counter()
    for row in candidates:
        for gate in gates:
            reason = gate(row)
            if reason:
                reasons[reason] += 1
                rejected.append({**row, "rejected": reason})
                break
        else:
            kept.append(row)
    return kept, rejected, reasons
