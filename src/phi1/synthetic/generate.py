"""What the textbooks and exercises stages share (paper §2.2): drawing constraints, asking the model, pricing
a dry run, and writing kept and rejected documents with a report.

Diversity comes from constraints drawn per document from versioned lists shipped in `lists/` (topics,
audiences, styles, concept words, function-name verbs). Document i's draw depends on (seed, i) and the
documents before it (no two ask the same question: `distinct`), so raising `n` extends a set without
changing its first documents, and a rerun asks exactly the same questions: the LLM client's cache answers
them, so a killed run resumes paying only for what it lacks.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from phi1 import atomic
from phi1.errors import InputError
from phi1.llm import LLM, ParseError
from phi1.markdown import code_block

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


# Draws of document i's constraints before a repeat of an earlier document's prompt is kept as a variant
REDRAWS = 10


def distinct(seed: int, n: int, draw: Callable[[random.Random], tuple[dict, str]]) -> list[tuple[str, dict, str]]:
    """(suffix, constraints, prompt) for documents 0..n-1, no two prompts alike: `draw` makes a document's
    constraints and prompt from its generator rng_for(seed, i), and draws again while the prompt is an earlier
    document's. The LLM client answers a repeated request from its cache, with the same text, which the
    exact-duplicate gate then drops: drawn independently, 7% of 100K exercises repeated one (216 topics × 40
    verbs × 78 concepts = 673,920 combinations) and 44% of the paper's 880K. Where REDRAWS more draws all
    repeat (the combinations nearly used up), the prompt is asked again as its k-th variant, a new request
    that the model answers anew (constraints["variant"] = k). Document i depends on (seed, i) and the documents
    before it, so raising n extends a set."""
    seen: dict[str, int] = {}
    out = []
    # a bar: the paper's 880K exercises take ~20 s to draw, before anything else is shown
    for i in tqdm(range(n), desc="constraints", unit="doc", mininterval=1.0, dynamic_ncols=True):
        rng = rng_for(seed, i)
        for _ in range(1 + REDRAWS):
            constraints, prompt = draw(rng)
            if prompt not in seen:
                break
        k = seen.get(prompt, 0) + 1
        seen[prompt] = k
        if k > 1:
            constraints = {**constraints, "variant": k}
            prompt += f"\n\n(Variant {k} of this request.)"
        out.append((f"s{seed}-{i:07d}", constraints, prompt))
    return out


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


def _answered(text: str) -> bool:
    if not text.strip():
        raise ParseError("empty answer")
    return True


def generate(llm: LLM, items: list[tuple[str, dict, list[dict]]], prompt_version: str, desc: str) -> set[str]:
    """Ask for every item's answer (the cache answers those already paid for); the ids of the non-empty ones.
    The answers stay in the cache, and `answers` reads them back one at a time: held with their rows, 100K
    textbooks took 1.6 GB (bench/synthetic_scale.py; 446 MB read back), the paper's ~1M ~16 GB."""
    return set(llm.map([(item_id, messages) for item_id, _, messages in items], _answered, prompt_version, desc))


def answers(llm: LLM, items, answered: set[str], prompt_version: str,
            usage: Counter) -> Iterator[tuple[str, dict, str, str | None]]:
    """(id, constraints, answer, finish_reason) of the answered items in their order, read from the cache, the
    finish_reason only where the API cut the answer short (UNFINISHED), else None; adds each answer's prompt and
    completion tokens to `usage`: what the set cost, whether paid in this run or an earlier one."""
    for item_id, constraints, messages in items:
        if item_id in answered:
            response = llm.cached_response(messages, prompt_version)
            usage["prompt_tokens"] += response["prompt_tokens"]
            usage["completion_tokens"] += response["completion_tokens"]
            finish = response.get("finish_reason")
            yield item_id, constraints, response["text"], finish if finish in UNFINISHED else None


# The API's reasons for ending an answer before the model did: at llm.max_tokens (gpt35's 1,024 tokens, ~4,100
# characters, against textbooks of ~3,600 on average), or by its content filter. A textbook cut mid-sentence passed
# every other gate.
UNFINISHED = {"length": "truncated", "content_filter": "content_filtered"}


def unfinished(row: dict) -> str | None:
    """The gate of an answer the API cut short (its finish_reason, kept in the row only then)."""
    return UNFINISHED.get(row.get("finish_reason"))


