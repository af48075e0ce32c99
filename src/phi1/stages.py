"""The data stages `prepare.py stage=<name>` runs (DESIGN §1), by name."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from phi1.config import ConfigError, check, source_checks

STAGES = {
    "pack": "phi1.data.pack",
    "annotate": "phi1.quality.annotate",
    "embed": "phi1.quality.embed",
    "classify": "phi1.quality.classify",
    "filter": "phi1.quality.filter",
    "stdlib_exercises": "phi1.synthetic.stdlib_exercises",
    "textbooks": "phi1.synthetic.textbooks",
    "exercises": "phi1.synthetic.exercises",
    "decontaminate": "phi1.contamination.decontaminate",
}


def run(cfg: DictConfig):
    name = cfg.stage.name
    if name not in STAGES:
        raise ConfigError(f"stage={name}: unknown stage (known: {', '.join(STAGES)})")
    for key in ("source", "train"):  # the stages' SourceConfigs: checked as data.sources are
        if key in cfg.stage:
            check(source_checks(f"stage.{key}", cfg.stage[key]))
    return importlib.import_module(STAGES[name]).run(cfg)
