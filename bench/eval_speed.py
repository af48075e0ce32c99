"""Evaluation speed: greedy HumanEval end to end for one model, the seconds of each stage (load, generation,
sandboxed execution, the solution NLL), with transformers at each --batch-sizes and with vLLM where installed.

    python bench/eval_speed.py --ckpt outputs/<run>/hf               # a trained model: HF folder, .ckpt, hub id
    python bench/eval_speed.py model=1.3b                            # random weights in the 1.3B shape
    python bench/eval_speed.py model=tiny --limit 16 --batch-sizes 4,16 tokenizer.vocab_size=4096 tokenizer.name=local

Goals (one H100, bf16, the 1.3B model): under 3 minutes end to end with transformers, under 30 s with vLLM.
Without --ckpt the model is train.py's `model=` config with random weights and a local 51,200-token BPE (no
hub): the same shapes, so the same time per token. Random weights seldom write a stop sequence, so nearly
every completion runs to max_new_tokens (384): close to the worst case, which a trained model (it stops at the
end of its function) only improves on. The tokens generated are printed beside the time for that reason.
Extra arguments are Hydra overrides of train.yaml for the random model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from phi1.config import SandboxConfig  # noqa: E402
from phi1.eval import benchmarks, generate  # noqa: E402
from phi1.evaluate import make_sandbox, pass_at_k, score  # noqa: E402


def random_model(overrides: list[str], out: Path) -> Path:
    """An HF folder with train.py's model config at random init and its tokenizer (trained if missing)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from phi1 import tokenizer as tokenizers
    from phi1.config import register_configs
    from phi1.export import export_hf
    from phi1.module import LanguageModel

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["tokenizer.vocab_size=51200", "tokenizer.name=bench-bpe51k",
                                           f"paths.run_dir={out}", *overrides])
    tokenizer_dir = tokenizers.ensure(cfg)
    torch.manual_seed(cfg.seed)
    module = LanguageModel(OmegaConf.to_container(cfg, resolve=True), 1, 1)
    print(f"random model: model={cfg.model.name}, {module.params['total'] / 1e6:,.0f}M parameters, "
          f"tokenizer {tokenizer_dir.name}", flush=True)
    return export_hf(module, tokenizer_dir, out / "hf")


def sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def execute(problems, outs, workers: int | None) -> tuple[float, float]:
    """(seconds, pass@1) of running every completion in the sandbox, start-up included."""
    t0 = time.perf_counter()
    sandbox = make_sandbox(SandboxConfig(workers=workers))
    try:
        _, verdicts = score(sandbox, problems, {p.task_id: o for p, o in zip(problems, outs)})
    finally:
        sandbox.close()
    return time.perf_counter() - t0, pass_at_k(verdicts, [1])[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="a trained model; default: random weights (see above)")
    parser.add_argument("--backends", default="transformers,vllm", help="vllm is skipped where not installed")
    parser.add_argument("--batch-sizes", default="16", help="transformers: prompts per generate call")
    parser.add_argument("--limit", type=int, default=None, help="the first N problems (default: all 164)")
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--workers", type=int, default=None, help="sandbox workers (default: one per core)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args, overrides = parser.parse_known_args()

    problems = benchmarks.humaneval()[: args.limit]
    prompts = [p.prompt for p in problems]
    kwargs = dict(n=1, temperature=0.0, top_p=1.0, max_new_tokens=args.max_new_tokens, stop=generate.HUMANEVAL_STOP)
    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "cores": os.cpu_count(), "problems": len(problems)}
    print(json.dumps(env), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or str(random_model(overrides, Path(tmp)))
        backends = args.backends.split(",")
        if "transformers" in backends:
            t0 = sync()
            model, tokenizer = generate.load(ckpt)
            # One short batch first (CUDA context, cuBLAS handles, allocator), counted in the load time, so
            # that the first batch size measured is not charged for it.
            generate.generate(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=8, stop=[])
            load = sync() - t0
            t0 = sync()
            generate.solution_nll(model, tokenizer, problems)
            nll = sync() - t0
            for batch_size in map(int, args.batch_sizes.split(",")):
                t0 = sync()
                outs = generate.generate(model, tokenizer, prompts, batch_size=batch_size, **kwargs)
                gen = sync() - t0
                tokens = sum(len(tokenizer(o[0]).input_ids) for o in outs)
                run, passed = execute(problems, outs, args.workers)
                results.append({"backend": "transformers", "batch_size": batch_size, "load_s": load,
                                "generate_s": gen, "completion_tokens": tokens, "execute_s": run,
                                "solution_nll_s": nll, "total_s": load + gen + run + nll, "pass@1": passed})
            del model
        if "vllm" in backends:
            if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
                print("vllm: skipped (needs the vllm package and a GPU)", flush=True)
            else:
                from transformers import AutoTokenizer

                t0 = sync()
                outs = generate.generate_vllm(ckpt, prompts, **kwargs)  # the engine's start-up included
                gen = sync() - t0
                tokenizer = AutoTokenizer.from_pretrained(ckpt)
                tokens = sum(len(tokenizer(o[0]).input_ids) for o in outs)
                run, passed = execute(problems, outs, args.workers)
                results.append({"backend": "vllm", "batch_size": None, "load_s": None, "generate_s": gen,
                                "completion_tokens": tokens, "execute_s": run, "solution_nll_s": None,
                                "total_s": gen + run, "pass@1": passed})

    print(f"\n{len(problems)} HumanEval problems, greedy, max_new_tokens={args.max_new_tokens}; {env}")
    print("| backend | batch | load | generate | completion tokens | tokens/s | execute | solution NLL | total "
          "| pass@1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        def s(key):
            return f"{r[key]:.1f} s" if r[key] is not None else "–"
        print(f"| {r['backend']} | {r['batch_size'] or '–'} | {s('load_s')} | {s('generate_s')} "
              f"| {r['completion_tokens']:,} | {r['completion_tokens'] / r['generate_s']:,.0f} | {s('execute_s')} "
              f"| {s('solution_nll_s')} | {s('total_s')} | {r['pass@1']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "ckpt": args.ckpt, "results": results}, indent=2))


if __name__ == "__main__":
    main()
