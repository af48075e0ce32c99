"""Attention alone: PyTorch SDPA's backends (cuDNN, flash, memory-efficient) at the shapes of model=350m and
model=1.3b (heads of 64, T = 2048, bf16, causal), with the paper's attention dropout of 0.1 and without, forward
and forward + backward; then, with dropout, the two ways training may call it slower than that: q, k, v in the
head-transposed layout PhiAttention hands over, and an explicit causal mask instead of `is_causal`. First it
prints how the compiled training forward calls SDPA on this machine (torch.compile of the tiny model, the same
code path as the paper's sizes): with `attn_mask = None, is_causal = True`, or with a mask. The default
model.attn_implementation=sdpa_causal makes it the first; transformers' own "sdpa" gives a mask under compile
on torch < 2.14 (phi1/model.py).

    python bench/attention_speed.py --micro 8 --json attention.json   # one GPU (bench/gpu_suite.sh attention)
    python bench/attention_speed.py                                   # CPU: the compiled call only

TFLOP/s count the causal half only: forward 2 matmuls × 2 × B·H·T²·d / 2, forward + backward 3.5× that.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from phi1.config import register_configs  # noqa: E402
from phi1.model import build  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
SHAPES = {"350m": 16, "1.3b": 32}  # heads of 64 (conf/model)


def compiled_sdpa_calls(model: str = "tiny", *overrides: str) -> list[str]:
    """The SDPA calls in the graph torch.compile makes of the training forward (train mode, autocast as on a
    GPU), as dynamo writes them. `overrides`: Hydra's, e.g. model.attn_implementation=sdpa."""
    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", *overrides])
    torch._dynamo.reset()  # a fresh trace: dynamo otherwise reuses the graph of an earlier call
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = build(cfg.model, 256).train().to(device)
    calls: list[str] = []

    def record(gm, example_inputs):
        calls.extend(line.strip() for line in gm.code.splitlines() if "scaled_dot_product_attention" in line)
        return gm.forward

    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        torch.compile(net.forward, backend=record)(input_ids=torch.randint(0, 256, (2, 64), device=device))
    return calls


def time_ms(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def cases(p: float):
    """(backend, layout, masking) for dropout p: every backend as SDPA is best called; with dropout, also
    cuDNN and flash on the transposed layout and with an explicit mask."""
    yield from ((name, "contiguous", "is_causal") for name in BACKENDS)
    if p:
        for name in ("cudnn", "flash"):
            yield name, "transposed", "is_causal"
            yield name, "contiguous", "mask"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    calls = compiled_sdpa_calls()
    forms = sorted({", ".join(re.findall(r"(?:attn_mask|is_causal) = \w+", call)) for call in calls})
    print(f"torch {torch.__version__}: the compiled training forward calls SDPA {len(calls)} times with {forms}")
    print("   ", calls[0] if calls else "(no SDPA call in the graph)")
    out = {"torch": torch.__version__, "compiled_calls": calls, "results": []}
    if not torch.cuda.is_available():
        print("timings need a CUDA GPU")
        return
    b, t, d = args.micro, args.seq_len, 64
    out |= {"gpu": torch.cuda.get_device_name(), "micro": b, "seq_len": t}
    print(f"{out['gpu']}, micro {b}, T {t}")
    print("| model | dropout | backend | layout | masking | forward ms | TFLOP/s | fwd+bwd ms | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    mask = torch.ones(t, t, dtype=torch.bool, device="cuda").tril()[None, None].expand(b, 1, t, t)
    for model, h in SHAPES.items():
        flops = 2 * 2 * b * h * t * t * d / 2
        grad = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
        for p in (0.1, 0.0):
            for name, layout, masking in cases(p):
                shape = (b, t, h, d) if layout == "transposed" else (b, h, t, d)
                q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                if layout == "transposed":  # as PhiAttention: (B, T, H, D) viewed as (B, H, T, D)
                    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
                q, k, v = (x.requires_grad_() for x in (q, k, v))
                kw = {"attn_mask": mask} if masking == "mask" else {"is_causal": True}

                def forward():
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, **kw)

                def both():
                    forward().backward(grad)

                head = f"| {model} | {p} | {name} | {layout} | {masking} |"
                try:
                    with sdpa_kernel([BACKENDS[name]]):
                        fwd, total = time_ms(forward), time_ms(both)
                except RuntimeError as e:  # a backend that does not take these arguments
                    print(f"{head} not available: {str(e).splitlines()[0][:60]} | | | |")
                    continue
                row = {"model": model, "dropout": p, "backend": name, "layout": layout, "masking": masking,
                       "forward_ms": fwd, "total_ms": total, "forward_tflops": flops / fwd / 1e9,
                       "total_tflops": 3.5 * flops / total / 1e9}
                out["results"].append(row)
                print(f"{head} {fwd:.2f} | {row['forward_tflops']:.0f} | {total:.2f} | {row['total_tflops']:.0f} |",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
