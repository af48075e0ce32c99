"""The decontaminate stage (paper §5): how close is a training set to a benchmark, and what is left after
pruning what is close.

For every training item (streamed from any source: our exercises JSONL, the stdlib functions, a hub set) and
every benchmark problem (prompt + canonical solution):
  - docstring 13-gram overlap (§5.1): every shared 13-gram is a match, written out for inspection;
  - AST match rate τ (§5.2): exact edit distance (phi1.contamination.measures) for candidate pairs only. The
    candidates come from MinHash LSH over 3-gram shingles of the normalized AST labels (datasketch, Jaccard
    ≥ `lsh_threshold`): 880K exercises × 164 problems = 144M pairs, of which a few thousand are candidates;
    items that are no candidate of any problem count as τ = 0 (pairs with τ ≥ 0.8 share most shingles, and
    the benchmark script checks the recall of this pruning against the exhaustive τ on a sample);
  - embedding L2 distance (§5.2), optional (`embed.enabled`): nearest neighbours among all training items.
Work is spread over `workers` processes (τ and signatures), the embeddings on the encoder's threads.

Outputs in `stage.output/`:
  neighbours.jsonl       per problem: its nearest items under each measure (ids, τ, distance, shared n-grams)
  report.md              the same, readable, with the code side by side for the closest pairs
  pruned-tau<τ>.jsonl    the training set without the items whose best τ ≥ τ (documents: {"id", "text"})
  similar-tau<τ>.txt / nonsimilar-tau<τ>.txt   benchmark task ids with / without such an item
                         (evaluate.py benchmark.<name>.task_ids=<file> scores a subset)
  similarity.png         how close the set is, τ by τ: the problems with an item at τ or above and the share of
                         items pruned there, the paper's points beside (and each problem's nearest embedding)
  table3.md + summary.json   paper Table 3's layout: counts per τ, pass@1 per subset for the evaluation runs
                         named in `stage.samples`, the paper's numbers beside
  scores.json            the scoring pass's result, reused by a rerun while the problems, the training set and
                         the measures' settings are the same (new `samples` or `taus` cost seconds)
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from phi1 import lock
from phi1.config import check
from phi1.contamination import measures
from phi1.data import sources
from phi1.errors import InputError, MissingInputError
from phi1.eval import benchmarks
from phi1.markdown import code_block

log = logging.getLogger(__name__)

CHUNK = 2000  # training items per task of a worker process
# Paper Table 3 (DESIGN §3): τ -> (similar count, phi-1, retrained on pruned, StarCoder-Prompted) on similar
# problems; (non-similar count, same three) on the rest; retrained total. And removed of 879.5K (§5.2).
PAPER_TABLE3 = {
    0.95: ((71, 81.7, 74.6, 57.7), (93, 26.9, 32.3, 29.0), 50.6, 42_500),
    0.90: ((93, 63.4, 51.6, 48.4), (71, 33.8, 36.6, 32.4), 45.1, None),
    0.85: ((106, 62.3, 52.8, 47.2), (58, 29.3, 34.5, 31.0), 46.3, None),
    0.80: ((116, 59.5, 52.6, 45.7), (48, 29.2, 27.1, 31.2), 45.1, 354_000),
}

# ------------------------------------------------------------------------------------------- worker side

_W: dict = {}


def _init_worker(problem_labels: list, problem_grams: list, cfg: dict) -> None:
    from datasketch import MinHashLSH

    from phi1.data.dedup import Signer

    signer = Signer(OmegaConf.create({"num_perm": cfg["num_perm"], "ngram": 3}))
    lsh = MinHashLSH(threshold=cfg["lsh_threshold"], num_perm=cfg["num_perm"])
    for j, labels in enumerate(problem_labels):
        if labels:
            lsh.insert(j, _minhash(signer, labels), check_duplication=False)
    grams: dict[int, list[int]] = {}  # docstring 13-gram -> the problems whose docstring has it
    for j, problem in enumerate(problem_grams):
        for gram in problem:
            grams.setdefault(gram, []).append(j)
    _W.update(signer=signer, lsh=lsh, labels=problem_labels, grams=grams, cfg=cfg)


def _minhash(signer, labels):
    from datasketch import MinHash

    signature = signer.signature(measures.shingle_ids(labels))
    # the signer's permutations: drawing them again for every item took 1/6 of the study
    # (bench/decontaminate_scale.py, 20K items: 2,708 -> 3,280 items/s)
    return MinHash(num_perm=len(signature), hashvalues=signature.astype(np.uint64),
                   permutations=signer.permutations, scheme="affine32")


def _score_chunk(texts: list[str]) -> list[tuple[list[tuple[int, float]], list[tuple[int, int]]]]:
    """Per item: [(problem, τ)] for its LSH candidates, [(problem, shared docstring n-grams)]."""
    out = []
    n = _W["cfg"]["ngram"]
    for text in texts:
        labels = measures.ast_labels(text)
        taus = []
        if labels:
            for j in _W["lsh"].query(_minhash(_W["signer"], labels)):
                taus.append((j, measures.match_rate(labels, _W["labels"][j])))
        shared = Counter(j for gram in measures.ngrams(measures.docstring_words(text), n)
                         for j in _W["grams"].get(gram, ()))
        out.append((taus, sorted(shared.items())))
    return out


# --------------------------------------------------------------------------------------------- the stage


def _problem_code(p: benchmarks.Problem) -> str:
    return p.prompt + p.canonical_solution


def _scores_key(stage, problems) -> str:
    """What pass 1's scores depend on: the problems, the training set's content, the measures' settings. Not
    `taus` or `samples` (applied afterwards), nor `workers`, `device` or batch sizes."""
    spec = {
        "problems": [(p.task_id, p.prompt, p.canonical_solution) for p in problems],
        "train": sources.fingerprint(stage.train),
        "measures": [stage.ngram, stage.num_perm, stage.lsh_threshold, stage.neighbours],
        "embed": [stage.embed.model, stage.embed.max_tokens] if stage.embed.enabled else None,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _scores(stage, problems, path: Path) -> dict:
    """Pass 1, every training item against every problem, or its saved result when nothing it depends on has
    changed: rerunning the stage to add an evaluation run to Table 3 (`stage.samples`) or other τ thresholds
    then takes seconds, not the ~7 CPU minutes (and the GPU embeddings) of the paper's 879.5K exercises."""
    key = _scores_key(stage, problems)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            log.info("decontaminate: reusing the scores in %s (same problems, training set and measures; delete "
                     "it to score again)", path)
            return {**_from_json(saved), "reused": True}
    scores = _score(stage, problems)
    tmp = path.with_name(path.name + ".tmp")
    keep_text = {str(i): v for i, v in scores["keep_text"].items()}  # JSON keys are strings
    tmp.write_text(json.dumps({"key": key, **scores, "keep_text": keep_text}))
    tmp.rename(path)
    return scores


