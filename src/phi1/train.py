"""`train(cfg)`: validate the config, wire data, model, callbacks and loggers into a Lightning Trainer, fit,
then write `metrics.json` and the HF export into the run directory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from phi1 import config as phi_config
from phi1 import atomic, environment, lock, memory, runs
from phi1 import tokenizer as tokenizers
from phi1.checkpoints import (CheckpointIO, is_checkpoint, is_deepspeed, read_checkpoint, read_config, read_header,
                              zero_ranks)
from phi1.data import pack
from phi1.data.datamodule import PackedData, check_resumable
from phi1.errors import InputError, MissingInputError
from phi1.eval.callback import Evaluation
from phi1.export import export_hf
from phi1.module import LanguageModel, lr_lambda
from phi1.monitoring import DataWait, quiet_library_noise

log = logging.getLogger(__name__)


def _last_checkpoint(callbacks: list) -> Path:
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    raise phi_config.ConfigError("ckpt_path=last: no ModelCheckpoint callback with save_last in callbacks")


def _refuse_to_overwrite(callbacks: list, run_name: str) -> None:
    """A fresh run in a folder that holds another run's checkpoints would overwrite them (last.ckpt at its first
    save, the others as it reaches their steps): for a named experiment such as phi1_base, days of GPU time."""
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath and Path(cb.dirpath).is_dir():
            found = sorted(p.name for p in Path(cb.dirpath).glob("*.ckpt"))
            if found:
                raise InputError(
                    f"{cb.dirpath} holds the checkpoints of an earlier run with this run_name ({', '.join(found[:3])}"
                    f"{', ...' if len(found) > 3 else ''}): resume it with ckpt_path=last (ckpt_path=auto resumes "
                    "where there is a checkpoint and starts fresh elsewhere), or choose another run_name. "
                    "Its checkpoints and metrics are untouched." + runs.multirun_hint(run_name))


def resolve_ckpt_path(ckpt_path: str | None, callbacks: list, run_name: str = "") -> str | None:
    """`last`: this run's last.ckpt, an error if there is none; `auto`: last.ckpt if any; else a path. None (a
    fresh run) is refused where the run folder holds checkpoints already, except in a job that Slurm requeued."""
    if ckpt_path is None and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        # Slurm reruns a requeued job (a timeout, which submitit requeues, or a preemption) with the command it
        # was first given: without this, a job launched without ckpt_path (`experiment=phi1_base -m
        # hydra/launcher=slurm_gpu`) would be refused its own checkpoints at its first requeue.
        log.info("Slurm requeued this job (SLURM_RESTART_COUNT=%s): resuming from its last checkpoint where it has"
                 " one (ckpt_path=auto)", os.environ["SLURM_RESTART_COUNT"])
        ckpt_path = "auto"
    if ckpt_path in (None, "auto", "last"):
        if ckpt_path is None:
            _refuse_to_overwrite(callbacks, run_name)
            return None
        last = _last_checkpoint(callbacks)
        if is_checkpoint(last):
            return str(last)
        if last.exists():  # a DeepSpeed folder whose first save was cut short
            others = sorted(str(p) for p in last.parent.glob("*.ckpt") if p != last and is_checkpoint(p))
            raise MissingInputError(
                f"ckpt_path={ckpt_path}: {last} is unfinished (its first save was cut short); resume from another "
                f"checkpoint with ckpt_path=<path>{': ' + ', '.join(others) if others else ' (there is none)'}")
        if ckpt_path == "last":
            raise MissingInputError(
                f"ckpt_path=last: no checkpoint at {last}. Resume with the run_name of the run to continue"
                " (its folder under paths.output_dir), or use ckpt_path=auto to start fresh when there is none."
            )
        return None
    if not is_checkpoint(Path(ckpt_path)):  # a file, or a folder under DeepSpeed (one shard per rank)
        raise MissingInputError(f"ckpt_path: {ckpt_path} is not a checkpoint (a file, or a whole DeepSpeed folder)")
    return ckpt_path


# What a resumed run shares with its checkpoint: a change to any of these would train another run under its name
# (another model, data or optimizer, or another data order: that is a function of seed and step). The budget
# (training on), devices, micro-batch, speed switches, logging and evaluation may change; so may a source's
# path (a moved data_dir) and the attention kernel (the same attention).
RESUME_KEYS = ("seed", "phase", "batch.global_size", "model", "tokenizer", "data.name", "data.seq_len",
               "data.val_fraction", "data.dedup", "data.sources", "optim")
MAY_CHANGE = ("model.attn_implementation", ".path", ".made_by")


def _flat(value, prefix: str = "") -> dict:
    """{dotted key: leaf}; a list also gives its length (key `<list>.#`), so that an added entry counts."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {f"{prefix}#": len(value), **{k: v for i, item in enumerate(value)
                                              for k, v in _flat(item, f"{prefix}{i}.").items()}}
    return {prefix[:-1]: value}


