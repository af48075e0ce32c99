"""The annotate stage (paper §2.1): a seeded sample of N documents from a source, each judged for
educational value, written as JSONL rows {"id", "label", "score", "rationale", "judge", "prompt_version"}
(DESIGN §5), with a readable `<output>.examples.md` (documents per score, with the judge's rationale).
Rerunning skips the rows already written, and the LLM client's cache means that a run killed mid-way pays for
nothing twice."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from phi1 import lock
from phi1.config import check
from phi1.data import sources
from phi1.errors import InputError
from phi1.llm import LLM
from phi1.markdown import code_block
from phi1.quality.judges import HeuristicJudge, LLMJudge, label

log = logging.getLogger(__name__)


def sample(source, n: int, seed: int, cache: Path | None = None) -> list[tuple[str, str]]:
    """n documents drawn uniformly in one pass (reservoir sampling, seeded), in source order. The pass reads the
    whole source (The Stack streamed from the hub: hours), so the sample is kept in `cache`, headed by what it
    was drawn from (the source's fingerprint, n, seed): the dry run's pass serves the paid run and its resumes."""
    key = {"source": sources.fingerprint(source), "n": n, "seed": seed}
    if cache is not None and cache.exists():
        with open(cache) as f:
            head = json.loads(f.readline())
            if {k: head.get(k) for k in key} == key:
                log.info("annotate: the sample of %d documents (of %d) from %s", head["sampled"], head["read"], cache)
                return [tuple(json.loads(line)) for line in f]
    rng = random.Random(seed)
    reservoir: list[tuple[int, str, str]] = []
    i = -1
    for i, (doc_id, text) in enumerate(tqdm(sources.documents(source), desc="annotate: sampling", unit="doc",
                                            dynamic_ncols=True)):
        item = (i, doc_id, text)
        if len(reservoir) < n:
            reservoir.append(item)
        elif (j := rng.randint(0, i)) < n:
            reservoir[j] = item
    docs = [(doc_id, text) for _, doc_id, text in sorted(reservoir)]
    shared = sources.SharedIds(f"source {source.name!r}", sources.ID_FIX)
    for doc_id, text in docs:
        shared.add(doc_id, text)
    shared.check([doc_id for doc_id, _ in docs])
    if cache is not None:
        _write_jsonl(cache, [{**key, "sampled": len(docs), "read": i + 1}, *docs])
    return docs


def _write_jsonl(path: Path, rows) -> None:
    """Whole, under a temporary name then renamed: a kill leaves the previous file, never a cut line."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    tmp.replace(path)


def written(out: Path, judge, threshold: int) -> list[dict]:
    """The rows an earlier run wrote to `out`, each labelled again from its score at this run's threshold (a
    label is a function of the score: a rerun with another stage.label_threshold relabels the file when it
    rewrites it, rather than mixing two thresholds in it). A last line cut short (a kill while an earlier
    version appended to the file) is dropped and judged again, from the LLM cache: nothing is paid twice.
    Rows of another judge or prompt version are refused, not mixed with this run's."""
    if not out.exists():
        return []
    text = out.read_text()
    lines = text.splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines) and not text.endswith("\n"):
                log.warning("annotate: %s:%d was cut short (a killed run); that document is judged again", out, n)
                continue
            raise InputError(f"{out}:{n}: not a JSON row ({e}); fix or delete the line") from e
    cut = getattr(judge, "max_chars", None)  # what an LLM judge was shown of each document

    def how(r) -> tuple:  # a row written before rows recorded the cut is taken to share this run's
        return r.get("judge"), r.get("prompt_version"), r.get("max_chars", cut)

    others = Counter(how(r) for r in rows if how(r) != (judge.name, judge.prompt_version, cut))
    if others:
        shown = (lambda c: f" shown {c:,} characters" if c else "")
        theirs = ", ".join(f"{n} by {j} with prompt {v}{shown(c)}" for (j, v, c), n in others.most_common())
        raise InputError(f"{out}: rows judged {theirs}; this run's judge is {judge.name} with prompt "
                         f"{judge.prompt_version}{shown(cut)}: one file would mix two judgements. Set stage.output "
                         "to another file, or move this one")
    relabelled = 0
    for r in rows:
        if r["label"] != (new := label(r["score"], threshold)):
            r["label"], relabelled = new, relabelled + 1
    if relabelled:
        log.info("annotate: %d rows of %s relabelled at stage.label_threshold=%d", relabelled, out, threshold)
    return rows


