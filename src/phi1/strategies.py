"""Lightning strategies as the paper's runs need them (`conf/trainer/`)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from lightning.pytorch.strategies import DeepSpeedStrategy as _DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn

from phi1.checkpoints import is_deepspeed


class DeepSpeedStrategy(_DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, with the gradient of plain training and checkpoints that are whole or
    absent, as plain Lightning's files are.

    The gradient: Lightning divides the loss by the accumulation, and DeepSpeed's backward divides it again
    (as in Lightning issue #6170). The gradient came out 1/accumulation of the mean, so that clipping its norm
    at 1.0 clipped at 16 on phi-1-base's node (1024 sequences = 8 GPUs × micro-batch 8 × accumulation 16).
    Here DeepSpeed's backward leaves the loss as Lightning hands it over.

    The checkpoints: Lightning's has DeepSpeed write every save of a folder (last.ckpt, best.ckpt) into the same
    tag folder, over the previous save's files: a job killed mid-save (a preemption; a ZeRO-2 checkpoint of
    phi-1 is ~20 GB: 2.8 GB of bf16 weights plus 17 GB of fp32 weights and Adam moments) left a folder mixing
    two steps. Here each save writes a new tag folder; once every rank has written its shards, rank 0 points
    `latest` at it (an atomic rename) and removes the older tag. A folder without `latest` is an unfinished
    first save. Loading finds the tag through `latest`, as DeepSpeed does (Lightning looked for a folder named
    "checkpoint").
    """

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        return super().backward(closure_loss, optimizer, *args, scale_wrt_gas=False, **kwargs)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("DeepSpeedStrategy.save_checkpoint: storage_options is not supported")
        folder = Path(self.broadcast(str(filepath)))
        # A new name for every save, also of the same step (last.ckpt is saved again at the end of the run).
        tag = self.broadcast(f"step{checkpoint.get('global_step', 0):06d}-{time.time_ns()}")
        # As Lightning's: the weights and optimizer go into DeepSpeed's shards, the rest into its client state.
        state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        self.deepspeed_engine.save_checkpoint(folder, client_state=state, tag=tag, save_latest=False,
                                              exclude_frozen_parameters=self.exclude_frozen_parameters)
        self.barrier()  # every rank's shards are on disk
        if self.is_global_zero:
            (folder / "latest.tmp").write_text(tag)
            os.replace(folder / "latest.tmp", folder / "latest")
            for old in folder.iterdir():
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        if self.load_full_weights and self.zero_stage_3:  # one consolidated file: Lightning's own path
            return super().load_checkpoint(checkpoint_path, weights_only)
        if not is_deepspeed(Path(checkpoint_path)):
            raise FileNotFoundError(f"{checkpoint_path}: not a whole DeepSpeed checkpoint (no 'latest' file)")
        module = self.lightning_module
        _, state = self.deepspeed_engine.load_checkpoint(
            checkpoint_path, load_optimizer_states=module.trainer.state.fn == TrainerFn.FITTING,
            load_lr_scheduler_states=False, load_module_strict=module.strict_loading)
        if state is None:
            raise FileNotFoundError(f"{checkpoint_path}: DeepSpeed could not load it")
        return state