def _differences(saved: dict, now: dict, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """`key: saved value in the checkpoint, new value now` for each leaf under `prefixes` that differs (MAY_CHANGE
    aside). Keys that one side lacks are skipped: a setting added to the config or removed from it since the
    checkpoint (the config is a schema: a run cannot drop a key, and a list's length counts its entries)."""
    before, after = _flat(saved), _flat(now)
    return [f"{key}: {before[key]!r} in the checkpoint, {after[key]!r} now" for key in before
            if key in after and any(not p or key == p or key.startswith(p + ".") for p in prefixes)
            and not any(m in key for m in MAY_CHANGE) and after[key] != before[key]]


def _listed(changed: list[str]) -> str:
    return "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")


def check_layout(cfg: DictConfig, plan, ckpt_path: str) -> None:
    """A checkpoint resumes under the strategy that wrote it: DeepSpeed's folder of ZeRO shards on as many ranks
    as wrote it, Lightning's file without DeepSpeed. Otherwise each failed after the model was built and the data
    packed (minutes for phi-1): IsADirectoryError from torch.load, a folder without 'latest', or DeepSpeed's "used
    a DP world size of 8 but the current world size is 4"."""
    folder, under_deepspeed = is_deepspeed(Path(ckpt_path)), phi_config.deepspeed(cfg)
    fresh = (f"or init_from={ckpt_path} run_name=<a new name> starts a new run from its weights (a new optimizer "
             "state, LR schedule and data order)")
    what = f"ckpt_path={cfg.ckpt_path}: {ckpt_path}"
    if folder and not under_deepspeed:
        raise InputError(f"{what} is DeepSpeed's folder of ZeRO shards, and this run is not under DeepSpeed: resume "
                         f"it under the trainer that wrote it (trainer=deepspeed or deepspeed_bf16); {fresh}")
    if under_deepspeed and not folder:
        raise InputError(f"{what} is the checkpoint file of a run without DeepSpeed, and this run is under "
                         f"DeepSpeed, which resumes its own folders of shards: resume it as it was trained "
                         f"(trainer=gpu, say); {fresh}")
    if folder and (ranks := zero_ranks(Path(ckpt_path))) != plan.world_size:
        raise InputError(f"{what} holds ZeRO optimizer shards written by {_ranks(ranks)}, and this run has "
                         f"{_ranks(plan.world_size)} (trainer.devices × trainer.num_nodes): DeepSpeed cannot "
                         f"repartition them. Resume it on {_ranks(ranks)}; {fresh}")


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def check_resume(cfg: DictConfig, ckpt_path: str, max_steps: int) -> None:
    """Refuse to resume a checkpoint with other training settings (RESUME_KEYS) than it was trained with, naming
    each: `python train.py run_name=myrun ckpt_path=last` without the run's first overrides (experiment=...,
    data=...) would otherwise train on with the defaults. A budget may change: say what it does to the LR."""
    header = read_header(ckpt_path)
    saved = (header.get("hyper_parameters") or {}).get("cfg")
    if saved is None:  # not written by train.py's LanguageModel
        return
    changed = _differences(saved, OmegaConf.to_container(cfg, resolve=True), RESUME_KEYS)
    if changed and cfg.resume_check:
        how = ("Give the run's own overrides again (experiment=..., data=...; the checkpoint's config is its "
               "hyper_parameters, and the run's config.yaml)")
        if started := runs.started_by(Path(cfg.paths.run_dir)):
            path, overrides = started
            kept = [o for o in overrides if not o.startswith(("ckpt_path=", "resume_check="))]
            how = (f"The command that started it ({path}) resumes it as `python train.py {shlex.join(kept)} "
                   "ckpt_path=last` (a budget, micro-batch or device count given after these overrides theirs)")
        raise InputError(
            f"ckpt_path={cfg.ckpt_path}: {ckpt_path} was trained with other settings than this command's: "
            f"{_listed(changed)}. {how}; or resume_check=false trains on with this command's."
            + runs.multirun_hint(cfg.run_name))
    if changed:
        log.warning("resuming %s with other settings than it was trained with (resume_check=false): %s", ckpt_path,
                    _listed(changed))
    _warn_schedule(saved["optim"], cfg.optim, header["hyper_parameters"].get("max_steps"),
                   header.get("global_step", 0), max_steps)


