"""The classify stage (paper §2.1): a scikit-learn random forest that predicts the judge's label (high/low
educational value) from a document's embedding, so that the judge's ~100K annotations label the rest of the
corpus; `stage.estimator` swaps in any other scikit-learn classifier, to compare. A stratified, seeded held-out
split measures it: precision, recall, F1 and ROC-AUC of the "high" class in `metrics.json`, ROC and precision-
recall curves in `curves.png`, the model in `classifier.joblib`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import joblib
import numpy as np
from omegaconf import DictConfig

from phi1 import atomic, environment, lock
from phi1.config import check
from phi1.errors import InputError, MissingInputError
from phi1.quality import embed

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    check([("stage.test_fraction", 0 < stage.test_fraction < 1, "must be in (0, 1): the held-out share"),
           ("stage.n_estimators", stage.n_estimators > 0, "must be > 0 (trees in the forest)"),
           ("stage.min_samples_leaf", stage.min_samples_leaf > 0, "must be > 0")])
    out = Path(stage.output)
    out.mkdir(parents=True, exist_ok=True)
    ids, embeddings = embed.load(stage.embeddings)
    row = {doc_id: i for i, doc_id in enumerate(ids)}
    annotations = Path(stage.annotations)
    if not annotations.is_file():
        raise MissingInputError(f"{annotations}: no annotations (run prepare.py stage=annotate first)")
    labels = {}
    for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
                labels[r["id"]] = r["label"]
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{annotations}:{line_no}: {type(e).__name__}: {e} (expected a JSON object with"
                                 " id and label)") from e
    known = [doc_id for doc_id in labels if doc_id in row]
    if not known:
        raise InputError(f"{annotations}: none of its {len(labels)} documents has an embedding in {stage.embeddings} "
                         f"(ids such as {next(iter(labels), None)!r} vs {ids[0] if ids else None!r}); annotate and "
                         "embed the same source")
    if len(known) < len(labels):
        log.warning("classify: %d annotated documents have no embedding", len(labels) - len(known))
    x = embeddings.rows([row[d] for d in known])
    y = np.array([labels[d] == "high" for d in known])
    if len(set(y)) < 2:
        raise InputError(f"{stage.annotations}: the labels are all {'high' if y[0] else 'low'}; nothing to learn")
    # A stratified split needs both labels on both sides: 2 of each label at least, and 2 documents held out.
    high, n_test = int(y.sum()), math.ceil(stage.test_fraction * len(y))
    if min(high, len(y) - high) < 2 or n_test < 2 or len(y) - n_test < 2:
        raise InputError(f"{stage.annotations}: {len(y)} labelled documents with an embedding ({high} high, "
                         f"{len(y) - high} low) are too few to hold out stage.test_fraction={stage.test_fraction} "
                         "with both labels on each side; annotate more (stage.n of stage=annotate)")
    # Locked (phi1.lock): two fits into one folder wrote each other's model beside their own metrics.
    with lock.stage_output(out, "classify"):
        return _fit(stage, x, y, out, annotations)


def _fit(stage, x: np.ndarray, y: np.ndarray, out: Path, annotations: Path) -> dict:
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=stage.test_fraction, stratify=y,
                                                        random_state=stage.seed)
    if stage.estimator is None:
        model = _fit_forest(x_train, y_train, stage)
    else:
        model = _estimator(stage)
        log.info("classify: fitting %s on %d embeddings", model, len(y_train))
        model.fit(x_train, y_train)
    proba = model.predict_proba(x_test)[:, 1]
    precision, recall, f1, _ = precision_recall_fscore_support(y_test, proba >= 0.5, average="binary",
                                                               zero_division=0)
    metrics = {
        "estimator": type(model).__name__,
        "train": int(len(y_train)), "test": int(len(y_test)), "positive_share": float(y.mean()),
        "precision": float(precision), "recall": float(recall), "f1": float(f1),
        "roc_auc": float(roc_auc_score(y_test, proba)),
        # What a classifier that ignores the embeddings would score: the floor to compare against.
        "majority_baseline_accuracy": float(max(y_test.mean(), 1 - y_test.mean())),
        "accuracy": float(((proba >= 0.5) == y_test).mean()),
    }
    # Written beside and renamed into place (phi1.atomic): a fit killed mid-dump left a truncated classifier that
    # the filter stage could not unpickle, in place of the one before.
    atomic.write(out / "classifier.joblib", lambda tmp: joblib.dump(model, tmp))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    environment.record(out)
    _plot(y_test, proba, metrics, out / "curves.png",
          f"{annotations.name} on {Path(stage.embeddings).name}'s embeddings")
    log.info("classify: %s; the test split's scores; metrics.json and curves.png in %s",
             ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()), out)
    return metrics


def _estimator(stage):
    """stage.estimator built by Hydra, checked to be a classifier that gives probabilities (the filter's scores),
    seeded by stage.seed where it draws random numbers and no random_state was given."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from phi1.config import ConfigError

    try:
        model = instantiate(stage.estimator)
    except InstantiationException as e:
        raise ConfigError(f"stage.estimator: {e}") from e
    if not (hasattr(model, "fit") and hasattr(model, "predict_proba")):
        raise ConfigError(f"stage.estimator: {type(model).__name__} is not a classifier with predict_proba (the "
                          "filter ranks documents by the probability of 'high')")
    if hasattr(model, "get_params") and model.get_params().get("random_state", 0) is None:
        model.set_params(random_state=stage.seed)
    return model


def _fit_forest(x, y, stage, trees_per_update: int = 10):
    """The forest grown a few trees at a time (warm_start), with a progress bar: at the paper's scale (80K
    training embeddings of 1024 dimensions; random ones measured) a tree takes ~1.6 s on 2 cores, 300 trees
    ~8 minutes. The same forest as one fit: sklearn draws the seeds of the trees already grown before seeding
    new ones."""
    import warnings

    from sklearn.ensemble import RandomForestClassifier
    from tqdm.auto import tqdm

    forest = RandomForestClassifier(n_estimators=0, min_samples_leaf=stage.min_samples_leaf, class_weight="balanced",
                                    n_jobs=-1, random_state=stage.seed, warm_start=True)
    with tqdm(total=stage.n_estimators, desc="classify", unit="tree", dynamic_ncols=True) as bar, \
            warnings.catch_warnings():
        # sklearn warns that class_weight="balanced" weighs each warm start's data alone: here it is the same data.
        warnings.filterwarnings("ignore", message=".*class_weight presets.*", category=UserWarning)
        while forest.n_estimators < stage.n_estimators:
            forest.n_estimators = min(forest.n_estimators + trees_per_update, stage.n_estimators)
            forest.fit(x, y)
            bar.update(forest.n_estimators - bar.n)
    forest.warm_start = False
    return forest


def _plot(y_test, proba, metrics: dict, path: Path, trained_on: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    fig, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4.5))
    name = "random forest" if metrics["estimator"] == "RandomForestClassifier" else metrics["estimator"]
    RocCurveDisplay.from_predictions(y_test, proba, ax=roc, name=name)
    roc.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    roc.set_title(f"ROC (held-out, n={metrics['test']}): AUC {metrics['roc_auc']:.3f}")
    PrecisionRecallDisplay.from_predictions(y_test, proba, ax=pr, name=name)
    pr.axhline(metrics["positive_share"], ls="--", c="grey", lw=1)
    pr.set_title(f"Precision-recall: F1 {metrics['f1']:.3f} at 0.5")
    fig.suptitle(f"Educational-value classifier (paper §2.1): {trained_on}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
