"""The filter stage (paper §2.1): the classifier scores every document of the corpus; those above a
threshold (or the top fraction) are kept, written as documents JSONL ({"id", "text", "source", "meta":
{"score"}}, DESIGN §5) that data configs read as a source (CodeTextbook's filtered half), with a histogram of
the scores and, beside each file, excerpts of what it kept and dropped (`<file>.examples.md`).
`shard=k num_shards=n` writes the documents of the source's k-th slice (phi1.data.sources' shards, as embed's),
for clusters (without `shard`, every shard here): each shard streams only its slice of the corpus and writes its
own file, and the files together are the source (`filtered/filtered-<source name>-*.jsonl`).

When embed ran with the same num_shards (the cluster's case), slice k's embeddings are shard k's folder, in
the order the slice streams: a shard job reads that folder's ids alone and, with a threshold, scores its rows
alone. Otherwise each job maps every id of the corpus to its row (The Stack's ~35M: gigabytes of strings per
job) and scores every row, as a top fraction always needs (~0.5 h on 2 cores for ~35M files and 300 trees,
extrapolated from 65,536 rows; minutes on a node); streaming the corpus is what takes hours."""

from __future__ import annotations

import heapq
import json
import logging
from collections.abc import Callable
from pathlib import Path

import joblib
import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from phi1 import environment, lock
from phi1.config import ConfigError, check
from phi1.data import sources
from phi1.errors import InputError, MissingInputError
from phi1.markdown import code_block
from phi1.quality import embed

log = logging.getLogger(__name__)

# Documents shown per group in a shard's examples file (the highest scores, either side of the cut, the lowest),
# each cut to its first lines: what the classifier keeps and drops, read the way paper §2.1 shows it.
EXAMPLES = 5
EXAMPLE_LINES, EXAMPLE_CHARS = 40, 4000


def run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    if (stage.threshold is None) == (stage.top_fraction is None):
        raise ConfigError("set exactly one of stage.threshold and stage.top_fraction")
    # The forest's score is a probability (the share of trees voting "high"): a threshold outside [0, 1] keeps
    # every document or none.
    check([("stage.threshold", stage.threshold is None or 0 <= stage.threshold <= 1, "must be in [0, 1]"),
           ("stage.top_fraction", stage.top_fraction is None or 0 < stage.top_fraction <= 1, "must be in (0, 1]")])
    parts = embed.parts(stage.embeddings)
    classifier = Path(stage.classifier) / "classifier.joblib"
    if not classifier.is_file():
        raise MissingInputError(f"{classifier}: no classifier (run prepare.py stage=classify first)")
    forest = joblib.load(classifier)
    out = Path(stage.output)
    out.mkdir(parents=True, exist_ok=True)
    shards = [cfg.shard] if cfg.shard is not None else list(range(cfg.num_shards))
    if len(parts) != cfg.num_shards:  # rows and slices do not line up: find each document's row by its id
        ids, embeddings = embed.load(stage.embeddings)
        scores, keep, cut = _score(stage, forest, embeddings, out / f"scores-{stage.source.name}.png")
        position = {doc_id: i for i, doc_id in enumerate(ids)}
        summaries = [_write_shard(stage, k, cfg.num_shards, position.get, scores, keep, cut, out) for k in shards]
    else:
        # Slice k is part k, row by row. Every part is scored for a top fraction (a rank over the corpus) or
        # when every shard is written here; a threshold job of one shard scores its own part.
        whole = stage.top_fraction is not None or cfg.shard is None
        scored = range(len(parts)) if whole else shards
        read = {k: embed.read_part(parts[k], with_ids=k in shards) for k in scored}
        sizes = [len(read[k][1]) if read[k][1] is not None else 0 for k in scored]
        if whole and not any(sizes):
            raise InputError(f"{stage.embeddings}: no documents were embedded (the source yielded none)")
        figure = out / (f"scores-{stage.source.name}.png" if whole
                        else f"scores-{stage.source.name}-{cfg.shard:05d}-of-{cfg.num_shards:05d}.png")
        scores, keep, cut = _score(stage, forest, embed.Embeddings([a for _, a in read.values() if a is not None]),
                                   figure)
        offsets = dict(zip(scored, np.cumsum([0, *sizes]).tolist()))
        summaries = [_write_shard(stage, k, cfg.num_shards, _in_order(read[k][0], offsets[k]), scores, keep, cut,
                                  out) for k in shards]
    return summaries[0] if len(summaries) == 1 else {"shards": summaries}


