"""Training speed: train.py's Lightning loop against a plain PyTorch loop on the same model, data and kernels,
tokens/s and MFU (DESIGN §7) for each speed switch, DeepSpeed ZeRO 1/2 against none, and peak GPU memory.

    python bench/train_speed.py                                   # CPU: tiny model, stdlib, fp32 (the overhead)
    python bench/train_speed.py --gpu                             # one GPU: model=350m and 1.3b, seq 2048, bf16
    python bench/train_speed.py --gpu --models 350m --variants base,compile --steps 12
    python bench/train_speed.py --steps 60 model=tiny data.seq_len=128   # extra args are Hydra overrides

Variants (--gpu; each is train.py's config plus these overrides, and the plain loop runs the same ones):
  base        SDPA attention, fused AdamW, PyTorch cross-entropy, no compile (speed.compile=false)
  eager_attn  base + model.attn_implementation=eager    (what SDPA's flash/cuDNN kernels save)
  unfused     base + optim.fused=false                   (what fused AdamW saves)
  compile     speed.compile=true                         (the defaults on a GPU)
  fused_ce    speed.fused_cross_entropy=true             (liger-kernel; skipped when it is not installed)
  best        compile + fused_ce
  autotune    compile + speed.compile_mode=max-autotune-no-cudagraphs (Triton matmuls with fused epilogues)
  coord       compile + speed.compile_options.coordinate_descent_tuning=true (tuned elementwise kernels)
  autotune_coord  both: compile_options max_autotune, triton.cudagraphs=false, coordinate_descent_tuning
  nodrop      compile + model.dropout=0.0                 (what the paper's dropout of 0.1 costs; not a speed switch)
  actckpt     compile + speed.activation_checkpointing=true (memory freed, compute paid; micro given with --micro)
  zero1/zero2 trainer=deepspeed_bf16 with ZeRO stage 1/2 on one GPU, eager (train.py only)
  zero2_compile  the same with speed.compile=true
Steps: the first --warmup optimizer steps (compilation, allocator warm-up) are left out of the timing. Each
optimizer step is --accumulate micro-batches of --micro sequences (0: the largest that fits, found by doubling
from 1 without activation checkpointing). Validation, checkpoints, evaluation and the HF export are off.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from phi1.config import plan as make_plan  # noqa: E402
from phi1.config import register_configs  # noqa: E402
from phi1.data.datamodule import PackedData, StepSampler  # noqa: E402
from phi1.module import LanguageModel, lr_lambda  # noqa: E402
from phi1.monitoring import dense_peak_flops  # noqa: E402
from phi1.train import train  # noqa: E402

EAGER = ["speed.compile=false"]  # the plain loop calls no setup hook, so each variant says compile or not
VARIANTS = {
    "base": EAGER,
    "eager_attn": [*EAGER, "model.attn_implementation=eager"],
    "unfused": [*EAGER, "optim.fused=false"],
    "compile": ["speed.compile=true"],
    "fused_ce": [*EAGER, "speed.fused_cross_entropy=true"],
    "best": ["speed.compile=true", "speed.fused_cross_entropy=true"],
    "autotune": ["speed.compile=true", "speed.compile_mode=max-autotune-no-cudagraphs"],
    "coord": ["speed.compile=true", "+speed.compile_options.coordinate_descent_tuning=true"],
    "autotune_coord": ["speed.compile=true", "+speed.compile_options.max_autotune=true",
                       "+speed.compile_options.triton.cudagraphs=false",
                       "+speed.compile_options.coordinate_descent_tuning=true"],
    "nodrop": ["speed.compile=true", "model.dropout=0.0"],
    "actckpt": ["speed.compile=true", "speed.activation_checkpointing=true"],  # memory for ~1/3 more compute
    "zero1": [*EAGER, "trainer=deepspeed_bf16", "trainer.devices=1", "trainer.strategy.stage=1"],
    "zero2": [*EAGER, "trainer=deepspeed_bf16", "trainer.devices=1", "trainer.strategy.stage=2"],
    "zero2_compile": ["speed.compile=true", "trainer=deepspeed_bf16", "trainer.devices=1", "trainer.strategy.stage=2"],
}


class StepTimes(Callback):
    """Wall time at the end of every optimizer step, and the seconds the loop had waited for batches by then
    (train.py's DataWait profiler). The device is synced only at the two ends of the timed window (the steps
    in `sync_at`): a sync at every step would add one to each step that neither loop has of its own."""

    times: list[float] = []
    waited: list[float] = []
    sync_at: set[int] = set()

    def on_train_batch_end(self, trainer, *args):
        if len(StepTimes.times) < trainer.global_step:
            if trainer.global_step in StepTimes.sync_at and torch.cuda.is_available():
                torch.cuda.synchronize()
            StepTimes.times.append(time.perf_counter())
            StepTimes.waited.append(getattr(trainer.profiler, "waited", 0.0))


def timed(warmup: int, max_steps: int) -> set[int]:
    """The optimizer steps (1-based) at whose end the timed window opens and closes."""
    return {warmup + 1, max_steps}


def steps_per_sec(times: list[float], warmup: int) -> float:
    return (len(times) - 1 - warmup) / (times[-1] - times[warmup])


def harness(cfg, warmup: int) -> float:
    StepTimes.times, StepTimes.waited = [], []
    StepTimes.sync_at = timed(warmup, make_plan(cfg).max_steps)
    # Scratch: every measurement starts afresh (train.py refuses a fresh run over another's checkpoints).
    shutil.rmtree(cfg.paths.run_dir, ignore_errors=True)
    train(cfg)
    return steps_per_sec(StepTimes.times, warmup)


def data_wait_share(warmup: int) -> float:
    """Of the last harness run's timed steps, the share of wall time spent waiting for the next batch."""
    times, waited = StepTimes.times, StepTimes.waited
    return (waited[-1] - waited[warmup]) / (times[-1] - times[warmup])