def _lr(optim, max_steps: int, step: int) -> float:
    return optim["lr"] * lr_lambda(optim["warmup_steps"], max_steps, optim.get("final_lr_ratio", 0.0))(step)


def _warn_schedule(saved_optim: dict, optim, saved_steps: int | None, step: int, max_steps: int) -> None:
    """The LR schedule (warmup, then linear decay to final_lr_ratio at max_steps) is rebuilt from this command's
    budget, so a larger one raises the LR of a run that had decayed to its end: a 30-step run at LR 0 resumed
    for 60 steps goes on at 0.75 × the peak ((60 - 30) / (60 - 20) after 20 warmup steps). Said, with both LRs."""
    if saved_steps is None or saved_steps == max_steps or step >= max_steps:
        return
    before, now = _lr(saved_optim, saved_steps, step), _lr(optim, max_steps, step)
    log.warning("resuming at step %d with another budget: %d steps where the checkpoint's run planned %d. The LR "
                "schedule is this budget's (linear decay to step %d), so the next step's LR is %.3g, where the "
                "checkpoint's schedule gave %.3g", step, max_steps, saved_steps, max_steps, now, before)


def check_init_tokenizer(cfg: DictConfig, init_from: str) -> None:
    """Weights trained with another tokenizer of the same size load without an error, and each token id then
    means another token: refused. A checkpoint of train.py is compared by its tokenizer config (paths aside), an
    HF folder by its tokenizer.json's vocabulary; a hub id is not checked."""
    source = Path(init_from).expanduser()
    if is_checkpoint(source):
        saved = (read_config(source) or {}).get("tokenizer")
        mine = OmegaConf.to_container(cfg.tokenizer, resolve=True)
        changed = _differences({"tokenizer": saved}, {"tokenizer": mine}) if saved else []
        how = _listed(changed)
    elif (source / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        theirs = Tokenizer.from_file(str(source / "tokenizer.json")).get_vocab()
        mine = Tokenizer.from_file(str(tokenizers.ensure(cfg) / "tokenizer.json")).get_vocab()
        changed = theirs != mine
        moved = len(theirs.items() - mine.items())
        how = (f"{source / 'tokenizer.json'} has {len(theirs):,} tokens, {moved:,} of them with an id this run's "
               "tokenizer gives another token or none")
    else:
        return
    if changed:
        raise InputError(f"init_from={cfg.init_from}: its weights were trained with another tokenizer than this "
                         f"run's tokenizer={cfg.tokenizer.name} ({how}): every token id would mean another token. "
                         "Use the base run's tokenizer (the same tokenizer=... as its command).")


def _finished(cfg: DictConfig, run_dir: Path, max_steps: int, ckpt_path: str) -> dict | None:
    """The metrics of a run that completed these steps (train.py writes metrics.json last, after the final
    evaluation and the export): resuming it has nothing to do, and Lightning would skip its final evaluation."""
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text()) if path.exists() else {}
    except ValueError as e:  # written in place before phi1.atomic, and cut short (a full disk, a kill)
        raise InputError(f"ckpt_path={cfg.ckpt_path}: {path} is not JSON ({e}): its write was cut short. Remove it "
                         "and resume again: the run goes on from its last checkpoint and writes it anew") from e
    if metrics.get("steps", -1) < max_steps:
        return None
    # By the job's first process: where the sources' files were rewritten, the check packs them, and the ranks
    # of a multi-GPU job would each pack the whole data at once. The others have nothing to do either way.
    if cfg.resume_check and lock.first_process():
        what = f"ckpt_path={cfg.ckpt_path}: {run_dir} finished training"
        _check_finished_data(cfg, run_dir, metrics, ckpt_path, what)
        _check_finished_base(cfg, run_dir, metrics, what)
    log.info("%s: this run finished its %d steps (metrics.json); nothing to do. A larger budget trains on; "
             "python evaluate.py ckpt=%s evaluates it again", run_dir, max_steps, run_dir / "hf")
    return metrics


