"""The benchmark scripts that a lent GPU machine runs (bench/gpu_suite.sh), run here small on the CPU: a script
that fails after its first measurement would waste that machine's half hour. And the CPU scale benchmarks."""

import json
import os
import subprocess
import sys

from conftest import ROOT

TINY = ["tokenizer.corpus.limit=150", "data.sources.0.limit=250", "data.seq_len=64", "batch.micro_size=4",
        "batch.global_size=8"]


def test_train_speed_measures_train_py_against_the_plain_loop_round_after_round(tmp_path, data_dir):
    out = tmp_path / "speed.json"
    subprocess.run([sys.executable, "bench/train_speed.py", "--steps", "6", "--warmup", "1", "--rounds", "2",
                    "--json", str(out), *TINY, f"paths.data_dir={data_dir}", f"paths.run_dir={tmp_path}/run"],
                   cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True, capture_output=True, timeout=600)
    (result,) = json.loads(out.read_text())["results"]
    assert len(result["runs"]["harness"]) == len(result["runs"]["plain"]) == 2
    assert result["tokens_per_s"] > 0 and 0.2 < result["ratio"] < 2


def test_train_speed_deepspeed_variants_run_round_after_round(deepspeed_on_cpu, tmp_path, data_dir):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import train_speed
    finally:
        sys.path.remove(str(ROOT / "bench"))
    common = [*train_speed.common_overrides(tmp_path / "run", timer="train_speed.StepTimes"),
              f"paths.data_dir={data_dir}", "budget.max_steps=5", *TINY]
    for variant in ("zero1", "zero2"):
        cfg = train_speed.compose_cfg(common + train_speed.VARIANTS[variant] + deepspeed_on_cpu[1:])
        assert cfg.trainer.strategy.stage == int(variant[-1])
        result = train_speed.measure(cfg, "tiny", variant, warmup=1, rounds=2, harness_only=True)
        assert len(result["runs"]["harness"]) == 2 and result["tokens_per_s"] > 0


def test_train_speeds_scratch_run_lies_beside_the_runs_not_in_the_clone():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import train_speed
    finally:
        sys.path.remove(str(ROOT / "bench"))
    cfg = train_speed.compose_cfg(train_speed.common_overrides() + ["paths.output_dir=/cluster/phi1/outputs"])
    assert cfg.paths.run_dir == "/cluster/phi1/outputs/bench_train_speed"


def test_train_speed_rows_put_the_memory_estimate_beside_the_peak():
    # Each GPU row checks phi1.memory's estimate anew: phi-1 compiled at 8 × 2048 peaked at 57.2 GiB on an H100.
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import train_speed
    finally:
        sys.path.remove(str(ROOT / "bench"))
    cfg = train_speed.compose_cfg(["model=1.3b", "trainer=gpu", "batch.micro_size=8", "batch.global_size=32",
                                   "data.seq_len=2048"])
    estimate = train_speed.estimated_memory(cfg)
    assert abs(estimate - 57.2) < 0.1
    result = {"model": "1.3b", "variant": "compile", "micro": 8, "accumulate": 4, "tokens_per_s": 51630.0,
              "mfu": 0.474, "plain_tokens_per_s": None, "ratio": None, "data_wait": 0.002, "peak_memory_gib": 57.2,
              "estimated_memory_gib": estimate}
    assert train_speed.row(result).endswith("| 57.2 GiB (est. 57.2) |")


def test_eval_speed_times_each_stage_and_batching_changes_no_completion(tmp_path, data_dir):
    out = tmp_path / "eval.json"
    subprocess.run([sys.executable, "bench/eval_speed.py", "model=tiny", "--limit", "4", "--batch-sizes", "1,4",
                    "tokenizer.vocab_size=4096", "tokenizer.name=local", "tokenizer.corpus.limit=150",
                    f"paths.data_dir={data_dir}", "--json", str(out)],
                   cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True, capture_output=True, timeout=600)
    one, four = json.loads(out.read_text())["results"]
    assert (one["batch_size"], four["batch_size"]) == (1, 4)
    # Greedy decoding, left padding: a batch of 4 writes the same completions as one prompt at a time.
    assert one["completion_tokens"] == four["completion_tokens"] > 0
    assert all(r[k] > 0 for r in (one, four) for k in ("generate_s", "execute_s", "total_s"))


def test_the_compiled_training_forward_calls_sdpa_causal_without_a_mask(monkeypatch):
    # On torch < 2.14, transformers builds a (B, 1, T, T) causal mask under torch.compile (the GPU machine's
    # torch 2.11 did: cuDNN's masked path made the 1.3B step 23% slower, BENCHMARKS.md). That torch is
    # simulated here by the check transformers consults answering "do not skip the mask", as it does there.
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import attention_speed
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import transformers.masking_utils

    monkeypatch.setattr(transformers.masking_utils, "_ignore_causal_mask_sdpa", lambda *args, **kwargs: False)
    # transformers' own "sdpa" now passes a mask: the simulation holds.
    masked = attention_speed.compiled_sdpa_calls("tiny", "model.attn_implementation=sdpa")
    assert len(masked) == 4 and all("attn_mask = None" not in call and "is_causal = False" in call for call in masked)
    # The default, sdpa_causal: every layer's call (4 for model=tiny) passes is_causal and no mask, with the
    # paper's dropout.
    calls = attention_speed.compiled_sdpa_calls("tiny")
    assert len(calls) == 4
    for call in calls:
        assert "attn_mask = None" in call and "is_causal = True" in call and "dropout_p = 0.1" in call


def test_the_cpu_scale_benchmarks_run_small():
    """bench/dedup_index.py and bench/synthetic_scale.py (BENCHMARKS.md's memory numbers) at a few thousand
    documents: each checks its own outcome (every answer kept, nothing sent) and prints one JSON line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "bench/dedup_index.py", "--n", "3000"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert [json.loads(line)["index"] for line in out] == ["phi1", "datasketch"]
    out = subprocess.run([sys.executable, "bench/synthetic_scale.py", "--n", "300"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["answers"] == 300


def test_embed_speed_runs_both_batchings_on_the_same_rows(tmp_path):
    """bench/embed_speed.py (gpu_suite.sh embed): source order against length-sorted batches, the second never
    more padded, the rows the same documents' (a mix-up of rows would differ by ~1, not float noise)."""
    out = tmp_path / "embed.json"
    subprocess.run([sys.executable, "bench/embed_speed.py", "--limit", "150", "--batch-size", "4", "--max-tokens",
                    "128", "--json", str(out)], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True,
                   capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["documents"] == 150 and result["max_row_difference"] < 1e-3
    assert result["by_length"]["padding"] < result["source_order"]["padding"]
    assert result["source_order"]["docs_per_s"] > 0 and result["by_length"]["docs_per_s"] > 0