def plain(cfg, warmup: int) -> float:
    """The same steps without Lightning: the module's loss (so the same kernels), autocast as the trainer's
    precision asks, AdamW (fused as configured), clipping, the LR schedule."""
    p = make_plan(cfg)
    data = PackedData(cfg, p)
    data.prepare_data()
    data.setup("fit")
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    # Built on the device: random init there takes a fraction of a second, on the CPU ~15 s for the 1.3B
    # model, paid by every plain run and every micro-batch probe. (Other weights than train.py's, which builds
    # on the CPU so that a seed gives the same weights on any machine; the speed is the same.)
    with device:
        module = LanguageModel(OmegaConf.to_container(cfg, resolve=True), p.max_steps, p.accumulate).train()
    o = cfg.optim
    decay = [w for w in module.parameters() if w.ndim >= 2]
    no_decay = [w for w in module.parameters() if w.ndim < 2]
    fused = o.fused if o.fused is not None else device.type == "cuda"
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, p.max_steps, o.final_lr_ratio))
    sampler = StepSampler(len(data.train_set), cfg.seed, cfg.batch.global_size, p.max_steps, 0, 1)
    batches = iter(torch.utils.data.DataLoader(data.train_set, batch_size=cfg.batch.micro_size, sampler=sampler,
                                               pin_memory=device.type == "cuda"))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in str(cfg.trainer.precision))
    times, sync_at = [], timed(warmup, p.max_steps)
    for step in range(1, p.max_steps + 1):
        for _ in range(p.accumulate):
            batch = next(batches).to(device, non_blocking=True)
            with autocast:
                loss = module._loss(batch)
            (loss / p.accumulate).backward()
        loss.item()  # train.py checks the loss here too: one host sync a step, before the optimizer step
        torch.nn.utils.clip_grad_norm_(module.parameters(), o.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step in sync_at and device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    del module, optimizer
    return steps_per_sec(times, warmup)


def common_overrides(run_dir: Path | str = "${paths.output_dir}/bench_train_speed",
                     timer: str = "__main__.StepTimes") -> list[str]:
    """What every measurement shares: training steps alone, timed by StepTimes, in a scratch run folder (by
    default beside the runs: under PHI1_ROOT where that is set, not the clone). No checkpoints: a 1.3B one under
    DeepSpeed is ~20 GB, written after the timing but still waited for."""
    return ["budget.tokens=null", "logger=csv", "val_batches=0", "evaluation.enabled=false", "export_hf=false",
            "callbacks.checkpoint.save_last=false", f"+callbacks.timer._target_={timer}", f"paths.run_dir={run_dir}"]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def fits(base: list[str], micro: int) -> bool:
    """Does a micro-batch of `micro` sequences train (two optimizer steps) without running out of memory?"""
    cfg = compose_cfg(base + [f"batch.micro_size={micro}", f"batch.global_size={micro}", "budget.max_steps=2"])
    try:
        plain(cfg, 0)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        free()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def environment() -> dict:
    import deepspeed
    import lightning
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
           "transformers": transformers.__version__, "deepspeed": deepspeed.__version__}
    if torch.cuda.is_available():
        env |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="one GPU, bf16, seq 2048, the paper's models")
    parser.add_argument("--models", default="350m,1.3b", help="with --gpu: model configs to measure")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="with --gpu: see above")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=None, help="plain/harness alternations per variant")
    parser.add_argument("--micro", type=int, default=0, help="with --gpu: micro-batch (0: the largest that fits)")
    parser.add_argument("--accumulate", type=int, default=4, help="with --gpu: micro-batches per optimizer step")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args, overrides = parser.parse_known_args()
    register_configs()
    common = common_overrides()
    env = environment()
    print(json.dumps(env))
    results = []
    if not args.gpu:  # the CPU measurement of the loop's overhead (BENCHMARKS.md)
        steps, warmup, rounds = args.steps or 40, args.warmup or 5, args.rounds or 3
        cfg = compose_cfg(common + [f"budget.max_steps={steps}", f"callbacks.checkpoint.every_n_train_steps={steps * 10}",
                                    *overrides])
        record(results, measure(cfg, cfg.model.name, "cpu", warmup, rounds, harness_only=False), env, args.json)
    else:
        steps, warmup, rounds = args.steps or 14, args.warmup or 4, args.rounds or 1
        for model in args.models.split(","):
            # The paper's tokenizer size (51,200) from a local BPE: hub-free, same embedding and LM-head cost.
            base = common + [f"model={model}", "trainer=gpu", "data.seq_len=2048", "tokenizer.vocab_size=51200",
                             "tokenizer.name=bench-bpe51k", f"budget.max_steps={steps}",
                             f"callbacks.checkpoint.every_n_train_steps={steps * 10}", *overrides]
            micro = args.micro
            if not micro:
                micro = 1
                while fits(base, micro * 2):
                    micro *= 2
                print(f"model={model}: largest micro-batch that fits: {micro}", flush=True)
            sized = base + [f"batch.micro_size={micro}", f"batch.global_size={micro * args.accumulate}"]
            for variant in args.variants.split(","):
                if "fused_ce" in variant or variant == "best":
                    try:
                        import liger_kernel  # noqa: F401
                    except ImportError:
                        print(f"{variant}: skipped (liger-kernel is not installed)", flush=True)
                        continue
                cfg = compose_cfg(sized + VARIANTS[variant])
                try:
                    result = measure(cfg, model, variant, warmup, rounds, harness_only=variant.startswith("zero"))
                except Exception:  # one variant that breaks (a compiler, a kernel) leaves the others measured
                    traceback.print_exc()
                    print(f"{model} {variant}: FAILED (traceback above)", flush=True)
                    free()
                    continue
                record(results, result, env, args.json)
    print(f"\nenvironment: {env}")
    print(TABLE_HEAD)
    for r in results:
        print(row(r))


