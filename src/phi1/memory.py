"""Host memory a training run on the CPU needs, checked before any work. Past it, Linux's OOM killer ends the run
without a word (phi-1-small at the embedded default's micro-batch of 16 × 256 tokens on a 24 GB machine: killed
after 5 minutes, its log ending at the data line); on a GPU an allocation that does not fit raises a clear
CUDA error instead, so GPUs are not checked here; `gpu_advice` is what train.py logs before that error.

The estimate, measured on the CPU (fp32, dropout on, torch's SDPA; bf16 autocast measured within 5% of it):
- 16 bytes a parameter: fp32 weights, gradients and AdamW's two moments (checkpoints are written straight
  from them, phi1.checkpoints.CheckpointIO);
- activations, per token of the micro-batch: L × (166·d + 11.3·h·T) + 16·V bytes (L layers, width d, h heads,
  sequence length T, vocabulary V): ~41 fp32 values per layer and width unit (MLP, dropout masks, norms), ~3
  per attention score (scores, probabilities, dropout), 4 per logit. It matched six measurements within 5%:
  phi-1-small (L 20, d 1024, h 16, V 51,200) at 1 × 256, 2 × 256, 4 × 256, 1 × 512 and 1 × 1024 tokens (1.42,
  2.63, 5.21, 3.15, 8.06 GB), tiny_wide at 16 × 256 (1.34 GB). With activation checkpointing a layer keeps
  64·d bytes a token and one layer at a time holds its whole share (phi-1-small at 4 × 256: 2.39 GB).
- ~1 GB for the interpreter and its libraries.
A whole run errs a little high: phi-1-small at 8 × 256 tokens, estimated 17.2 GB, peaked at 15.9 GB by its third
step (gradients are allocated during the backward as activations are freed, and freed after each step).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from phi1.errors import InputError

log = logging.getLogger(__name__)

GB = 1e9
BASE = 1.0 * GB


@dataclass
class Estimate:
    states: float  # weights, gradients, AdamW moments
    activations: float
    processes: int

    @property
    def total(self) -> float:
        return (self.states + self.activations + BASE) * self.processes


def activations(model: DictConfig, vocab: int, micro: int, seq_len: int, checkpointing: bool) -> float:
    layer = 166 * model.d_model + 11.3 * model.n_head * seq_len
    per_token = (model.n_layer * 64 * model.d_model + layer if checkpointing else model.n_layer * layer) + 16 * vocab
    return micro * seq_len * per_token


def estimate(cfg: DictConfig, params: int, vocab: int, micro: int | None = None) -> Estimate:
    micro = micro or cfg.batch.micro_size
    checkpointing = _checkpointing(cfg)
    processes = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) and cfg.trainer.devices > 0 else 1
    return Estimate(16 * params, activations(cfg.model, vocab, micro, cfg.data.seq_len, checkpointing), processes)


def available() -> float | None:
    """Bytes this process may still allocate: the machine's MemAvailable, or less under a cgroup limit (a Slurm
    job's, a container's); None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            cap = Path(limit).read_text().strip()
            if cap != "max" and int(cap) < 2**60:  # v1 writes "no limit" as a number near 2**63
                found.append(int(cap) - int(Path(usage).read_text()))
        except (OSError, ValueError):
            continue
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        except (ValueError, OSError):
            pass
    return min(found) if found else None