def _from_json(saved: dict) -> dict:
    pairs = lambda rows: [[tuple(x) for x in row] for row in rows]  # noqa: E731
    return {**saved, "top_tau": pairs(saved["top_tau"]), "ngram_matches": pairs(saved["ngram_matches"]),
            "nearest_l2": None if saved["nearest_l2"] is None else pairs(saved["nearest_l2"]),
            "keep_text": {int(i): tuple(v) for i, v in saved["keep_text"].items()}}


def _score(stage, problems) -> dict:
    problem_labels = [measures.ast_labels(_problem_code(p)) or [] for p in problems]
    problem_grams = [measures.ngrams(measures.docstring_words(p.prompt), stage.ngram) for p in problems]
    k = stage.neighbours
    t0 = time.perf_counter()
    best_tau: list[float] = []
    top_tau = [[] for _ in problems]  # heaps of (τ, item index)
    ngram_matches = [[] for _ in problems]
    keep_text: dict[int, tuple[str, str]] = {}
    docs = sources.documents(stage.train)
    worker_cfg = {"num_perm": stage.num_perm, "lsh_threshold": stage.lsh_threshold, "ngram": stage.ngram}
    workers = stage.workers or os.cpu_count() or 1
    embedder = _Embedder(stage.embed, problems) if stage.embed.enabled else None
    # Its embeddings lie in a temporary folder, removed whatever stops the scoring (a malformed line an hour in,
    # Ctrl-C): CodeExercises' 879.5K items × 1024 float16 values from CodeGen-350M (the paper's) are 1.8 GB.
    try:
        from tqdm.auto import tqdm

        bar = tqdm(desc="decontaminate", unit=" items", dynamic_ncols=True)
        with ProcessPoolExecutor(workers, initializer=_init_worker,
                                 initargs=(problem_labels, problem_grams, worker_cfg)) as pool:
            while chunks := [c for c in (list(islice(docs, CHUNK)) for _ in range(workers * 2)) if c]:
                results = pool.map(_score_chunk, [[text for _, text in c] for c in chunks])
                for chunk, scored in zip(chunks, results):
                    if embedder:
                        embedder.add([text for _, text in chunk], len(best_tau))
                    for (doc_id, text), (pairs, shared) in zip(chunk, scored):
                        i = len(best_tau)
                        best_tau.append(max((t for _, t in pairs), default=0.0))
                        for j, tau in pairs:
                            heapq.heappush(top_tau[j], (tau, i))
                            if len(top_tau[j]) > k:
                                heapq.heappop(top_tau[j])
                        for j, count in shared:
                            ngram_matches[j].append((i, count))
                        if pairs or shared:
                            keep_text[i] = (doc_id, text)
                    bar.update(len(chunk))
        bar.close()
        if not best_tau:
            raise sources.SourceError(f"stage.train ({stage.train.name}) yielded no items")
        nearest_l2 = embedder.nearest(k) if embedder else None
        if embedder:
            for j, pairs in enumerate(nearest_l2):
                for i, _ in pairs:
                    keep_text.setdefault(i, None)
            _fill_texts(stage.train, keep_text)
    finally:
        if embedder:
            shutil.rmtree(embedder.dir, ignore_errors=True)
    return {"best": best_tau, "top_tau": top_tau, "ngram_matches": ngram_matches, "keep_text": keep_text,
            "nearest_l2": nearest_l2, "elapsed_s": time.perf_counter() - t0, "workers": workers}


