"""Training steps/s of train.py's Lightning loop vs a plain PyTorch loop, same model, data and optimizer.

    python bench/train_overhead.py                # embedded default: tiny model, stdlib, CPU
    python bench/train_overhead.py --steps 60 model=tiny data.seq_len=128   # extra args are Hydra overrides

Both loops do the same work per step: micro-batches from the same packed data and sampler, forward, fp32
cross-entropy, backward, gradient clipping, fused-where-possible AdamW with the warmup/decay schedule. The
harness adds what it is for: dropout reseeding for exact resume, a NaN check, logging, throughput and the
progress bar. Validation, periodic checkpoints and the HF export are switched off for the measurement. The
two loops alternate for --rounds rounds; the median of each is compared (goal: harness ≥ 0.97 × plain).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from phi1.config import plan as make_plan  # noqa: E402
from phi1.config import register_configs
from phi1.data.datamodule import PackedData, StepSampler  # noqa: E402
from phi1.module import LanguageModel, lr_lambda  # noqa: E402
from phi1.train import train  # noqa: E402


class StepTimes(Callback):
    """Wall time at the end of every optimizer step."""

    times: list[float] = []

    def on_train_batch_end(self, trainer, *args):
        if len(StepTimes.times) < trainer.global_step:
            StepTimes.times.append(time.perf_counter())


def steps_per_sec(times: list[float], warmup: int) -> float:
    return (len(times) - 1 - warmup) / (times[-1] - times[warmup])


def harness(cfg, warmup: int) -> float:
    StepTimes.times = []
    train(cfg)
    return steps_per_sec(StepTimes.times, warmup)


def plain(cfg, warmup: int) -> float:
    p = make_plan(cfg)
    data = PackedData(cfg, p)
    data.prepare_data()
    data.setup("fit")
    torch.manual_seed(cfg.seed)
    model = LanguageModel(OmegaConf.to_container(cfg, resolve=True), p.max_steps, p.accumulate).model.train()
    o = cfg.optim
    decay = [w for w in model.parameters() if w.ndim >= 2]
    no_decay = [w for w in model.parameters() if w.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=torch.cuda.is_available())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, p.max_steps, o.final_lr_ratio))
    sampler = StepSampler(len(data.train_set), cfg.seed, cfg.batch.global_size, p.max_steps, 0, 1)
    batches = iter(torch.utils.data.DataLoader(data.train_set, batch_size=cfg.batch.micro_size, sampler=sampler))
    times = []
    for _ in range(p.max_steps):
        for _ in range(p.accumulate):
            batch = next(batches)
            logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            (loss / p.accumulate).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return steps_per_sec(times, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=3)
    args, overrides = parser.parse_known_args()
    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "budget.tokens=null", f"budget.max_steps={args.steps}", "logger=csv", "val_batches=0",
            f"callbacks.checkpoint.every_n_train_steps={args.steps * 10}", "export_hf=false",
            "+callbacks.timer._target_=__main__.StepTimes", f"paths.run_dir={ROOT}/outputs/bench_train_overhead",
            *overrides,
        ])
    results = {"plain": [], "harness": []}
    for r in range(args.rounds):
        for name, fn in (("plain", plain), ("harness", harness)):
            results[name].append(fn(cfg, args.warmup))
            print(f"round {r + 1}: {name:8s} {results[name][-1]:.3f} steps/s", file=sys.stderr, flush=True)
    p, h = (statistics.median(results[k]) for k in ("plain", "harness"))
    tokens = cfg.batch.global_size * cfg.data.seq_len
    print(f"model={cfg.model.name} batch={cfg.batch.global_size}x{cfg.data.seq_len} threads={torch.get_num_threads()}"
          f" steps={args.steps} (first {args.warmup} untimed) rounds={args.rounds}")
    print(f"plain loop : {p:.3f} steps/s ({p * tokens:,.0f} tokens/s)  {['%.3f' % x for x in results['plain']]}")
    print(f"train.py   : {h:.3f} steps/s ({h * tokens:,.0f} tokens/s)  {['%.3f' % x for x in results['harness']]}")
    print(f"ratio train.py / plain = {h / p:.3f}  (goal >= 0.97)")


if __name__ == "__main__":
    main()