# A finished run is this command's only if it trained on the data this command's sources pack into, and from the
# weights its init_from names now. Its config may match while neither does: `make filter` again with another
# threshold rewrites the filtered file that data=stdlib_filtered reads, and a finetune's base (init_from=run:...)
# may have been trained again since. Refused with this advice:
ASIDE = ("Its metrics are the old {}: move the folder aside (or give another run_name) to train this run again{}; "
         "resume_check=false takes its metrics as they are.")


def _check_finished_data(cfg: DictConfig, run_dir: Path, metrics: dict, ckpt_path: str, what: str) -> None:
    """The tokens it trained on (metrics.json's record; for a run from before it, its checkpoint's data module
    state) against those this command's sources pack into."""
    packed, tokenizer_dir = metrics.get("data/pack"), tokenizers.location(cfg)
    trained = metrics.get("data/train_sha256") or (read_header(ckpt_path).get("PackedData") or {}).get("train_sha256")
    if not trained or not (tokenizer_dir / "tokenizer.json").is_file():  # nothing to pack with but a new tokenizer
        return
    if pack.location(cfg, tokenizer_dir).name == packed:
        return
    # The pack's name follows its sources' file names, sizes and mtimes: written again, they may hold the same
    # documents. Packed (as training would) unless it is, and compared by the tokens.
    directory = pack.pack(cfg, tokenizer_dir)
    if json.loads((directory / "manifest.json").read_text())["splits"]["train"]["sha256"] == trained:
        return
    stale = runs.built_on(run_dir, cfg.paths.output_dir)
    old = packed or f"tokens of sha256 {trained[:12]}..."
    raise InputError(f"{what} on other data than this command's: it trained on {old}, and data.sources now pack into "
                     f"{directory.name}, other tokens (the sources' files were written again since). "
                     + ASIDE.format("data's", f", and with it the runs on that data or started from its weights: "
                                              f"{', '.join(map(str, stale))}" if stale else ""))


