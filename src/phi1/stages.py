"""The data stages `prepare.py stage=<name>` runs (DESIGN §1), by name."""

from __future__ import annotations

from omegaconf import DictConfig


def run(cfg: DictConfig):
    name = cfg.stage.name
    if name == "annotate":
        from phi1.quality.annotate import run as stage
    else:
        raise ValueError(f"stage={name}: unknown stage (known: annotate)")
    return stage(cfg)