def priced(llm: LLM, usage: Counter) -> dict:
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "dollars": round(llm.cost(prompt, completion), 4)}


def first_failure(row: dict, gates) -> str | None:
    """The reason of the first of `gates` (functions row -> reason or None) that `row` fails, in their order."""
    for gate in gates:
        if reason := gate(row):
            return reason
    return None


# Documents shown in <name>.examples.md: the first kept, the first removed for each reason, each cut to its
# first lines (what was paid for, read before it is trained on).
EXAMPLES_KEPT, EXAMPLES_PER_REASON, EXAMPLE_LINES = 3, 2, 40


class Output:
    """<name>.jsonl (kept) and <name>.rejected.jsonl (with reasons: nothing generated is lost), written row by
    row under temporary names and renamed into place, with <name>.report.json and <name>.examples.md (the first
    documents kept and removed for each reason, to read), by `finish`. A stage that stops midway removes its
    temporary files and leaves the last complete set as it was. `language`: how the documents' text is shown."""

    def __init__(self, out: Path, name: str, language: str = "markdown"):
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.name, self.language = out, name, language
        self.shown: dict[str, list[dict]] = {}  # "kept" or a reason -> its first rows
        self.final = {kind: out / f"{name}{kind}.jsonl" for kind in ("", ".rejected")}
        for path in self.final.values():  # a run killed hard leaves its files behind: GBs at the paper's scale
            atomic.remove_stale(path, hidden=True)
        self.tmp = {kind: atomic.temporary(path, hidden=True) for kind, path in self.final.items()}
        self.files = {kind: open(path, "w") for kind, path in self.tmp.items()}
        self.kept = self.kept_chars = 0
        self.reasons: Counter = Counter()

    def keep(self, row: dict) -> None:
        self.files[""].write(json.dumps(row) + "\n")
        self.kept += 1
        self.kept_chars += len(row["text"])
        if self.kept <= EXAMPLES_KEPT:
            self.shown.setdefault("kept", []).append(row)

    def reject(self, row: dict, reason: str, **extra) -> None:
        self.files[".rejected"].write(json.dumps({**row, "rejected": reason, **extra}) + "\n")
        self.reasons[reason] += 1
        if self.reasons[reason] <= EXAMPLES_PER_REASON:
            self.shown.setdefault(reason, []).append({**row, **extra})

    def finish(self, report: dict) -> dict:
        for kind, f in self.files.items():
            f.close()
            self.tmp[kind].rename(self.final[kind])
        (self.out / f"{self.name}.report.json").write_text(json.dumps(report, indent=2) + "\n")
        self._examples()
        return report

    def _examples(self) -> None:
        md = [f"# {self.name}: {self.kept:,} kept, {sum(self.reasons.values()):,} removed", "",
              f"The first {EXAMPLES_KEPT} documents kept and the first {EXAMPLES_PER_REASON} removed for each reason "
              f"(the first gate each failed), each its first {EXAMPLE_LINES} lines; all of them are in "
              f"{self.name}.jsonl and {self.name}.rejected.jsonl.", ""]
        for group in ["kept", *sorted(self.reasons, key=lambda r: -self.reasons[r])]:
            count = self.kept if group == "kept" else self.reasons[group]
            md += [f"## {'Kept' if group == 'kept' else f'Removed: {group}'} ({count:,})", ""]
            for row in self.shown.get(group, []):
                constraints = row.get("meta", {}).get("constraints", {})
                drawn = "; ".join(f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}"
                                  for k, v in constraints.items())
                text = row.get("answer") or row.get("text", "")  # a removed exercise: the answer as it came
                md += [f"### {row.get('id') or row.get('task_id')}", "", *([f"*{drawn}*", ""] if drawn else []),
                       *code_block("\n".join(text.splitlines()[:EXAMPLE_LINES]), self.language), ""]
                if row.get("output"):  # what its examples printed when run
                    md += ["Output:", "", *code_block(row["output"].rstrip(), "text"), ""]
        (self.out / f"{self.name}.examples.md").write_text("\n".join(md))

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc) -> None:
        for kind, f in self.files.items():
            f.close()
            self.tmp[kind].unlink(missing_ok=True)  # gone already where finish renamed it
