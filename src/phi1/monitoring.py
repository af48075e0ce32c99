"""Throughput, MFU, the progress bar and the W&B logger, under the metric names of DESIGN §6; a profiler trace of
a few steps (`debug=profile`)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.callbacks import Callback, ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.profilers import Profiler
from lightning.pytorch.trainer.states import RunningStage

log = logging.getLogger(__name__)

# Lightning's Throughput keys -> ours. The device-level rates are per GPU; tokens/s is for the whole job.
_RENAME = {
    "device/items_per_sec": "perf/tokens_per_sec_per_device",
    "device/mfu": "perf/mfu",
    "device/flops_per_sec": "perf/flops_per_sec_per_device",
    "device/samples_per_sec": "perf/sequences_per_sec_per_device",
}


# Dense bf16/fp16 tensor-core peaks (DESIGN §7) where Lightning's table has none or a sparse one: the H200 is
# the H100 SXM's compute with more memory (989 TFLOP/s dense; Lightning lists 2.0e15, the 2:4-sparse figure, and
# only under names torch does not report).
DENSE_PEAK_FLOPS = {"h200 nvl": 835e12, "h200": 989e12}


def dense_peak_flops(device, precision: str) -> float | None:
    """This table's peak for a CUDA device in bf16/fp16, or None: then Lightning's `get_available_flops` holds."""
    import torch

    if device.type != "cuda" or not ("bf16" in precision or precision.startswith("16")):
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((flops for chip, flops in DENSE_PEAK_FLOPS.items() if chip in name), None)


class DataWait(Profiler):
    """A Lightning profiler that times one thing: the training loop waiting for its next batch
    (`[_TrainingEpochLoop].train_dataloader_next`). Throughput turns it into perf/data_wait, the share of
    wall time spent there: near 0 when loading keeps ahead of the accelerator."""

    ACTION = "train_dataloader_next"

    def __init__(self):
        super().__init__()
        self.waited = 0.0
        self._started: float | None = None

    def start(self, action_name: str) -> None:
        if action_name.endswith(self.ACTION):
            self._started = time.perf_counter()

    def stop(self, action_name: str) -> None:
        if action_name.endswith(self.ACTION) and self._started is not None:
            self.waited += time.perf_counter() - self._started
            self._started = None

    def summary(self) -> str:
        return f"waited {self.waited:.1f} s for training batches"


class Profile(Callback):
    """torch.profiler over the `steps` optimizer steps after step `first_step` (or after the step a run resumed
    at, if later): where a step's time goes, operator by operator and kernel by kernel, for speed work (MFU).
    Writes into `dir`, per rank: `trace-rank<k>.json` (open in ui.perfetto.dev or chrome://tracing; one
    ProfilerStep#n span per optimizer step) and `ops-rank<k>.txt` (the operators by self time, device time on a
    GPU). The first steps are left out: they hold one-off work (torch.compile, cuDNN autotuning, the caching
    allocator growing). The profiled steps run slower than the others (the profiler's own overhead)."""

    def __init__(self, dir: str, first_step: int = 5, steps: int = 3, record_shapes: bool = True,
                 profile_memory: bool = False, row_limit: int = 30):
        self.dir, self.first_step, self.steps = Path(dir), first_step, steps
        self.record_shapes, self.profile_memory, self.row_limit = record_shapes, profile_memory, row_limit
        self._profiler = self._span = None
        self._until: int | None = None
        self._step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import torch

        if self._until is None and trainer.global_step >= self.first_step:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities, record_shapes=self.record_shapes,
                                                    profile_memory=self.profile_memory)
            self._profiler.__enter__()
            self._step, self._until = trainer.global_step, trainer.global_step + self.steps
            self._open_span()

    def _open_span(self) -> None:
        import torch

        # The span name the trace viewers and torch's own schedule use for one step.
        self._span = torch.profiler.record_function(f"ProfilerStep#{self._step + 1}")
        self._span.__enter__()

    def _close_span(self) -> None:
        if self._span is not None:
            self._span.__exit__(None, None, None)
            self._span = None

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self._profiler is None or trainer.global_step == self._step:
            return  # no profile running, or mid-way through a step's gradient accumulation
        self._close_span()
        self._step = trainer.global_step
        if trainer.global_step >= self._until:
            self._write(trainer)
        else:
            self._open_span()

    def on_train_end(self, trainer, pl_module) -> None:
        if self._profiler is not None:  # the run ended first
            self._write(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._profiler is not None:
            self._stop()

    def _stop(self):
        self._close_span()
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        return profiler

    def _write(self, trainer) -> None:
        import torch

        profiler = self._stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        trace = self.dir / f"trace-rank{rank}.json"
        profiler.export_chrome_trace(str(trace))
        sort_by = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (self.dir / f"ops-rank{rank}.txt").write_text(
            profiler.key_averages().table(sort_by=sort_by, row_limit=self.row_limit) + "\n")
        log.info("profiled steps %d-%d: %s (ui.perfetto.dev), operators by time in %s", self._until - self.steps + 1,
                 trainer.global_step, trace, trace.with_name(f"ops-rank{rank}.txt"))


class Throughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens, with MFU from the module's `flops_per_batch`
    (6·N + 12·L·d·T per token, DESIGN §7) against the detected GPU's peak; plus perf/data_wait when the
    trainer's profiler is DataWait. Its clock is read once per optimizer step (window_size: steps)."""

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=lambda batch: batch.shape[0], length_fn=lambda batch: batch[:, :-1].numel(),
                         window_size=window_size)
        self.last: dict[str, float] = {}
        self._waited_at: tuple[float, float] | None = None  # (wall clock, DataWait.waited) at the last log
        self._flops_since: dict = {}  # per stage: FLOPs of the micro-batches since the clock was last read

    # The last figures go into metrics.json; kept in checkpoints for a run resumed after its final step.
    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = state.get("last", {})

    def _update(self, trainer, pl_module, batch, iter_num: int) -> None:
        # Lightning reads its clock after every micro-batch, behind a torch.cuda.synchronize() that lets the GPU
        # run dry while the CPU runs the hooks and launches the next micro-batch. Here the clock is read once per
        # optimizer step and, in training, without a sync of its own: the module's loss check (`.item()` before
        # each optimizer step) already keeps the CPU at most one optimizer step (clip + AdamW, the same work
        # every step) ahead of the GPU, so each reading is early by about the same time and a window's rate is
        # the GPU's. Validation, which has no such check, still syncs.
        stage = trainer.state.stage
        self._samples[stage] += self.batch_size_fn(batch)
        self._lengths[stage] += self.length_fn(batch)
        self._batches[stage] += 1
        self._flops_since[stage] = self._flops_since.get(stage, 0) + pl_module.flops_per_batch
        if stage == RunningStage.TRAINING and trainer.fit_loop._should_accumulate():
            return
        if stage != RunningStage.TRAINING:
            self._sync(trainer)
        self._throughputs[stage].update(
            time=time.perf_counter() - self._t0s[stage], batches=self._batches[stage],
            samples=self._samples[stage], lengths=self._lengths[stage], flops=self._flops_since.pop(stage))

    @staticmethod
    def _sync(trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            import torch

            torch.cuda.synchronize()

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        reset_peak_memory(trainer.strategy.root_device)
        peak = dense_peak_flops(trainer.strategy.root_device, str(trainer.precision))
        if peak is not None:  # else Lightning's own figure, set by super().setup
            self.available_flops = peak
            for throughput in self._throughputs.values():
                throughput.available_flops = peak

    def _compute(self, trainer, iter_num=None) -> None:
        if not trainer._logger_connector.should_update_logs:
            return
        metrics = self._throughputs[trainer.state.stage].compute()
        if "device/items_per_sec" not in metrics:
            return  # the window is not full yet
        out = {ours: metrics[theirs] for theirs, ours in _RENAME.items() if theirs in metrics}
        out["perf/tokens_per_sec"] = metrics["device/items_per_sec"] * trainer.world_size
        if isinstance(trainer.profiler, DataWait):
            now, waited = time.perf_counter(), trainer.profiler.waited
            if self._waited_at is not None and now > self._waited_at[0]:
                out["perf/data_wait"] = (waited - self._waited_at[1]) / (now - self._waited_at[0])
            self._waited_at = (now, waited)
        if (peak := peak_memory(trainer.strategy.root_device)) is not None:
            out["perf/peak_memory_gib"] = peak
        self.last = out
        trainer._logger_connector.log_metrics(out, step=iter_num)


def peak_memory(device) -> float | None:
    """This process's peak memory since `reset_peak_memory`, GiB: on a GPU what torch's allocator has held (what
    phi1.memory estimates, and BENCHMARKS.md's "peak memory"), on the CPU the peak resident set. Both are
    counters read without waiting on the device."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # Linux: this process's own peak. getrusage's ru_maxrss also counts its parent's resident set at the
        # fork: a run started by a 3 GB process (a sweep's, a test suite's) read at least 3 GB.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        pass
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def reset_peak_memory(device) -> None:
    """Start the peak at what the process holds now: runs in one process (a multirun's, a notebook's) each get
    their own."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5": the peak resident set (Linux 4.0+)
            f.write("5")
    except OSError:
        pass


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counted in optimizer steps, plus the job's tokens/s. Lightning counts
    micro-batches: 16 per step for phi-1-base on one 8-GPU node (1024 sequences = 8 GPUs × micro-batch 8 × 16
    accumulation), while the plan, the LR schedule, checkpoints and logs count steps."""

    @property
    def total_train_batches(self):
        return self.trainer.max_steps

    def on_train_start(self, trainer, *_):
        super().on_train_start(trainer)
        self._start(trainer)  # a run resumed mid-epoch gets no on_train_epoch_start

    def on_train_epoch_start(self, trainer, *_):
        self.train_progress_bar.initial = 0  # else the reset below draws n=0 against the previous start
        super().on_train_epoch_start(trainer)
        self._start(trainer)

    def _start(self, trainer) -> None:
        bar = self.train_progress_bar
        bar.total = trainer.max_steps
        bar.initial = bar.n = trainer.global_step  # a resumed run's bar starts where the run stopped
        bar.set_description("train")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws the bar

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        for cb in trainer.callbacks:
            if isinstance(cb, Throughput) and "perf/tokens_per_sec" in cb.last:
                items["tok/s"] = f"{cb.last['perf/tokens_per_sec']:,.0f}"
        return items


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def wandb_mode(mode: str = "auto") -> str:
    """`auto`: online only with an API key and a reachable server, offline otherwise (never blocking);
    `WANDB_MODE` in the environment wins. `wandb sync <run dir>/wandb/offline-run-*` uploads later."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
    if has_key and _reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")):
        return "online"
    log.info("W&B: offline (%s); sync later with `wandb sync`", "server unreachable" if has_key else "no API key")
    return "offline"


class _FinishingWandbLogger(WandbLogger):
    """Lightning's WandbLogger, finishing its W&B run when training ends (after the final evaluation's tables and
    the checkpoint artifacts). wandb keeps a run open until it is finished, and a Hydra multirun's jobs share
    one process: each job after the first logged into the first job's run."""

    def continue_previous_run(self) -> None:
        """For a run resumed from its checkpoint: log into the W&B run of its previous segment, so that a preempted
        run is one W&B run with one curve, not one crashed run per preemption (resume="allow", which Lightning
        passes, continues a run given its id). Online only: offline segments sharing an id overwrite each other
        when `wandb sync` uploads them, so each stays a run of its own. An id already chosen (`logger.wandb.id`,
        or a sweep agent's WANDB_RUN_ID) is kept."""
        init = self._wandb_init
        if init.get("mode") != "online" or init.get("id") or os.environ.get("WANDB_RUN_ID"):
            return
        # wandb names an online run's folder <dir>/wandb/run-<YYYYmmdd_HHMMSS>-<id>: by name is by time.
        folders = sorted((Path(init.get("dir") or ".") / "wandb").glob("run-*-*"))
        if not folders:
            return
        init["id"] = self._id = folders[-1].name.rsplit("-", 1)[1]
        log.info("W&B: continuing run %s, this run's previous segment", self._id)

    def finalize(self, status: str) -> None:
        super().finalize(status)
        # "finished" is SLURM's requeue signal, after which the job saves a checkpoint and may still log.
        if self._experiment is not None and status in ("success", "failed"):
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None


def wandb_logger(mode: str = "auto", **kwargs: Any) -> WandbLogger:
    """A WandbLogger that never blocks a run (see `wandb_mode`), and finishes its run at the end."""
    logger = _FinishingWandbLogger(mode=wandb_mode(mode), **kwargs)
    # Lightning hands wandb.init `anonymous=None`, which wandb 0.2x+ answers on every run with "The anonymous
    # setting has no effect and will be removed"; not passing it changes nothing else.
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


def quiet_library_noise() -> None:
    """Silence what the libraries print on every run that no user can act on:
    - Lightning's lines twice: the `lightning` package adds its own console handler on import ("INFO: ...")
      while its records also reach the root logger's handlers, Hydra's console and the run's log file. Where the
      root logger has handlers (under Hydra), Lightning's records go through those alone.
    - Lightning's "Tip" advertising its hosted logger.
    - torch's deprecation of LeafSpec, which Lightning 2.6 still constructs at every step;
    - the warning that a resumed run's data loader is not resumable (ours is: see below), that its
      checkpoint folder is not empty, and that DeepSpeed would not clip (it does: see below);
    - W&B's advertisement for its Weave tracing whenever `openai` is imported (evaluate.py, for grading);
      WANDB_DISABLE_WEAVE=false in the environment brings Weave back."""
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in rank_zero.filters):
        rank_zero.addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # The data order is a function of (seed, step) and the data module's state is in the checkpoint, so a run
    # resumed mid-epoch repeats the uninterrupted one exactly (tests/test_train.py), whatever this says.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # train.py refuses a fresh run in a folder that holds checkpoints, so this one only ever greets a resume.
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    # LanguageModel.configure_gradient_clipping (fused AdamW under AMP) hands DeepSpeed's case back to
    # Lightning, whose DeepSpeed strategy clips by trainer.gradient_clip_val in DeepSpeed's own config.
    warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")
    os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _netrc_has_wandb() -> bool:
    import netrc

    try:
        auth = netrc.netrc().authenticators(urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname)
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])