def check(cfg: DictConfig, plan) -> None:
    """Refuse a CPU run whose estimate exceeds the memory available, naming what would fit."""
    import torch

    from phi1.model import build, count_params, padded_vocab

    have = available()
    if have is None:
        return
    vocab = cfg.model.vocab_size or padded_vocab(cfg.tokenizer.vocab_size or 51200)
    with torch.device("meta"):  # the parameter count without the memory (~1 s for phi-1)
        params = count_params(build(cfg.model, vocab))["total"]
    need = estimate(cfg, params, vocab)
    share = f" in each of {need.processes} processes" if need.processes > 1 else ""
    summary = (f"model={cfg.model.name}, a micro-batch of {cfg.batch.micro_size} × {cfg.data.seq_len} tokens on the "
               f"CPU needs ~{need.total / GB:.1f} GB: {need.states / GB:.1f} GB for the fp32 weights, gradients and "
               f"AdamW states (16 B × {params / 1e6:,.1f}M parameters) and ~{need.activations / GB:.1f} GB of "
               f"activations{share}; {have / GB:.1f} GB are available")
    if need.total <= have:
        close = need.total > 0.8 * have
        (log.warning if close else log.info)(summary + (": close to the limit" if close else ""))
        return
    # What fits: the largest micro-batch that divides the per-process batch; with activation checkpointing (~1/3
    # more compute) only where none fits without it.
    micros = micro_sizes(cfg, plan)
    advice = None
    for checkpointing in (False, True) if not _checkpointing(cfg) else (True,):
        variant = OmegaConf.merge(cfg, {"speed": {"activation_checkpointing": checkpointing}})
        if fit := next((m for m in micros if estimate(variant, params, vocab, m).total <= have), None):
            keys = ([f"batch.micro_size={fit}"] if fit != cfg.batch.micro_size else []) + (
                ["speed.activation_checkpointing=true"] if checkpointing and not _checkpointing(cfg) else [])
            advice = (f"Try {' '.join(keys)} (~{estimate(variant, params, vocab, fit).total / GB:.1f} GB; gradient "
                      "accumulation keeps batch.global_size), or a GPU (trainer=gpu)")
            break
    if advice is None:
        least = estimate(OmegaConf.merge(cfg, {"speed": {"activation_checkpointing": True}}), params, vocab, 1)
        advice = (f"Even a micro-batch of 1 with activation checkpointing needs ~{least.total / GB:.1f} GB: train a "
                  "smaller model, or on a GPU (trainer=gpu, trainer=deepspeed)")
    raise InputError(f"{summary}: the OOM killer would end the run without a word. {advice}. memory_check=false "
                     "trains anyway.")


def micro_sizes(cfg: DictConfig, plan) -> list[int]:
    """The micro-batch and the smaller ones that divide each process's share of the global batch, largest
    first: gradient accumulation keeps the global batch, so each trains the same run."""
    per_process = cfg.batch.global_size // max(plan.world_size, 1)
    return [m for m in range(cfg.batch.micro_size, 0, -1) if per_process % m == 0]


def gpu_advice(cfg: DictConfig, plan) -> str:
    """What to change when a GPU runs out of memory, in the order to try: the micro-batch (gradient accumulation
    keeps the global batch, so the run trains the same), activation checkpointing, ZeRO across the GPUs, and
    the evaluation's generation batch. Measured on an H100 (BENCHMARKS.md, bf16, compiled): phi-1 at 8 × 2048
    tokens peaks at 57.2 GB, phi-1-small at 16 × 2048 at 43.0 GB, past a 40 GB A100."""
    import torch

    from phi1.config import deepspeed

    smaller = next(iter(micro_sizes(cfg, plan)[1:]), None)
    options = []
    if smaller:
        options.append(f"batch.micro_size={smaller} (gradient accumulation keeps batch.global_size="
                       f"{cfg.batch.global_size}: the same run)")
    if not _checkpointing(cfg):
        options.append("speed.activation_checkpointing=true (each layer recomputed in the backward: ~1/3 more "
                       "compute; phi-1 keeps ~0.2 GB a sequence instead of ~3.4 GB)")
    if plan.world_size > 1 and not deepspeed(cfg):
        options.append("trainer=deepspeed_bf16 (ZeRO-2 shards the gradients and AdamW states over the GPUs)")
    if cfg.evaluation.enabled:
        options.append(f"if it ran out while evaluating, evaluation.generation.batch_size="
                       f"{max(cfg.evaluation.generation.batch_size // 2, 1)}")
    device = ""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        device = f" on a {props.name} of {props.total_memory / 1e9:.0f} GB"
    return (f"out of GPU memory: model={cfg.model.name} with a micro-batch of {cfg.batch.micro_size} × "
            f"{cfg.data.seq_len} tokens{device}. Try " + "; or ".join(options or ["a smaller model"]) +
            ". Resume with ckpt_path=last where a checkpoint was written.")


def _checkpointing(cfg: DictConfig) -> bool:
    return bool((cfg.get("speed") or {}).get("activation_checkpointing"))