def run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    # τ is a match rate (1 - distance / length, §5.2): a threshold outside (0, 1] prunes everything or nothing.
    check([("stage.taus", len(stage.taus) > 0 and all(0 < t <= 1 for t in stage.taus),
            "must list thresholds in (0, 1] (the paper's: 0.95, 0.9, 0.85, 0.8)"),
           # Each of these ran the whole scoring (~1 min for the stdlib's 1,902 functions) to a meaningless table:
           # ngram=0 matched every pair.
           ("stage.ngram", stage.ngram >= 1, "must be >= 1 (tokens per n-gram; the paper's: 13)"),
           ("stage.neighbours", stage.neighbours >= 1, "must be >= 1 (nearest items kept per problem)"),
           ("stage.num_perm", stage.num_perm >= 16, "must be >= 16 (MinHash permutations)"),
           ("stage.lsh_threshold", 0 < stage.lsh_threshold <= 1, "must be in (0, 1]"),
           ("stage.workers", stage.workers is None or stage.workers > 0, "must be > 0 (null: one per core)"),
           ("stage.embed.batch_size", stage.embed.batch_size > 0, "must be > 0"),
           ("stage.embed.max_tokens", stage.embed.max_tokens > 0, "must be > 0"),
           ("stage.embed.threshold", 0 <= stage.embed.threshold <= 2,
            "must be in [0, 2] (L2 distance between unit vectors)"),
           ("stage.report_pairs", stage.report_pairs >= 0, "must be >= 0")])
    out = Path(stage.output)
    out.mkdir(parents=True, exist_ok=True)
    with lock.stage_output(out, "decontaminate"):  # one process per output: its files are rewritten whole
        return _run(stage, out)


