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


# The stages that split their corpus into `num_shards` slices, one process (or Slurm job) each.
SHARDED = ("pack", "embed", "filter")


def run(cfg: DictConfig):
    name = cfg.stage.name
    if name not in STAGES:
        raise ConfigError(f"stage={name}: unknown stage (known: {', '.join(STAGES)})")
    check([("num_shards", cfg.num_shards >= 1, "must be >= 1"),
           ("shard", cfg.shard is None or 0 <= cfg.shard < cfg.num_shards,
            f"must be in [0, num_shards={cfg.num_shards})"),
           ("num_shards", cfg.num_shards == 1 or name in SHARDED,
            f"stage={name} is not sharded (sharded: {', '.join(SHARDED)}); it would do the whole job in each shard")])
    for key in ("source", "train"):  # the stages' SourceConfigs: checked as data.sources are
        if key in cfg.stage:
            check(source_checks(f"stage.{key}", cfg.stage[key]))
    if cfg.num_shards > 1 and name != "pack":  # pack's merge keeps the first N of the shards it joins
        # `limit` takes the first N documents of a source; a shard reads its own slice of the files and cannot know
        # how many came before it, so each shard would take N of its own (n × N in all, other documents).
        source = cfg.stage.get("source")
        check([("stage.source.limit", source is None or source.limit is None, "cannot be used with num_shards > 1: "
                "each shard would take the first N of its own slice; limit the corpus another way (a smaller folder)")])
    return importlib.import_module(STAGES[name]).run(cfg)
