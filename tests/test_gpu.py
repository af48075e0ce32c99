"""On a CUDA GPU (skipped elsewhere): bf16 and DeepSpeed ZeRO-2 runs agree with the CPU fp32 run on the tiny
model, a DeepSpeed checkpoint resumes into the uninterrupted run (also one saved on SIGTERM), the fused
cross-entropy is the loss, and debug=profile records the GPU's kernels."""

import json

import pytest
import torch

from conftest import requires_cuda
from phi1.checkpoints import read_checkpoint
from phi1.module import LanguageModel
from phi1.train import train

pytestmark = [requires_cuda, pytest.mark.cuda]

# No dropout (the CPU and CUDA generators differ), no evaluation: only the optimization is compared.
SAME = ["model.dropout=0", "optim.warmup_steps=3", "budget.max_steps=8", "evaluation.enabled=false",
        "callbacks.checkpoint.every_n_train_steps=4", "callbacks.checkpoint.save_top_k=-1"]


def test_gpu_and_deepspeed_losses_match_the_cpu_fp32_run(small_cfg, tmp_path):
    cpu = train(small_cfg(*SAME, run_dir=tmp_path / "cpu"))
    gpu = train(small_cfg(*SAME, "trainer=gpu", run_dir=tmp_path / "gpu"))
    zero2 = train(small_cfg(*SAME, "trainer=deepspeed_bf16", "trainer.devices=1", "trainer.num_nodes=1",
                            run_dir=tmp_path / "zero2"))
    for run in (gpu, zero2):  # bf16 matmuls: ~3 significant digits per step, compounding over 8 steps
        assert run["train/loss_first"] == pytest.approx(cpu["train/loss_first"], rel=1e-2)
        assert run["train/loss"] == pytest.approx(cpu["train/loss"], rel=3e-2)
        assert run["train/loss"] < run["train/loss_first"] - 0.1


def test_deepspeed_resumes_from_its_checkpoint_into_the_uninterrupted_run(small_cfg, tmp_path):
    deepspeed = ["trainer=deepspeed_bf16", "trainer.devices=1", "trainer.num_nodes=1"]
    whole = train(small_cfg(*SAME, *deepspeed, run_dir=tmp_path / "whole"))
    halfway = tmp_path / "whole" / "checkpoints" / "step000004.ckpt"
    assert halfway.is_dir()  # DeepSpeed writes a folder of shards
    resumed = train(small_cfg(*SAME, *deepspeed, f"ckpt_path={halfway}", run_dir=tmp_path / "resumed"))
    assert resumed["steps"] == whole["steps"] == 8
    assert resumed["train/loss"] == pytest.approx(whole["train/loss"], rel=1e-3)


def test_sigterm_saves_a_deepspeed_run_that_resumes_to_its_end(small_cfg, tmp_path):
    deepspeed = ["trainer=deepspeed_bf16", "trainer.devices=1", "trainer.num_nodes=1"]
    signal_at_2 = ["+callbacks.signal._target_=slow_steps.SignalAt", "+callbacks.signal.step=2",
                   "+callbacks.signal.name=SIGTERM"]
    with pytest.raises(SystemExit, match="stopped by SIGTERM after step 3"):
        train(small_cfg(*SAME, *deepspeed, *signal_at_2, run_dir=tmp_path / "run"))
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3
    resumed = train(small_cfg(*SAME, *deepspeed, "ckpt_path=last", run_dir=tmp_path / "run"))
    assert resumed["steps"] == 8


def test_debug_profile_records_the_gpu_kernels(small_cfg, tmp_path):
    train(small_cfg(*SAME, "trainer=gpu", "debug=profile", "callbacks.profile.first_step=2",
                    "callbacks.profile.steps=2", run_dir=tmp_path / "run"))
    events = json.loads((tmp_path / "run" / "profile" / "trace-rank0.json").read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)
    assert "Self CUDA" in (tmp_path / "run" / "profile" / "ops-rank0.txt").read_text()