def _run(stage, out: Path) -> dict:
    problems = benchmarks.load(stage.benchmark)
    runs = {name: pass_rates(path, problems, f"stage.samples.{name}") for name, path in (stage.samples or {}).items()}
    taus = sorted(stage.taus, reverse=True)
    scores = _scores(stage, problems, out / "scores.json")
    best, top_tau, ngram_matches = np.asarray(scores["best"]), scores["top_tau"], scores["ngram_matches"]
    keep_text, nearest_l2, elapsed = scores["keep_text"], scores["nearest_l2"], scores["elapsed_s"]

    # Per problem: its nearest training items under each measure.
    rows = []
    for j, p in enumerate(problems):
        row = {
            "task_id": p.task_id,
            "ast": [{"id": keep_text[i][0], "tau": round(t, 4)} for t, i in sorted(top_tau[j], reverse=True)],
            "ngram13": [{"id": keep_text[i][0], "shared": c} for i, c in sorted(ngram_matches[j], key=lambda x: -x[1])],
        }
        if nearest_l2 is not None:
            row["embedding"] = [{"id": keep_text[i][0], "l2": round(d, 4)} for i, d in nearest_l2[j]]
        rows.append(row)
    with open(out / "neighbours.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    # Pruning and the similar / non-similar split, per τ.
    per_tau = {}
    similar_by_tau = {}
    for tau in taus:
        similar = [p.task_id for j, p in enumerate(problems) if top_tau[j] and max(top_tau[j])[0] >= tau]
        similar_by_tau[tau] = set(similar)
        (out / f"similar-tau{tau:.2f}.txt").write_text("".join(t + "\n" for t in similar))
        (out / f"nonsimilar-tau{tau:.2f}.txt").write_text(
            "".join(p.task_id + "\n" for p in problems if p.task_id not in similar_by_tau[tau]))
        per_tau[tau] = {"removed": int((best >= tau).sum()), "kept": int((best < tau).sum()),
                        "similar": len(similar), "nonsimilar": len(problems) - len(similar)}
    _write_pruned(stage.train, best, taus, out)

    summary = {
        "benchmark": stage.benchmark.name, "problems": len(problems), "train": stage.train.name,
        "train_items": len(best), "elapsed_s": round(elapsed, 1), "workers": scores["workers"],
        "items_per_s": round(len(best) / max(elapsed, 1e-9), 1),
        "ngram13_problems_with_matches": sum(1 for m in ngram_matches if m),
        "embedding_near_problems": None if nearest_l2 is None else sum(
            1 for pairs in nearest_l2 if pairs and pairs[0][1] < stage.embed.threshold),
        "per_tau": {f"{t:.2f}": v for t, v in per_tau.items()},
    }
    summary["table3"] = _table3(out, taus, per_tau, similar_by_tau, problems, stage, len(best), runs)
    problem_best = [max(h)[0] if h else 0.0 for h in top_tau]
    _plot(out / "similarity.png", similarity_curves(problem_best, best, min(0.7, *taus)), taus, stage, len(best),
          None if nearest_l2 is None else [pairs[0][1] for pairs in nearest_l2 if pairs])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _report(out / "report.md", problems, rows, keep_text, top_tau, stage, summary)
    log.info("decontaminate: %d items × %d problems %s in %.1f s (%.0f items/s); per τ %s", len(best),
             len(problems), "scored earlier" if scores.get("reused") else "scored", elapsed, summary["items_per_s"],
             summary["per_tau"])
    return summary


def _fill_texts(source, keep_text: dict) -> None:
    """Second pass for the items that only the embedding found (their text was not kept on the way)."""
    wanted = {i for i, v in keep_text.items() if v is None}
    if not wanted:
        return
    for i, (doc_id, text) in enumerate(sources.documents(source)):
        if i in wanted:
            keep_text[i] = (doc_id, text)


def _write_pruned(source, best: np.ndarray, taus: list[float], out: Path) -> None:
    files = {tau: open(out / f".pruned-tau{tau:.2f}.jsonl.tmp", "w") for tau in taus}
    try:
        for i, (doc_id, text) in enumerate(sources.documents(source)):
            line = json.dumps({"id": doc_id, "text": text}) + "\n"
            for tau, f in files.items():
                if best[i] < tau:
                    f.write(line)
    finally:
        for f in files.values():
            f.close()
    for tau in taus:
        (out / f".pruned-tau{tau:.2f}.jsonl.tmp").rename(out / f"pruned-tau{tau:.2f}.jsonl")


def pass_rates(samples_path: str, problems: list | None = None, key: str = "samples") -> dict[str, float]:
    """task_id -> fraction of samples passed, from an evaluation run's samples.jsonl (of `problems` when given:
    a task of another benchmark is refused). The stage reads them before its scoring (hours at the paper's
    scale), so that a wrong path or file stops it at once."""
    path = Path(samples_path).expanduser()
    known = {p.task_id for p in problems} if problems is not None else None
    if not path.is_file():
        raise MissingInputError(f"{key}={samples_path}: no such file (an evaluation run's <benchmark>/samples.jsonl)")
    totals: dict[str, list[int]] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                task_id, passed = row["task_id"], row["passed"]
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{path}:{line_no}: expected a JSON object with task_id and passed "
                                 f"({type(e).__name__}: {e})") from None
            # e.g. an MBPP run's samples: every HumanEval cell would read 0
            if known is not None and task_id not in known:
                raise InputError(f"{path}:{line_no}: task_id {task_id!r} is not a problem of the benchmark compared "
                                 f"({next(iter(known))}, ...): {key} takes samples of that benchmark")
            totals.setdefault(task_id, []).append(bool(passed))
    if not totals:
        raise InputError(f"{path}: no samples (an empty file)")
    if known is not None and (missing := len(known - totals.keys())):
        log.warning("%s: %d of %d problems have no sample; they count as failed in table3.md", path, missing,
                    len(known))
    return {t: sum(v) / len(v) for t, v in totals.items()}


