"""The LightningModule for pretraining (phi-1-base) and finetuning (phi-1): next-token loss on packed windows.

Both stages are the same objective (paper §2.3); they differ in data, hyperparameters and `init_from`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import DictConfig, OmegaConf

from phi1 import model as phi_model
from phi1 import runs
from phi1.checkpoints import is_checkpoint, read_checkpoint, read_config
from phi1.config import ConfigError, compile_options
from phi1.errors import InputError, MissingInputError, Phi1Error
from phi1.model import padded_vocab

log = logging.getLogger(__name__)


class NonFiniteLossError(Phi1Error, FloatingPointError):
    pass


def model_vocab(cfg: DictConfig) -> int:
    """model.vocab_size, or the tokenizer's size rounded up to a multiple of 64."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    if cfg.tokenizer.vocab_size is None:
        raise ConfigError("model.vocab_size: required when tokenizer.vocab_size is not set")
    return padded_vocab(cfg.tokenizer.vocab_size)


def lr_lambda(warmup: int, max_steps: int, final_ratio: float):
    """Linear warmup to the peak, then linear decay to final_ratio × peak at max_steps (paper §2.3)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        decay = max(max_steps - warmup, 1)
        return final_ratio + (1.0 - final_ratio) * max(0.0, (max_steps - step) / decay)

    return factor


def _liger_cross_entropy():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise ImportError("speed.fused_cross_entropy=true needs liger-kernel: pip install 'phi1[gpu]'") from e
    return LigerFusedLinearCrossEntropyLoss()


class LanguageModel(L.LightningModule):
    def __init__(self, cfg: dict, max_steps: int, accumulate: int):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = OmegaConf.create(cfg)
        self.max_steps, self.accumulate = max_steps, accumulate
        # EOS is set when exporting (phi1.export): the tokenizer does not exist yet when the model is built.
        self.model = phi_model.build(self.cfg.model, model_vocab(self.cfg))
        self.params = phi_model.count_params(self.model)
        seq_len = self.cfg.data.seq_len
        self.flops_per_token = phi_model.flops_per_token(
            self.params["matmul"], self.cfg.model.n_layer, self.cfg.model.d_model, seq_len
        )
        # Read by the Throughput callback for MFU: one micro-batch on one device.
        self.flops_per_batch = self.flops_per_token * self.cfg.batch.micro_size * seq_len
        self._loss_sum = torch.zeros(())
        self._micro = 0
        self.first_loss: float | None = None
        self.resumed_metrics: dict[str, float] = {}  # what was logged before the checkpoint resumed from
        self.hours_before = 0.0  # device-hours of the segments before the checkpoint resumed from
        self.started_from: dict | None = None  # init_from's weights, as load_weights found them
        self.tokenizer_files: dict[str, bytes] | None = None  # a checkpoint's copy (from_checkpoint), by file name
        self._fit_started: float | None = None
        speed = self.cfg.get("speed") or {}
        # Compiled bound methods, not compiled modules: the parameters and state_dict keys stay those of
        # self.model (checkpoints and HF exports are unchanged), and generation calls the eager model.
        self._logits = self.model.forward
        self._hidden = self.model.model.forward
        if speed.get("compile"):  # None (auto) is decided in setup, where the device is known
            self._compile()
        self._fused_ce = _liger_cross_entropy() if speed.get("fused_cross_entropy") else None
        if speed.get("activation_checkpointing"):
            # A layer keeps ~34·s·d bytes of activations per sequence in bf16 (Korthikanti et al. 2022, without
            # the attention scores SDPA never stores): 34 × 2048 × 2048 × 24 layers = 3.4 GB per sequence for
            # phi-1. Checkpointed, only each layer's input stays (2·s·d: 0.2 GB), and the backward pass runs
            # each layer's forward again (~1/3 more compute: 2 forwards and a backward of 2). Training mode only:
            # generation and validation are unchanged. Non-reentrant: the variant torch.compile traces.
            # (transformers 5 renamed gradient_ to activation_checkpointing_enable; both take the kwargs first.)
            enable = getattr(self.model, "activation_checkpointing_enable", None) or \
                self.model.gradient_checkpointing_enable
            enable({"use_reentrant": False})

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> LanguageModel:
        """The module a checkpoint of train.py holds (a file, or DeepSpeed's folder), on the CPU."""
        checkpoint = read_checkpoint(path)
        module = cls(**checkpoint["hyper_parameters"])
        module.load_state_dict(checkpoint["state_dict"])
        module.tokenizer_files = (checkpoint.get("phi1") or {}).get("tokenizer")  # for tokenizer.of_checkpoint
        return module

    def load_weights(self, path: str) -> None:
        """Initialise from a checkpoint of train.py (a file, or DeepSpeed's folder), an HF folder or a hub id
        (finetuning from phi-1-base)."""
        source = Path(path).expanduser()
        if is_checkpoint(source):
            checkpoint = read_checkpoint(source)
            state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        else:
            from transformers import AutoModelForCausalLM

            local = runs.is_path(str(path))
            if local and not (source / "config.json").is_file():
                raise MissingInputError(f"init_from={path}: neither a checkpoint (a file, or the folder DeepSpeed "
                                        "writes) nor an HF folder (config.json)")
            try:
                state = AutoModelForCausalLM.from_pretrained(source if local else path).state_dict()
            except OSError as e:
                if local:
                    raise
                raise MissingInputError(f"init_from={path}: no such file or folder, and not a reachable hub id"
                                        f" ({e})") from e
        self._check_fit(path, state)
        self.model.load_state_dict(state)
        # Kept in the checkpoints and metrics.json: a finished run is reused (ckpt_path=auto) only while its
        # init_from names these weights (train._check_finished_base).
        self.started_from = {"init_from": self.cfg.get("init_from"), "path": str(path),
                             "files": runs.weights_identity(str(source))}
        log.info("initialised weights from %s", path)

    def _check_fit(self, path: str, state: dict) -> None:
        """Weights of another architecture, named in one line: torch's own error lists every tensor (~200 lines for
        phi-1's 24 layers), and says nothing of the model they were trained as."""
        mine = self.model.state_dict()
        shapes = [(k, tuple(v.shape), tuple(mine[k].shape)) for k, v in state.items()
                  if k in mine and v.shape != mine[k].shape]
        missing, extra = [k for k in mine if k not in state], [k for k in state if k not in mine]
        if not (shapes or missing or extra):
            return
        found = []
        if shapes:
            key, theirs, ours = shapes[0]
            found.append(f"{len(shapes)} of {len(mine)} tensors have another shape ({key}: {list(theirs)} there, "
                         f"{list(ours)} here)")
        if missing:
            found.append(f"{len(missing)} tensors missing ({missing[0]}, ...)")
        if extra:
            found.append(f"{len(extra)} tensors this model does not have ({extra[0]}, ...)")
        source, was = Path(path).expanduser(), ""
        if is_checkpoint(source) and (saved := (read_config(source) or {}).get("model")):
            was = f"; it was trained as model={saved.get('name')}"
        elif (source / "config.json").is_file():
            c = json.loads((source / "config.json").read_text())
            was = (f"; its config.json: {c.get('num_hidden_layers')} layers, hidden size {c.get('hidden_size')}, "
                   f"vocabulary {c.get('vocab_size')}")
        m = self.cfg.model
        raise InputError(f"init_from: {path} does not fit model={m.name} ({m.n_layer} layers, d_model {m.d_model}, "
                         f"vocabulary {self.model.config.vocab_size}): {'; '.join(found)}{was}. Choose the model= "
                         "it was trained as.")

    def _compile(self) -> None:
        if self._logits == self.model.forward:  # the eager bound method: not compiled yet
            speed = self.cfg.get("speed") or {}
            options = compile_options(speed.get("compile_options"))
            how = {"options": options} if options else {"mode": speed.get("compile_mode")}
            self._logits = torch.compile(self._logits, **how)
            self._hidden = torch.compile(self._hidden, **how)

    def setup(self, stage: str) -> None:
        # speed.compile=null: compiled on a CUDA GPU. Measured on one H100 (BENCHMARKS.md): 1.3B 24.6K -> 39.0K
        # tokens/s (+58%), 350M 66.0K -> 115.0K (+74%), and less memory (1.3B, 4 x 2048 tokens a micro-batch:
        # 60.7 -> 40.4 GB), for ~1 min of compilation at the start. Left eager on the CPU, where the tiny
        # models' runs are shorter than their compilation.
        if (self.cfg.get("speed") or {}).get("compile") is None and self.trainer.strategy.root_device.type == "cuda":
            self._compile()

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()

    def on_train_start(self) -> None:
        # A resumed optimizer comes back with the LR its checkpoint's schedule set for the next step, and LambdaLR
        # recomputes it only after that step: under another budget (train.py says so), the first resumed step ran
        # at the old schedule's LR (0 for a run that had decayed to its end) and the next at the new one's.
        for config in self.trainer.lr_scheduler_configs:
            schedule = config.scheduler
            for group, factor, base in zip(schedule.optimizer.param_groups, schedule.lr_lambdas, schedule.base_lrs):
                group["lr"] = base * factor(schedule.last_epoch)

    def device_hours(self) -> float:
        """Wall-clock hours of fitting (training, validation and evaluation) × devices, summed over the run's
        segments up to this one's checkpoint: the paper's GPU-hours (Figure 2.1: 135 for phi-1-small on 26B
        tokens, 1090 for phi-1 on 76B). Work lost between a checkpoint and a kill is not counted."""
        now = time.perf_counter()
        return self.hours_before + (now - (self._fit_started or now)) * self.trainer.world_size / 3600

    def on_train_end(self) -> None:
        # Logged for W&B, whose run is finished when training ends, before train.py writes metrics.json: report.py
        # reads what it places and labels a W&B run by from its summary (metrics.json's names).
        tokens = self.global_step * self.cfg.batch.global_size * self.cfg.data.seq_len
        final = {"device_hours": self.device_hours(), "tokens": tokens, "params": self.params["total"]}
        if (data := self.trainer.datamodule) is not None:
            final["data/epochs"] = data.passes(self.global_step)
        for logger in self.loggers:
            logger.log_metrics(final, step=self.global_step)

    # The losses logged so far travel in the checkpoint: a resumed run reports the run's first loss, not the first
    # after its resume, and one resumed after its final step (which trains nothing) still has its final losses.
    # So does the tokenizer's folder (a 51,200-token BPE's is 3.7 MB, beside phi-1's 17 GB): the checkpoint
    # is read by evaluate.py and phi1.export from any folder and machine, where the run's paths.data_dir (./data,
    # relative to where it trained, by default) is not.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        logged = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
        folder = getattr(self.trainer.datamodule, "tokenizer_dir", None)
        checkpoint["phi1"] = {"first_loss": self.first_loss, "metrics": logged, "device_hours": self.device_hours(),
                              "started_from": self.started_from,
                              "tokenizer": {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())
                                            if p.is_file()} if folder else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("phi1", {})  # absent from checkpoints written before it was kept
        self.first_loss, self.resumed_metrics = state.get("first_loss"), state.get("metrics", {})
        self.hours_before = state.get("device_hours", 0.0)
        self.started_from = state.get("started_from")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        # Inputs are the first T tokens of the window, targets the last T. Under autocast, cross_entropy
        # runs in fp32.
        # use_cache=False: PhiForCausalLM otherwise builds a KV cache (config.use_cache, for generation) that
        # no loss reads. Under no_grad (validation) it keeps every layer's keys and values until the logits
        # exist, 2 × 8 × 2048 × 2048 × 2 bytes × 24 layers = 3.2 GB for phi-1 at 8 × 2048 tokens, and activation
        # checkpointing turns it off with a warning.
        inputs, targets = batch[:, :-1], batch[:, 1:].flatten()
        if self._fused_ce is not None:  # the LM head inside the loss, chunk by chunk
            hidden = self._hidden(input_ids=inputs, use_cache=False).last_hidden_state.flatten(0, 1)
            head = self.model.lm_head
            return self._fused_ce(head.weight, hidden, targets, head.bias)
        logits = self._logits(input_ids=inputs, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Dropout masks as a function of (seed, rank, step, micro-batch): a resumed run draws the same masks
        # as an uninterrupted one without storing RNG states, on any number of ranks.
        seed = ((self.cfg.seed * 1_000_003 + self.global_step) * 4_099 + self.global_rank) * 257 + self._micro
        torch.manual_seed(seed % (2**63))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self._loss_sum = self._loss_sum.to(loss.device) + loss.detach()
        self._micro += 1
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Validation at the final step too. Lightning validates every val_check_interval batches alone, and a
        # budget is rarely a multiple of eval_every_steps (26B tokens: 12,397 steps of 1024 × 2048, validated
        # last at 12,000; the embedded default's 100 steps at 80): the run's val/loss, in metrics.json and the
        # report, was that of weights hundreds of steps older than the ones it reports. Lightning validates when
        # a run is told to stop (its early-stopping path), which at the final step changes nothing else.
        if 0 < self.trainer.max_steps <= self.global_step:
            self.trainer.should_stop = True

    def on_before_optimizer_step(self, optimizer) -> None:
        # Once per optimizer step (one host sync), before the weights change and before any checkpoint of
        # this step is written: a non-finite loss stops here and the last checkpoint stays a good one.
        # Averaged over ranks first, so that every rank sees the same loss and stops together.
        if self._micro < self.accumulate:
            # DeepSpeed accumulates gradients itself, so Lightning calls this hook after every micro-batch;
            # the step's loss is the mean over all of them, as without DeepSpeed.
            return
        loss = self.trainer.strategy.reduce(self._loss_sum / self._micro, reduce_op="mean").item()
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"train/loss is {loss} at step {self.global_step}; stopping before the optimizer step. "
                "The last checkpoint is from before it; lower optim.lr or check the data."
            )
        if self.first_loss is None:
            self.first_loss = loss
        # Logged as CPU tensors: Lightning turns a number into a tensor on the module's device, and reads every
        # progress-bar metric back with `.item()` after each micro-batch, a host sync that left an H100 idle
        # ~2 ms before every compiled forward (bench/gpu_suite.sh profile 350m 8 compile).
        self.log("train/loss", torch.tensor(loss), prog_bar=True)
        self.log("train/lr", torch.tensor(float(optimizer.param_groups[0]["lr"])))
        self._loss_sum = torch.zeros((), device=self._loss_sum.device)
        self._micro = 0

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales inside its own step
        # (fused AdamW, the default on CUDA): "does not allow for gradient clipping", at the first step of every
        # `trainer=gpu` run. In bf16 there is no scaler and the gradients are the true ones; in fp16 the scaler
        # unscales them here first, and its step then passes the fused optimizer no scale (torch.amp.GradScaler).
        plugin = self.trainer.precision_plugin
        unscales_itself = getattr(optimizer, "_step_supports_amp_scaling", False)
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and unscales_itself:
            if plugin.scaler is not None:
                plugin.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        o = self.cfg.optim
        # No weight decay on biases and layer norms (the 1-d parameters).
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        fused = o.fused if o.fused is not None else self.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(o.warmup_steps, self.max_steps, o.final_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