def test_fused_cross_entropy_is_the_pytorch_loss(small_cfg):
    pytest.importorskip("liger_kernel")
    from omegaconf import OmegaConf

    plain_cfg = OmegaConf.to_container(small_cfg("trainer=gpu"), resolve=True)
    fused_cfg = OmegaConf.to_container(small_cfg("trainer=gpu", "speed.fused_cross_entropy=true"), resolve=True)
    torch.manual_seed(0)
    plain = LanguageModel(plain_cfg, 10, 1).cuda().eval()
    fused = LanguageModel(fused_cfg, 10, 1).cuda().eval()
    fused.load_state_dict(plain.state_dict())
    batch = torch.randint(0, plain.model.config.vocab_size, (4, 65), device="cuda")
    losses = [m._loss(batch) for m in (plain, fused)]
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-4)
    grads = []
    for m, loss in zip((plain, fused), losses):
        loss.backward()
        grads.append(m.model.lm_head.weight.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("trainer", ["trainer=gpu", "trainer=deepspeed_bf16"])
def test_training_on_a_gpu_is_compiled_by_default(small_cfg, tmp_path, monkeypatch, trainer):
    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **kw: compiled.append(fn) or real(fn, *a, **kw))
    extra = ["trainer.devices=1", "trainer.num_nodes=1"] if "deepspeed" in trainer else []
    train(small_cfg(*SAME, trainer, *extra, "budget.max_steps=2", run_dir=tmp_path / "run"))
    assert len(compiled) == 2  # the forward for the logits, and the one for the hidden states (fused CE)


def test_a_training_step_reads_the_gpu_back_once(small_cfg, tmp_path, monkeypatch):
    # Every host read of a GPU tensor waits for the GPU, which then idles while Python runs the hooks: once
    # per optimizer step (the loss check), not after every micro-batch (Lightning reads its progress-bar
    # metrics back after each one, which are on the GPU when self.log is given numbers).
    reads = []
    real = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: (reads.append(self.device.type), real(self))[1])
    cfg = small_cfg(*SAME, "trainer=gpu", "budget.max_steps=6", "val_batches=0", run_dir=tmp_path / "run")
    train(cfg)
    assert cfg.batch.global_size // cfg.batch.micro_size >= 2
    assert reads.count("cuda") == 6


def test_compiled_activation_checkpointing_is_the_same_training_in_less_memory(small_cfg, tmp_path):
    """speed.activation_checkpointing under torch.compile (the GPU default): the losses of the plain compiled run,
    and a lower peak of GPU memory at a micro-batch whose activations dominate."""
    runs = {}
    for on in (False, True):
        torch.cuda.reset_peak_memory_stats()
        runs[on] = train(small_cfg(*SAME, "trainer=gpu", "batch.micro_size=8", "model=tiny_wide",
                                   f"speed.activation_checkpointing={str(on).lower()}", run_dir=tmp_path / str(on)))
        runs[on]["peak"] = torch.cuda.max_memory_allocated()
    assert runs[True]["train/loss"] == pytest.approx(runs[False]["train/loss"], rel=1e-2)
    assert runs[True]["peak"] < runs[False]["peak"]


def test_a_micro_batch_past_the_gpus_memory_raises_torchs_error_after_the_advice(small_cfg, tmp_path, caplog):
    """A real CUDA out-of-memory, through Lightning and the compiled model: the logits of 512 × 8192 tokens over
    the 4,096-token vocabulary are 34 GB in bf16 (69 GB as the loss's fp32), and their gradient as much again."""
    total = torch.cuda.mem_get_info()[1]
    micro = 512 if total < 100e9 else 1024  # an H200's 141 GB takes more to exhaust
    try:
        with pytest.raises(torch.OutOfMemoryError):
            train(small_cfg(*SAME, "trainer=gpu", "data.seq_len=8192", f"batch.global_size={micro}",
                            f"batch.micro_size={micro}", "model.max_seq_len=8192", run_dir=tmp_path / "run"))
    finally:  # the CUDA tests after this one, in the same process, get the memory back
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    advice = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("out of GPU memory"))
    assert f"micro-batch of {micro} × 8192 tokens on a" in advice and f"batch.micro_size={micro // 2}" in advice


def test_the_memory_estimate_meets_a_real_compiled_run(small_cfg, tmp_path, caplog):
    """phi1.memory's GPU formula, fitted on phi-1 and phi-1-small at 2048 tokens, against the peak of a whole
    compiled run of another shape: tiny_wide (4 layers of 256, a 4,096-token vocabulary) at 8 × 1024 tokens."""
    from phi1 import memory

    cfg = small_cfg(*SAME, "trainer=gpu", "model=tiny_wide", "data.seq_len=1024", "batch.global_size=16",
                    "batch.micro_size=8", "budget.max_steps=2", run_dir=tmp_path / "run")
    torch.cuda.reset_peak_memory_stats()
    with caplog.at_level("INFO", logger="phi1.memory"):
        metrics = train(cfg)
    peak = torch.cuda.max_memory_allocated()
    assert metrics["perf/peak_memory_gib"] * 2**30 <= peak  # logged along the way: the evaluation's last
    params, vocab = memory._size(cfg)
    need = memory.gpu_estimate(cfg, 1, params, vocab)
    assert 0.75 < (need.states + need.activations) / peak < 1.33, (need, peak)
    assert "a micro-batch of 8 × 1024 tokens needs" in caplog.text
