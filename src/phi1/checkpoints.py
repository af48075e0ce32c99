"""The checkpoints train.py writes: a file (plain Lightning), or a folder of ZeRO shards (Lightning's DeepSpeed
strategy, `trainer=deepspeed`). Everything that reads one (`init_from`, evaluate.py's `ckpt`, the HF export,
the best finetuning checkpoint) takes either, through `read_checkpoint`. Either is whole or absent: a file is
written to a temporary name and renamed (Lightning), a folder gets its `latest` file last
(`phi1.strategies.DeepSpeedStrategy`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from phi1.errors import MissingInputError


def is_deepspeed(path: Path) -> bool:
    """A folder that DeepSpeed finished writing: its `latest` file names the tag folder of the shards."""
    return (Path(path) / "latest").is_file()


def is_checkpoint(path: Path) -> bool:
    return Path(path).is_file() or is_deepspeed(path)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint as Lightning's dict (state_dict, hyper_parameters, global_step, callbacks, ...), on the CPU.
    From a DeepSpeed folder the weights are DeepSpeed's fp32 master weights gathered from the ZeRO shards
    (`zero_to_fp32`), not the bf16/fp16 copies the engine computes with."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    if not is_deepspeed(path):
        raise MissingInputError(f"{path}: not a checkpoint (a file, or a DeepSpeed folder with a 'latest' file)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_model_state_files

    tag = (path / "latest").read_text().strip()
    # Rank 0's model-states file holds Lightning's state beside the engine's; "module" (the weights in the
    # precision of the run) and "optimizer" are dropped, as the weights come from the shards.
    state = torch.load(sorted(get_model_state_files(str(path / tag)))[0], map_location="cpu", weights_only=False)
    checkpoint = {k: v for k, v in state.items() if k not in ("module", "optimizer")}
    weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag)
    # Lightning before 2.1 wrapped the module: its keys start with "_forward_module.".
    checkpoint["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in weights.items()}
    return checkpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, except that the final step's checkpoint is written when training ends: after
    that step's validation and the final evaluation (callbacks.Evaluation, whose on_train_end runs first, as
    Lightning calls checkpoint callbacks last). Lightning writes it before both, so a run killed after it (in
    the final evaluation, the best-checkpoint export or the HF export) resumed to a skipped loop and a
    metrics.json without its losses or its evaluation. Now the checkpoint holds all of them (the module keeps
    its logged metrics in it), and such a resume only writes the export and metrics.json. The final step always
    updates last.ckpt, so nothing is trained twice; its own step file only at a multiple of
    every_n_train_steps, as before. The class keeps Lightning's name: the callback's state in a checkpoint is
    keyed by it, and earlier runs resume with their state.
    """

    def _at_final_step(self, trainer) -> bool:
        return 0 < trainer.max_steps <= trainer.global_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if not self._at_final_step(trainer):
            super().on_train_batch_end(trainer, *args)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._at_final_step(trainer):
            super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._at_final_step(trainer) and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0:
                self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
