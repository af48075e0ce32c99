"""The filter stage (paper §2.1): the classifier scores every document of the corpus; those above a
threshold (or the top fraction) are kept, written as documents JSONL ({"id", "text", "source", "meta":
{"score"}}, DESIGN §5) that data configs read as a source (CodeTextbook's filtered half), with a histogram of
the scores. `shard=k num_shards=n` writes the documents of the source's k-th slice (phi1.data.sources' shards,
as embed's), for clusters (without `shard`, every shard here): each shard streams only its slice of the corpus
and writes its own file, and the files together are the source (`filtered/*.jsonl`). Each shard scores the
whole corpus, which a top fraction needs (~0.5 h on 2 cores for The Stack's ~35M files and 300 trees,
extrapolated from 65,536 rows; minutes on a node); streaming the corpus is what takes hours."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import joblib
import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from phi1 import environment
from phi1.config import ConfigError, check
from phi1.data import sources
from phi1.errors import InputError, MissingInputError
from phi1.quality import embed

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    if (stage.threshold is None) == (stage.top_fraction is None):
        raise ConfigError("set exactly one of stage.threshold and stage.top_fraction")
    # The forest's score is a probability (the share of trees voting "high"): a threshold outside [0, 1] keeps
    # every document or none.
    check([("stage.threshold", stage.threshold is None or 0 <= stage.threshold <= 1, "must be in [0, 1]"),
           ("stage.top_fraction", stage.top_fraction is None or 0 < stage.top_fraction <= 1, "must be in (0, 1]")])
    ids, embeddings = embed.load(stage.embeddings)
    classifier = Path(stage.classifier) / "classifier.joblib"
    if not classifier.is_file():
        raise MissingInputError(f"{classifier}: no classifier (run prepare.py stage=classify first)")
    forest = joblib.load(classifier)
    # Scores for the whole corpus are needed for a top fraction; they are small (8 bytes a document).
    scores = []
    with tqdm(total=len(embeddings), desc="filter: scoring", unit="doc", dynamic_ncols=True) as bar:
        for chunk in embeddings.chunks(65536):
            scores.append(forest.predict_proba(chunk)[:, 1])
            bar.update(len(chunk))
    scores = np.concatenate(scores)
    if stage.threshold is not None:
        keep, cut = scores >= stage.threshold, stage.threshold
    else:
        # Exactly the top fraction: a forest's probabilities are multiples of 1/trees, so a quantile cut
        # would keep every tie; rank instead, ties broken by corpus order.
        order = np.argsort(-scores, kind="stable")[: round(stage.top_fraction * len(scores))]
        keep = np.zeros(len(scores), dtype=bool)
        keep[order] = True
        cut = float(scores[order[-1]]) if len(order) else 1.0
    out = Path(stage.output)
    out.mkdir(parents=True, exist_ok=True)
    _histogram(scores, cut, keep.mean(), out / "scores.png")
    position = {doc_id: i for i, doc_id in enumerate(ids)}
    shards = [cfg.shard] if cfg.shard is not None else range(cfg.num_shards)
    summaries = [_write_shard(stage, k, cfg.num_shards, position, scores, keep, cut, out) for k in shards]
    return summaries[0] if len(summaries) == 1 else {"shards": summaries}


def _write_shard(stage, shard: int, num_shards: int, position: dict, scores, keep, cut: float, out: Path) -> dict:
    name = f"filtered-{shard:05d}-of-{num_shards:05d}.jsonl"
    kept = in_shard = 0
    with open(out / f"{name}.tmp", "w") as f:
        docs = sources.documents(stage.source, shard=shard, num_shards=num_shards)
        for doc_id, text in tqdm(docs, desc=f"filter: shard {shard} of {num_shards}", unit="doc", dynamic_ncols=True,
                                 total=len(position) if num_shards == 1 else None):
            i = position.get(doc_id)
            if i is None:
                raise InputError(f"{doc_id}: not in {stage.embeddings}; embed the same source first (a hub source "
                                 "streamed without id_field numbers its rows per shard: use embed's num_shards)")
            in_shard += 1
            if not keep[i]:
                continue
            f.write(json.dumps({"id": doc_id, "text": text, "source": stage.source.name,
                                "meta": {"score": round(float(scores[i]), 4)}}) + "\n")
            kept += 1
    (out / f"{name}.tmp").rename(out / name)  # complete or absent: a killed shard is simply redone
    summary = {"documents": in_shard, "kept": kept, "kept_share": kept / max(in_shard, 1), "cut": cut,
               "output": str(out / name), "environment": environment.current()}
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
    ax.set_title("Classifier scores over the corpus")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