def _score(stage, forest, embeddings: embed.Embeddings, figure: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(scores, keep, cut) over the rows given; the histogram of the scores into `figure`."""
    dim = embeddings.arrays[0].shape[1] if embeddings.arrays else forest.n_features_in_
    if dim != forest.n_features_in_:  # e.g. codegen-350M's 1024 against a forest of MiniLM's 384: sklearn's error
        raise InputError(f"{stage.embeddings}: {dim}-dimensional embeddings, and the classifier in {stage.classifier}"
                         f" was trained on {forest.n_features_in_}-dimensional ones (another embedding model): embed "
                         "with the classifier's model, or run stage=classify on these embeddings")
    scores = []  # 8 bytes a document: all of them fit
    with tqdm(total=len(embeddings), desc="filter: scoring", unit="doc", dynamic_ncols=True) as bar:
        for chunk in embeddings.chunks(65536):
            scores.append(forest.predict_proba(chunk)[:, 1])
            bar.update(len(chunk))
    scores = np.concatenate(scores) if scores else np.zeros(0)  # a slice without documents: nothing to keep
    if stage.threshold is not None:
        keep, cut = scores >= stage.threshold, stage.threshold
    else:
        # Exactly the top fraction: a forest's probabilities are multiples of 1/trees, so a quantile cut
        # would keep every tie; rank instead, ties broken by corpus order.
        order = np.argsort(-scores, kind="stable")[: round(stage.top_fraction * len(scores))]
        keep = np.zeros(len(scores), dtype=bool)
        keep[order] = True
        cut = float(scores[order[-1]]) if len(order) else 1.0
    if len(scores):
        _histogram(scores, cut, keep.mean(), figure)
    return scores, keep, cut


def _in_order(ids: list[str], offset: int) -> Callable[[str], int | None]:
    """Row of each document of a slice streamed in the order its part was embedded, from `offset` on. A source
    filtered more than embed's (a `where`, say) skips rows; a document not found in what follows is None."""
    rows = iter(enumerate(ids))

    def locate(doc_id: str) -> int | None:
        for i, embedded in rows:
            if embedded == doc_id:
                return offset + i
        return None
    return locate


def _write_shard(stage, shard: int, num_shards: int, locate, scores, keep, cut: float, out: Path) -> dict:
    # Named after the corpus: filtering another one into the same folder (the paper's StackOverflow after The
    # Stack) adds its files beside the first one's instead of writing over those of the same shard numbers.
    name = f"filtered-{stage.source.name}-{shard:05d}-of-{num_shards:05d}.jsonl"
    # One process per shard: two would write one temporary file at once, each over the other's lines.
    with lock.stage_output(out / name, "filter"):
        return _write_shard_unlocked(stage, shard, num_shards, locate, scores, keep, cut, out, name)


def _write_shard_unlocked(stage, shard: int, num_shards: int, locate, scores, keep, cut: float, out: Path,
                          name: str) -> dict:
    kept = in_shard = 0
    shown = _Examples()
    with open(out / f"{name}.tmp", "w") as f:
        docs = sources.documents(stage.source, shard=shard, num_shards=num_shards)
        for doc_id, text in tqdm(docs, desc=f"filter: shard {shard} of {num_shards}", unit="doc", dynamic_ncols=True,
                                 total=len(scores) if num_shards == 1 else None):
            i = locate(doc_id)
            if i is None:
                raise InputError(f"{doc_id}: not in {stage.embeddings} (or not in the order embed read the source); "
                                 "embed the same source first (a hub source streamed without id_field numbers its "
                                 "rows per shard: use embed's num_shards)")
            in_shard += 1
            shown.add(float(scores[i]), bool(keep[i]), in_shard, doc_id, text)
            if not keep[i]:
                continue
            f.write(json.dumps({"id": doc_id, "text": text, "source": stage.source.name,
                                "meta": {"score": round(float(scores[i]), 4)}}) + "\n")
            kept += 1
    (out / f"{name}.tmp").rename(out / name)  # complete or absent: a killed shard is simply redone
    shown.write(out / f"{name}.examples.md", f"{stage.source.name}, shard {shard} of {num_shards}: kept {kept:,} of "
                f"{in_shard:,} documents scoring >= {cut:.3f}")
    summary = {"documents": in_shard, "kept": kept, "kept_share": kept / max(in_shard, 1), "cut": cut,
               "scored": len(scores), "output": str(out / name), "environment": environment.current()}
    (out / f"{name}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("filter: kept %d of %d documents (%.1f%%) scoring >= %.3f -> %s", kept, in_shard,
             100 * summary["kept_share"], cut, summary["output"])
    return summary


def _histogram(scores: np.ndarray, cut: float, kept: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(scores, bins=50, color="#4c72b0")
    ax.axvline(cut, color="#c44e52", ls="--", label=f"cut {cut:.2f}: {kept:.0%} kept")
    ax.set_xlabel("P(high educational value)")
    ax.set_ylabel("documents")
    # Named as the file is (scores-<source>[-<k>-of-<n>].png): two corpora's plots side by side say which is which.
    ax.set_title(f"Classifier scores: {path.stem.removeprefix('scores-')} ({len(scores):,} documents)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _Examples:
    """The documents of a shard with the highest and lowest scores, and those either side of the cut, kept as the
    shard streams (a few dozen excerpts, whatever the corpus's size), ties broken by corpus order."""

    def __init__(self):
        # group -> a heap of (key, -order, score, id, excerpt); sorted by key, largest first, when written
        self.groups = {"highest scores (kept)": [], "just above the cut (kept)": [],
                       "just below the cut (dropped)": [], "lowest scores (dropped)": []}

    def add(self, score: float, kept: bool, order: int, doc_id: str, text: str) -> None:
        # Each group keeps the EXAMPLES largest by its key, the smallest of them at its heap's root.
        keys = ((("highest scores (kept)", score), ("just above the cut (kept)", -score)) if kept else
                (("just below the cut (dropped)", score), ("lowest scores (dropped)", -score)))
        excerpt = None  # cut once, for the first group that takes the document
        for group, key in keys:
            heap = self.groups[group]
            if len(heap) < EXAMPLES or (key, -order) > heap[0][:2]:  # ties: the earlier document
                excerpt = excerpt or "\n".join(text.splitlines()[:EXAMPLE_LINES])[:EXAMPLE_CHARS]
                item = (key, -order, score, doc_id, excerpt)
                (heapq.heappush if len(heap) < EXAMPLES else heapq.heapreplace)(heap, item)

    def write(self, path: Path, headline: str) -> None:
        md = [f"# What the filter kept and dropped: {headline}", "",
              "The score is the classifier's probability of \"high educational value\" (paper §2.1; the forest's: "
              f"the share of its trees voting so). Up to {EXAMPLES} documents per group, each its first "
              f"{EXAMPLE_LINES} lines.", ""]
        for group, heap in self.groups.items():
            if not heap:
                continue
            md += [f"## {group[0].upper()}{group[1:]}", ""]
            for *_, score, doc_id, excerpt in sorted(heap, reverse=True):
                md += [f"### {doc_id}: {score:.3f}", "", *code_block(excerpt), ""]
        path.write_text("\n".join(md))