def _paper(stage) -> bool:
    """Whether the paper's numbers belong beside ours: they are HumanEval's (Table 3 compares nothing else), and
    an MBPP table headed "HumanEval" showed HumanEval's 71 similar problems as the count to compare with."""
    return stage.benchmark.kind == "humaneval"


def _table3(out: Path, taus, per_tau, similar_by_tau, problems, stage, n_train: int, runs: dict) -> dict:
    table = {}
    lines = [f"# Contamination: {stage.benchmark.name} pass@1 on similar / non-similar problems (paper Table 3 "
             "layout)", "", f"Training set: {stage.train.name} ({n_train:,} items); benchmark: {stage.benchmark.name}."
             + (" Paper: phi-1 / phi-1 retrained on the pruned set / StarCoder-Prompted; CodeExercises 879.5K."
                if _paper(stage) else " The paper's Table 3 is HumanEval's: no numbers of its beside these."), ""]
    header = "| τ | problems | count (paper) | " + " | ".join(f"{n} pass@1" for n in runs) + \
        (" | " if runs else "") + "paper: phi-1 / retrained / StarCoder | removed (paper) |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for tau in taus:
        paper = PAPER_TABLE3.get(round(tau, 2)) if _paper(stage) else None
        ours = per_tau[tau]
        table[f"{tau:.2f}"] = {}
        for part, ids in (("similar", similar_by_tau[tau]),
                          ("nonsimilar", {p.task_id for p in problems} - similar_by_tau[tau])):
            rates = {n: (round(100 * sum(r.get(t, 0.0) for t in ids) / len(ids), 1) if ids else None)
                     for n, r in runs.items()}
            table[f"{tau:.2f}"][part] = {"count": len(ids), **rates}
            p = paper[0 if part == "similar" else 1] if paper else None
            cells = [f"{tau:.2f}", part, f"{len(ids)} ({p[0] if p else '–'})",
                     *[("–" if v is None else f"{v:.1f}") for v in rates.values()],
                     f"{p[1]} / {p[2]} / {p[3]}" if p else "–",
                     f"{ours['removed']:,} ({paper[3]:,})" if part == "similar" and paper and paper[3]
                     else (f"{ours['removed']:,}" if part == "similar" else "")]
            lines.append("| " + " | ".join(cells) + " |")
    (out / "table3.md").write_text("\n".join(lines) + "\n")
    return table


def similarity_curves(problem_best: list[float], item_best, low: float = 0.7, step: float = 0.005) -> dict:
    """For τ from `low` (0.7, or a lower stage.taus) to 1 (the paper reports 0.8-0.95): how many problems have
    a training item with an AST match rate ≥ τ (Table 3's similar count), and what share of the items has one
    with a problem (the share pruned at τ). A pair that was no LSH candidate counts as τ = 0, so both are lower
    bounds, close ones where the candidates' recall was measured (98.4% of the pairs at τ ≥ 0.8, BENCHMARKS.md)."""
    taus = np.round(np.arange(low, 1 + step / 2, step), 4)
    problem_best, item_best = np.sort(np.asarray(problem_best)), np.sort(np.asarray(item_best))
    at_least = lambda values: len(values) - np.searchsorted(values, taus, side="left")  # noqa: E731
    return {"tau": taus.tolist(), "similar": at_least(problem_best).tolist(),
            "removed_share": (100 * at_least(item_best) / max(len(item_best), 1)).tolist()}


