"""The checkpoints train.py writes: a file (plain Lightning), or a folder of ZeRO shards (Lightning's DeepSpeed
strategy, `trainer=deepspeed`). Everything that reads one (`init_from`, evaluate.py's `ckpt`, the HF export,
the best finetuning checkpoint) takes either, through `read_checkpoint`. Either is whole or absent: a file is
written to a temporary name and renamed (`CheckpointIO`), a folder gets its `latest` file last
(`phi1.strategies.DeepSpeedStrategy`).
"""

from __future__ import annotations

import logging
import pickle
import signal
import threading
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from phi1 import atomic, errors
from phi1.errors import InputError, MissingInputError

log = logging.getLogger(__name__)


def is_deepspeed(path: Path) -> bool:
    """A folder that DeepSpeed finished writing: its `latest` file names the tag folder of the shards."""
    return (Path(path) / "latest").is_file()


def zero_ranks(folder: Path) -> int:
    """How many ranks wrote a DeepSpeed folder: one optimizer shard each (ZeRO-1/2 partition its state)."""
    tag = (Path(folder) / "latest").read_text().strip()
    return len(list((Path(folder) / tag).glob("*zero_pp_rank_*_optim_states.pt")))


def is_checkpoint(path: Path) -> bool:
    return Path(path).is_file() or is_deepspeed(path)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint as Lightning's dict (state_dict, hyper_parameters, global_step, callbacks, ...), on the CPU.
    From a DeepSpeed folder the weights are DeepSpeed's fp32 master weights gathered from the ZeRO shards
    (`zero_to_fp32`), not the bf16/fp16 copies the engine computes with."""
    path = Path(path)
    if path.is_file():
        checkpoint = _load(path)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise InputError(f"{path}: a torch file, but not a checkpoint of train.py (no 'state_dict'). Weights "
                             "alone are given by their HF folder (config.json beside them)")
        return checkpoint
    if not is_deepspeed(path):
        raise MissingInputError(f"{path}: not a checkpoint (a file, or a DeepSpeed folder with a 'latest' file)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # Rank 0's model-states file holds Lightning's state beside the engine's; "module" (the weights in the
    # precision of the run) and "optimizer" are dropped, as the weights come from the shards.
    state = torch.load(_lightning_state_file(path), map_location="cpu", weights_only=False)
    checkpoint = {k: v for k, v in state.items() if k not in ("module", "optimizer")}
    weights = get_fp32_state_dict_from_zero_checkpoint(str(path), (path / "latest").read_text().strip())
    # Lightning before 2.1 wrapped the module: its keys start with "_forward_module.".
    checkpoint["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in weights.items()}
    return checkpoint


def _load(path: Path, mmap: bool = False):
    """What torch.load reads from `path`, or an error naming the file. For another file (a model.safetensors or
    pytorch_model.bin picked out of an HF folder, a copy cut short) torch's own is a traceback about mmap, zip
    archives or pickle load keys."""
    hint = ("A checkpoint of train.py is a .ckpt file or DeepSpeed's folder; an HF model is given by its folder, "
            "not one of its files")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise InputError(f"{path}: not a checkpoint (not a file torch.save writes, or one cut short). {hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise InputError(f"{path}: not a checkpoint torch can read ({str(e).splitlines()[0]}). {hint}") from e


def _lightning_state_file(folder: Path) -> Path:
    """The file of a DeepSpeed folder that holds Lightning's state: rank 0's model states."""
    from deepspeed.utils.zero_to_fp32 import get_model_state_files

    tag = (folder / "latest").read_text().strip()
    return Path(sorted(get_model_state_files(str(folder / tag)))[0])


def read_header(path: str | Path) -> dict:
    """A checkpoint (a file, or DeepSpeed's folder) read without loading its tensors (memory-mapped: a 1.3B
    checkpoint with its optimizer is ~17 GB), for its hyper_parameters and global_step."""
    path = Path(path)
    return _load(path if path.is_file() else _lightning_state_file(path), mmap=True)


def read_config(path: str | Path) -> dict | None:
    """The config a checkpoint of train.py was trained with (LanguageModel's hyper_parameters); None if it has
    none."""
    return (read_header(path).get("hyper_parameters") or {}).get("cfg")


class CheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, except that a checkpoint goes straight to a temporary file that is renamed
    when complete. Lightning's (`_atomic_save`) serializes the whole checkpoint into memory first, so every save
    held a second copy of the weights and AdamW's states in host memory: 12 bytes a parameter, 4.3 GB for
    phi-1-small, 17 GB for phi-1 (on a GPU too, where they are copied to the host). Remote paths (s3://...)
    keep Lightning's way."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Hidden, and not *.ckpt: no glob takes the temporary for a checkpoint.
        atomic.write(path, lambda tmp: torch.save(checkpoint, tmp))


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

    `save_on_signals` (e.g. TERM, USR2): a job told that it will end (Slurm's warning before the time limit,
    which submitit sends as SIGUSR2; SIGTERM from `scancel`, a preemption or `kill`) saves last.ckpt at the end
    of the step in progress, then hands the signal to the handler it displaced (submitit's requeues the job)
    and stops. Without it, such a job lost everything since its last periodic checkpoint: up to 1000 steps of
    phi-1-base, ~4 h of 8 GPUs. The ranks agree at every step end (one all-reduce of a flag) whether any of
    them got the signal, so that they all save the same step.
    """

    def __init__(self, *args, save_on_signals: Sequence[str] = (), **kwargs) -> None:
        # Lightning names a file that it did not write itself `last-v1.ckpt` rather than replace it; and it takes
        # last.ckpt for its own only when the run folder is where the checkpoint's callback state says. A run
        # folder moved elsewhere (another scratch disk) and resumed wrote last-v1.ckpt, so the next resume
        # started from the old last.ckpt and trained its steps again. train.py refuses a fresh run in a folder
        # that holds checkpoints, so a file of that name here is this run's, to replace.
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)
        self.save_on_signals = [_signal_number(name) for name in save_on_signals]
        self._received: list[int] = []
        self._displaced: dict[int, object] = {}
        self._step_checked: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_checked = trainer.global_step
        # Here, after Lightning set its own SIGTERM handler (when fit starts): it is put back when training ends.
        if threading.current_thread() is threading.main_thread():  # where Python lets handlers be set
            for signum in self.save_on_signals:
                self._displaced[signum] = signal.signal(signum, self._note_signal)

    def _note_signal(self, signum, frame) -> None:
        if signum not in self._received:
            self._received.append(signum)
            log.warning("%s received: last.ckpt is saved at the end of this step, then the run stops (resume with "
                        "ckpt_path=last)", signal.Signals(signum).name)

    def _restore_handlers(self) -> None:
        for signum, handler in self._displaced.items():
            signal.signal(signum, handler)
        self._displaced = {}

    def _pass_on_signals(self) -> None:
        """The displaced handlers get the signals they would have had: submitit's requeues the job and exits."""
        self._restore_handlers()
        received, self._received = self._received, []
        for signum in received:
            handler = signal.getsignal(signum)
            if callable(handler) and not _is_lightnings(handler):
                handler(signum, None)

    def _stop_on_signal(self, trainer) -> None:
        """At an optimizer step's end (never mid-accumulation): if any rank got a signal, all save and stop."""
        if not self.save_on_signals or trainer.global_step == self._step_checked:
            return
        self._step_checked = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(bool(self._received), all=False):
            return
        if self._last_global_step_saved != trainer.global_step:  # not saved at this step already
            candidates = self._monitor_candidates(trainer)
            if self.save_last:
                self._save_last_checkpoint(trainer, candidates)
            else:
                self._save_checkpoint(trainer, self.format_checkpoint_name(candidates))
        # Lightning logs a step's metrics after its on_train_batch_end hooks, which this stop cuts short: without
        # this, the loss of the step saved (the resume starts after it) would be a hole in the run's curves.
        trainer._logger_connector.update_train_step_metrics()
        names = ", ".join(signal.Signals(s).name for s in self._received) or "a signal to another rank"
        self._pass_on_signals()
        message = (f"stopped by {names} after step {trainer.global_step}, saved in {self.dirpath}: resume with "
                   "ckpt_path=last")
        errors.to_log_files(logging.WARNING, message)  # the terminal gets it from SystemExit
        raise SystemExit(message)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)

    def _at_final_step(self, trainer) -> bool:
        return 0 < trainer.max_steps <= trainer.global_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if not self._at_final_step(trainer):
            super().on_train_batch_end(trainer, *args)
            self._stop_on_signal(trainer)

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
        # A signal during the final step: that step is saved above and the run completes, unless the displaced
        # handler stops it (submitit's requeues the job, which writes the export from this checkpoint).
        self._pass_on_signals()


def _signal_number(name: str) -> int:
    number = getattr(signal, name if str(name).startswith("SIG") else f"SIG{name}", None)
    if not isinstance(number, signal.Signals) or number in (signal.SIGKILL, signal.SIGSTOP):
        raise InputError(f"callbacks.checkpoint.save_on_signals: {name!r} is not a signal a process can catch "
                         "(e.g. TERM, USR1, USR2)")
    return number


def _is_lightnings(handler) -> bool:
    """Lightning's SIGTERM handler is not called: it stops the loop at the next batch, which the checkpoint
    callback does itself, and it broadcasts from rank 0, a collective that no other rank matches when the
    signal reached one rank alone."""
    return type(handler).__module__.startswith(("lightning.", "pytorch_lightning."))
