"""The annotate stage (paper §2.1): a seeded sample of N documents from a source, each judged for
educational value, written as JSONL rows {"id", "label", "score", "rationale", "judge", "prompt_version"}
(DESIGN §5). Rerunning skips the rows already written, and the LLM client's cache means that a run killed
mid-way pays for nothing twice."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from phi1.data import sources
from phi1.llm import LLM
from phi1.quality.judges import HeuristicJudge, LLMJudge, label

log = logging.getLogger(__name__)


def sample(source, n: int, seed: int) -> list[tuple[str, str]]:
    """n documents drawn uniformly in one pass (reservoir sampling, seeded), in source order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str, str]] = []
    for i, (doc_id, text) in enumerate(sources.documents(source)):
        item = (i, doc_id, text)
        if len(reservoir) < n:
            reservoir.append(item)
        elif (j := rng.randint(0, i)) < n:
            reservoir[j] = item
    return [(doc_id, text) for _, doc_id, text in sorted(reservoir)]


def run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    out = Path(stage.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = sample(stage.source, stage.n, stage.seed)
    done = set()
    if out.exists():
        done = {json.loads(line)["id"] for line in out.read_text().splitlines() if line.strip()}
    todo = [(i, t) for i, t in docs if i not in done]
    log.info("annotate: %d documents sampled from %s, %d already in %s, %d to judge",
             len(docs), stage.source.name, len(docs) - len(todo), out, len(todo))

    if cfg.llm.kind == "heuristic":
        judge = HeuristicJudge()
        llm = None
    else:
        llm = LLM.from_config(cfg.llm, cache_path=Path(cfg.paths.data_dir) / "llm_cache.sqlite",
                              quarantine_path=out.parent / "quarantine.jsonl")
        judge = LLMJudge(llm, stage.prompt_version, stage.max_chars)
        estimate = llm.estimate([judge.messages(t) for _, t in todo], stage.expected_output_tokens,
                                stage.prompt_version)
        log.info("annotate: estimated %s", estimate)
        if stage.dry_run:
            return {"dry_run": estimate}

    judgements = judge.judge_many(todo)
    with open(out, "a") as f:
        for doc_id, _ in todo:
            if doc_id in judgements:
                j = judgements[doc_id]
                f.write(json.dumps({"id": doc_id, "label": label(j.score, stage.label_threshold), "score": j.score,
                                    "rationale": j.rationale, "judge": judge.name,
                                    "prompt_version": judge.prompt_version}) + "\n")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    summary = {
        "output": str(out), "annotated": len(rows), "sampled": len(docs), "new": len(judgements),
        "unanswered": len(todo) - len(judgements), "labels": dict(Counter(r["label"] for r in rows)),
        "scores": dict(sorted(Counter(r["score"] for r in rows).items())),
        "llm": llm.summary() if llm else None,
    }
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("annotate: %s", summary)
    return summary