def _check_finished_base(cfg: DictConfig, run_dir: Path, metrics: dict, what: str) -> None:
    """The weights its init_from names now against those it started from (metrics.json's record; for a run from
    before it, whether they are newer than the run's start, its overrides.yaml)."""
    started = metrics.get("init_from")
    began = run_dir / runs.STARTED_BY
    if not started and not (cfg.init_from and began.is_file()):
        return
    try:
        path = runs.resolve(cfg.init_from, cfg.paths.output_dir, cfg.paths.data_dir) if cfg.init_from else None
    except MissingInputError as e:
        log.warning("%s: its base cannot be checked (%s); its metrics stand", run_dir, e)
        return
    now = runs.weights_identity(path)
    if started:
        # By the files' names, sizes and times, not the path: a run folder moved with its base (`cp -a`, rsync -a)
        # started from the same weights. A hub id has no files here: its name is all there is.
        changed = now != started["files"] or (now is None and cfg.init_from != started["init_from"])
        since = ("has changed since the run started from it" if path == started["path"] else
                 f"is not what the run started from ({started['path']})") + \
            " (its files' names, sizes or times differ: trained or exported again)"
    else:
        changed = any(mtime > began.stat().st_mtime_ns for *_, mtime in now or [])
        since = (f"has changed since the run started from it (files newer than its {began.name}: trained or "
                 "exported again)")
    if changed:
        raise InputError(f"{what} from other weights than this command's: init_from={cfg.init_from} ({path}) {since}"
                         ". " + ASIDE.format("weights'", ""))


def _check_resume_data(cfg: DictConfig, ckpt_path: str, world_size: int) -> None:
    """The data the checkpoint trained on (its data module's state: seed, global batch, the training tokens' sha256)
    against this command's pack. The fit's restore checks the same, but only after the model is built (under
    DeepSpeed, set up and its ZeRO shards loaded), with the run's W&B run resumed; and a finished run trained on
    with a larger budget had its metrics.json set aside by then, so that it read as unfinished to report.py and to
    init_from=run:... Where the pack is not on disk (its sources' files were written since), one process packs it
    as training would (the fit then reuses it); the ranks of a multi-GPU job leave that to the fit: packing here,
    before the Trainer, would hold the others at their rendezvous, which times out, where the fit's prepare_data
    packs behind a barrier that waits."""
    state = read_header(ckpt_path).get(PackedData.__qualname__)
    if not state:  # not written by train.py
        return
    tokenizer_dir = tokenizers.location(cfg)
    directory = pack.location(cfg, tokenizer_dir) if (tokenizer_dir / "tokenizer.json").is_file() else None
    if directory is None or not (directory / "manifest.json").is_file():
        if world_size > 1:
            return
        directory = pack.pack(cfg, tokenizers.ensure(cfg))
    check_resumable(state, cfg, json.loads((directory / "manifest.json").read_text()), directory.name)


def _set_aside_metrics(run_dir: Path) -> None:
    """A finished run trained on with a larger budget is unfinished until it writes its new metrics.json: the old
    one would tell report.py, and a run waiting for this one (init_from=run:...), that it had finished. Renamed,
    not removed: its numbers are those of the shorter run. By the job's first process: ranks that srun or torchrun
    start together would race for the file."""
    path = run_dir / "metrics.json"
    if lock.first_process() and path.exists():
        steps = json.loads(path.read_text()).get("steps", 0)
        kept = path.with_name(f"metrics-step{steps:06d}.json")
        os.replace(path, kept)
        log.info("training on past step %d: its metrics.json is now %s", steps, kept.name)


def train(cfg: DictConfig) -> dict:
    quiet_library_noise()
    # Here rather than from Lightning's Trainer: that comes after the model is built (~15 s for 1.3B) and the
    # data packed, and says only "No supported gpu backend found!". Before the batch arithmetic too, which
    # counts trainer=deepspeed's 8 GPUs: on a laptop, the first thing to say is that it has none.
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise phi_config.ConfigError(
            f"trainer.accelerator={cfg.trainer.accelerator}: no CUDA GPU is visible to this process"
            f" (torch {torch.__version__}); trainer=cpu trains on the CPU")
    plan = phi_config.validate(cfg)
    pack.require_sources(cfg)  # packing would find a missing file only after the model and the other sources
    t0 = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with contextlib.ExitStack() as held:  # the run folder's lock (phi1.lock), from the first write to the end
        return _train(cfg, plan, t0, held)