TABLE_HEAD = ("| model | variant | micro × accum | train.py tok/s | MFU | plain tok/s | train.py / plain | data wait "
              "| peak memory |\n|---|---|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "–"
    plain_rate = f"{r['plain_tokens_per_s']:,.0f}" if r["plain_tokens_per_s"] else "–"
    ratio = f"{r['ratio']:.3f}" if r["ratio"] else "–"
    memory = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "–"
    if r.get("estimated_memory_gib") is not None:  # phi1.memory's, which the run's start logs
        memory += f" (est. {r['estimated_memory_gib']:.1f})"
    return (f"| {r['model']} | {r['variant']} | {r['micro']} × {r['accumulate']} | {r['tokens_per_s']:,.0f} | {mfu} "
            f"| {plain_rate} | {ratio} | {r['data_wait']:.2%} | {memory} |")


def record(results: list[dict], result: dict, env: dict, path: Path | None) -> None:
    """Print the result's row and rewrite the JSON at once: a run stopped by its time limit (a lent GPU's 10
    minutes a command) keeps every measurement it finished."""
    results.append(result)
    print(row(result), flush=True)
    if path:
        path.write_text(json.dumps({"environment": env, "results": results}, indent=2))


def measure(cfg, model: str, variant: str, warmup: int, rounds: int, harness_only: bool) -> dict:
    tokens = cfg.batch.global_size * cfg.data.seq_len
    runs: dict[str, list[float]] = {"plain": [], "harness": []}
    memory = None
    waits = []
    for r in range(rounds):
        for name, fn in (("plain", plain), ("harness", harness)):
            if name == "plain" and harness_only:
                continue
            free()
            runs[name].append(fn(cfg, warmup) * tokens)
            if name == "harness":
                waits.append(data_wait_share(warmup))
                if torch.cuda.is_available():
                    memory = torch.cuda.max_memory_allocated() / 2**30
            print(f"{model} {variant} round {r + 1}: {name:8s} {runs[name][-1]:,.0f} tokens/s", file=sys.stderr,
                  flush=True)
    rate = statistics.median(runs["harness"])
    plain_rate = statistics.median(runs["plain"]) if runs["plain"] else None
    with torch.device("meta"):  # for its FLOPs per token only
        flops_per_token = LanguageModel(OmegaConf.to_container(cfg, resolve=True), 1, 1).flops_per_token
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    peak = None
    if device.type == "cuda":  # the peak Throughput uses for perf/mfu
        from lightning.fabric.utilities.throughput import get_available_flops

        precision = str(cfg.trainer.precision)
        dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else torch.float32
        peak = dense_peak_flops(device, precision) or get_available_flops(device, dtype)
    return {"model": model, "variant": variant, "micro": cfg.batch.micro_size,
            "accumulate": cfg.batch.global_size // cfg.batch.micro_size, "seq_len": cfg.data.seq_len,
            "tokens_per_s": rate, "plain_tokens_per_s": plain_rate, "ratio": rate / plain_rate if plain_rate else None,
            "flops_per_token": flops_per_token, "peak_flops": peak,
            "mfu": rate * flops_per_token / peak if peak else None, "peak_memory_gib": memory,
            "estimated_memory_gib": estimated_memory(cfg) if device.type == "cuda" else None,
            "data_wait": statistics.median(waits),
            "runs": runs}


def estimated_memory(cfg) -> float | None:
    """phi1.memory's estimate of the run's peak (states and activations, GiB): each row checks it anew."""
    from phi1 import memory

    params, vocab = memory._size(cfg)
    need = memory.gpu_estimate(cfg, 1, params, vocab)
    return (need.states + need.activations) / 2**30 if need else None


if __name__ == "__main__":
    main()
