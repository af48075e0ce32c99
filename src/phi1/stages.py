"""The data stages `prepare.py stage=<name>` runs (DESIGN §1), by name."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from phi1.config import ConfigError

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
    return importlib.import_module(STAGES[name]).run(cfg)