def _train(cfg: DictConfig, plan, t0: float, held: contextlib.ExitStack) -> dict:
    run_dir = Path(cfg.paths.run_dir)
    # One process at a time in run_dir (phi1.lock): at once where the folder exists (Hydra made it; another process
    # may be running there, and its checkpoints are not this run's to resume), else before the first write (a run
    # refused from Python leaves no folder).
    run_lock = partial(lock.exclusive, run_dir / ".lock", f"run folder {run_dir}", "choose another run_name")
    locked_at_start = run_dir.is_dir()
    if locked_at_start:
        held.enter_context(run_lock())
    callbacks = [instantiate(spec) for spec in cfg.callbacks.values()]
    evaluation = Evaluation(cfg.evaluation, run_dir) if cfg.evaluation.enabled else None
    if evaluation:
        callbacks.append(evaluation)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, callbacks, cfg.run_name)  # before anything is written into run_dir
    if ckpt_path:
        # A finished run's too: `-m seed=1,2 run_name=x ckpt_path=auto` gave the second cell the first's metrics.
        check_layout(cfg, plan, ckpt_path)
        check_resume(cfg, ckpt_path, plan.max_steps)
        if finished := _finished(cfg, run_dir, plan.max_steps, ckpt_path):
            return finished
        _check_resume_data(cfg, ckpt_path, plan.world_size)
        _set_aside_metrics(run_dir)
    on_cpu = phi_config.on_cpu(cfg)
    if on_cpu and torch.cuda.is_available():  # trainer=cpu is the default: `train.py model=1.3b` on a GPU node
        log.warning("training on the CPU (trainer.accelerator=%s) while %d CUDA GPU(s) are visible: trainer=gpu "
                    "or trainer=deepspeed_bf16 trains on them", cfg.trainer.accelerator, torch.cuda.device_count())
    if cfg.memory_check:
        memory.check(cfg, plan) if on_cpu else memory.check_gpu(cfg, plan)
    # Before the model is built (~20 s for 1.3B on a CPU) and the data packed: a missing base stops the run at
    # once, and a sweep's finetune waits for its base (init_wait_min) holding no memory.
    init_from = None
    if cfg.init_from and ckpt_path is None:  # a resumed run has its weights in the checkpoint
        init_from = runs.resolve(cfg.init_from, cfg.paths.output_dir, cfg.paths.data_dir, cfg.init_wait_min)
        check_init_tokenizer(cfg, init_from)
    if not locked_at_start:
        held.enter_context(run_lock())
    run_dir.mkdir(parents=True, exist_ok=True)
    if ckpt_path is None:
        runs.record_start(run_dir)  # the overrides a resume must give again (check_resume names them)
    # What report.py reads to place this run in a figure: the config with every interpolation resolved.
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    env = environment.record(run_dir)  # and what it ran on: the library versions behind its numbers
    loggers = [instantiate(spec) for spec in cfg.logger.values()]
    if ckpt_path:
        for logger in loggers:
            if hasattr(logger, "continue_previous_run"):
                logger.continue_previous_run()

    data = PackedData(cfg, plan)
    module = LanguageModel(OmegaConf.to_container(cfg, resolve=True), plan.max_steps, plan.accumulate)
    p = module.params
    log.info("model %s: %s parameters (%s matmul, %s embedding); %.2f GFLOP/token at seq_len %d",
             cfg.model.name, f"{p['total']:,}", f"{p['matmul']:,}", f"{p['embedding']:,}",
             module.flops_per_token / 1e9, cfg.data.seq_len)
    log.info("plan: %d steps × %d sequences × %d tokens = %s tokens; %d device(s), micro-batch %d, accumulation %d",
             plan.max_steps, cfg.batch.global_size, cfg.data.seq_len, f"{plan.tokens:,}", plan.world_size,
             cfg.batch.micro_size, plan.accumulate)
    if init_from:
        module.load_weights(init_from)

    trainer = L.Trainer(
        **instantiate(cfg.trainer, _convert_="all"),  # builds `strategy` when it has a _target_ (DeepSpeed)
        max_steps=plan.max_steps,
        accumulate_grad_batches=plan.accumulate,
        gradient_clip_val=cfg.optim.grad_clip or None,
        # Lightning counts validation intervals in micro-batches.
        val_check_interval=min(cfg.eval_every_steps, plan.max_steps) * plan.accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.val_batches,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # PackedData's sampler shards by rank itself
        callbacks=callbacks,
        logger=loggers,
        profiler=DataWait(),  # perf/data_wait: the share of time spent waiting for batches
        # Checkpoint files without a second copy in memory; DeepSpeed writes its folders of shards itself.
        plugins=[] if phi_config.deepspeed(cfg) else [CheckpointIO()],
        # Its table says "FLOPs 0" and repeats the parameter count that the line above gives in more detail.
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    for logger in loggers:  # beside the config Lightning logs: report.py wandb=... compares the runs' environments
        logger.log_hyperparams({"environment": env})
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except torch.OutOfMemoryError:
        log.error(memory.gpu_advice(cfg, plan))
        raise  # torch's own message (what it tried to allocate, what was free) follows

    metrics = {**module.resumed_metrics, **{k: float(v) for k, v in trainer.callback_metrics.items()}}
    metrics.update({
        "train/loss_first": module.first_loss,
        "steps": trainer.global_step,
        "tokens": trainer.global_step * plan.tokens_per_step,
        "params": p["total"],
        "data/epochs": data.passes(trainer.global_step),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "device_hours": module.device_hours(),
        # What it trained on and from, which a later ckpt_path=auto checks before taking these metrics as its own.
        "data/pack": data.dir.name,
        "data/train_sha256": data.manifest["splits"]["train"]["sha256"],
        **({"init_from": module.started_from} if module.started_from else {}),
    })
    for cb in callbacks:
        metrics.update(getattr(cb, "last", {}))
    if evaluation and evaluation.history and evaluation.history[-1]["step"] == trainer.global_step:
        metrics.update({k: v for k, v in evaluation.history[-1].items() if k != "step"})
    elif evaluation and trainer.is_global_zero:
        # Resumed from a checkpoint of the last step written before the final evaluation (by Lightning's own
        # ModelCheckpoint): Lightning skips the loop, and with it the evaluation.
        log.warning("no evaluation at the final step %d (resumed from a checkpoint written before it); "
                    "python evaluate.py ckpt=%s evaluates the export", trainer.global_step, run_dir / "hf")
    if evaluation and evaluation.best:
        metrics["eval/best"] = evaluation.best
        if kept := evaluation.kept_evaluation():
            # The run's model is the checkpoint it kept (the export below; paper §2.3: the best of phi-1's
            # checkpoints), so its numbers are the run's, for report.py as for a reader; the final step's
            # evaluation stays under eval/last and in eval/history.json.
            metrics["eval/last"] = evaluation.history[-1]
            metrics.update(kept)
    if trainer.is_global_zero:
        if cfg.export_hf:
            if evaluation and evaluation.best:
                # The paper keeps the best finetuning checkpoint: export that one, not the last. Read on rank 0
                # only: from a DeepSpeed folder it gathers every rank's fp32 shard (5.7 GB for phi-1's 1.42B).
                module.load_state_dict(read_checkpoint(evaluation.best_path)["state_dict"])
            export_hf(module, data.tokenizer_dir, run_dir / "hf")
        # Written last: its presence says the run finished (runs that depend on this one wait for it).
        atomic.write_json(run_dir / "metrics.json", metrics)
        log.info("done: %s; metrics.json, checkpoints and HF export in %s",
                 ", ".join(f"{k}={metrics[k]:.4g}" for k in ("train/loss_first", "train/loss", "val/loss")
                           if metrics.get(k) is not None), run_dir)
    return metrics