def run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    # Scores are 0-10 (the prompt asks for N/10): a threshold outside (0, 10] labels every document alike, and
    # the classifier has one class to learn.
    check([("stage.n", stage.n > 0, "must be > 0"),
           ("stage.label_threshold", 0 < stage.label_threshold <= 10, "must be in (0, 10]: scores are 0-10"),
           # 0 showed the judge an empty document, and the answers joined the file of the earlier runs
           ("stage.max_chars", stage.max_chars > 0, "must be > 0 (the characters of each document judged)")])
    with lock.stage_output(stage.output, "annotate"):
        return _run(cfg)


def _run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    out = Path(stage.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.llm.kind == "heuristic":
        judge = HeuristicJudge()
        llm = None
    else:
        llm = LLM.from_config(cfg.llm, cache_path=Path(cfg.paths.data_dir) / "llm_cache.sqlite",
                              quarantine_path=out.parent / "quarantine.jsonl")
        judge = LLMJudge(llm, stage.prompt_version, stage.max_chars)
    rows = written(out, judge, stage.label_threshold)
    done = {r["id"] for r in rows}
    docs = sample(stage.source, stage.n, stage.seed, cache=out.with_name(out.stem + ".sample.jsonl"))
    todo = [(i, t) for i, t in docs if i not in done]
    log.info("annotate: %d documents sampled from %s, %d already in %s, %d to judge",
             len(docs), stage.source.name, len(docs) - len(todo), out, len(todo))

    if llm is not None:
        estimate = llm.estimate([judge.messages(t) for _, t in todo], stage.expected_output_tokens,
                                stage.prompt_version)
        log.info("annotate: estimated %s", estimate)
        if stage.dry_run:
            return {"dry_run": estimate}

    judgements = judge.judge_many(todo)
    shown = {"max_chars": judge.max_chars} if getattr(judge, "max_chars", None) else {}
    rows += [{"id": doc_id, "label": label(j.score, stage.label_threshold), "score": j.score,
              "rationale": j.rationale, "judge": judge.name, "prompt_version": judge.prompt_version, **shown}
             for doc_id, _ in todo if (j := judgements.get(doc_id)) is not None]
    _write_jsonl(out, rows)
    summary = {
        "output": str(out), "annotated": len(rows), "sampled": len(docs), "new": len(judgements),
        "unanswered": len(todo) - len(judgements), "labels": dict(Counter(r["label"] for r in rows)),
        "scores": dict(sorted(Counter(r["score"] for r in rows).items())),
        "llm": llm.summary() if llm else None,
    }
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _examples(out.with_suffix(".examples.md"), rows, dict(docs), stage.label_threshold)
    log.info("annotate: %s", summary)
    return summary


# Documents shown per score in the examples file, each cut to its first lines (the judge saw max_chars of it).
EXAMPLES_PER_SCORE, EXAMPLE_LINES = 2, 30


def _examples(path: Path, rows: list[dict], texts: dict[str, str], threshold: int) -> None:
    """<output>.examples.md: for each score from 10 down to 0, the first documents (in the sample's order) the
    judge gave it, with its rationale: the judgement read against the code, as paper §2.1 shows it."""
    counts, by_score = Counter(r["score"] for r in rows), {}
    for r in rows:
        if r["id"] in texts:  # rows of an earlier, larger sample have no text here
            by_score.setdefault(r["score"], []).append(r)
    md = [f"# Educational value as judged: {path.name.removesuffix('.examples.md')}", "",
          f"{len(rows):,} documents judged; label \"high\" at a score of {threshold} or more. Up to "
          f"{EXAMPLES_PER_SCORE} documents per score, each its first {EXAMPLE_LINES} lines, with the judge's "
          "rationale.", ""]
    for score in sorted(by_score, reverse=True):
        md += [f"## Score {score} ({counts[score]:,} documents)", ""]
        for r in by_score[score][:EXAMPLES_PER_SCORE]:
            code = "\n".join(texts[r["id"]].splitlines()[:EXAMPLE_LINES])
            md += [f"### {r['id']}: {r['label']}", "", f"> {' '.join(str(r.get('rationale') or '').split())}", "",
                   *code_block(code), ""]
    path.write_text("\n".join(md))