def _plot(path: Path, curves: dict, taus: list[float], stage, n_train: int, nearest_l2: list[float] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if nearest_l2 else 2, figsize=(15 if nearest_l2 else 10, 4.5))
    paper = sorted(PAPER_TABLE3.items())
    panels = [("similar", f"{stage.benchmark.name} problems with an item at τ or above",
               [(t, v[0][0]) for t, v in paper] if _paper(stage) else [], "paper: of HumanEval's 164"),
              ("removed_share", f"{stage.train.name} items pruned at τ (% of {n_train:,})",
               [(t, 100 * v[3] / 879_500) for t, v in paper if v[3]], "paper: of CodeExercises' 879.5K")]
    for ax, (key, title, points, label) in zip(axes, panels):
        ax.step(curves["tau"], curves[key], where="post", color="#2e7d32", label="ours")
        if points:
            ax.scatter(*zip(*points), color="#f28e2b", zorder=3, label=label)
        for tau in taus:
            ax.axvline(tau, color="grey", ls=":", lw=1)
        ax.set(title=title, xlabel="AST match rate τ (§5.2)", xlim=(curves["tau"][0], 1.0))
        ax.legend(fontsize=8)
    if nearest_l2:
        ax = axes[2]
        ax.hist(nearest_l2, bins=40, color="#8cd17d")
        ax.axvline(stage.embed.threshold, color="grey", ls=":", lw=1)
        ax.set(title="each problem's nearest item by embedding", xlabel="L2 distance of unit embeddings (§5.2)",
               ylabel="problems")
    fig.suptitle(f"Contamination: {stage.benchmark.name} vs {stage.train.name} (paper §5); dotted: stage.taus"
                 + (", embed.threshold" if nearest_l2 else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(path: Path, problems, rows, keep_text, top_tau, stage, summary) -> None:
    lines = [f"# Decontamination: {stage.benchmark.name} vs {stage.train.name}", "",
             f"{summary['train_items']:,} training items × {len(problems)} problems in {summary['elapsed_s']} s "
             f"({summary['workers']} workers). Problems with a shared docstring 13-gram: "
             f"{summary['ngram13_problems_with_matches']}.", "",
             "| τ | items removed | similar problems |", "|---|---|---|"]
    lines += [f"| {t} | {v['removed']:,} | {v['similar']} |" for t, v in summary["per_tau"].items()]
    lines.append("")
    closest = sorted(((max(h)[0], j) for j, h in enumerate(top_tau) if h), reverse=True)[: stage.report_pairs]
    for tau, j in closest:
        i = max(top_tau[j])[1]
        lines += [f"## {problems[j].task_id}: τ = {tau:.3f} with {keep_text[i][0]}", "",
                  *code_block(_problem_code(problems[j]).rstrip()), "", *code_block(keep_text[i][1].rstrip()), ""]
        if rows[j]["ngram13"]:
            lines += [f"Shared docstring 13-grams: {rows[j]['ngram13'][:3]}", ""]
    path.write_text("\n".join(lines) + "\n")


class _Embedder:
    """Embeddings of the training items (memory-mapped float16) and of the problems; nearest by L2."""

    def __init__(self, cfg, problems):
        import torch

        from phi1.quality.embed import embed_texts, load_encoder

        self.cfg = cfg
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_encoder(cfg.model, device, cfg.max_tokens, "stage.embed.max_tokens")
        self._embed = embed_texts
        self.problems = self._batch([_problem_code(p) for p in problems])
        self.dir = tempfile.mkdtemp(prefix="phi1-embed-")
        self.parts: list[np.ndarray] = []

    def _batch(self, texts: list[str]) -> np.ndarray:
        rows = self._embed(self.model, self.tokenizer, texts, self.cfg.max_tokens, self.cfg.batch_size)
        return rows.astype(np.float16)

    def add(self, texts: list[str], start: int) -> None:
        path = Path(self.dir) / f"{start:012d}.npy"
        np.save(path, self._batch(texts))
        self.parts.append(np.load(path, mmap_mode="r"))

    def nearest(self, k: int) -> list[list[tuple[int, float]]]:
        """Per problem, the k training items nearest in L2 (unit vectors: d² = 2 - 2 cos)."""
        best = [[] for _ in range(len(self.problems))]
        offset = 0
        for part in self.parts:
            cos = np.asarray(part, dtype=np.float32) @ self.problems.astype(np.float32).T  # [items, problems]
            d = np.sqrt(np.clip(2 - 2 * cos, 0, None))
            for j in range(d.shape[1]):
                idx = np.argsort(d[:, j])[:k]
                best[j] = sorted(best[j] + [(offset + int(i), float(d[i, j])) for i in idx], key=lambda x: x[1])[:k]
            offset += len(part)
        return best
