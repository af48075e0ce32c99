"""The paper's configs train under DeepSpeed ZeRO-2 (`trainer=deepspeed`): its strategy, engine, optimizer and
checkpoint folders, run here on the CPU (the `deepspeed_on_cpu` fixture), against plain Lightning training.
tests/test_gpu.py repeats the comparison in bf16 on a GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SMALL
from deepspeed_cpu import OVERRIDES
from phi1.checkpoints import read_checkpoint
from phi1.eval import generate
from phi1.export import export_checkpoint
from phi1.module import LanguageModel
from phi1.train import train
from test_train import FAST, column, read_csv, scripted_scores, untimed

# Gradient accumulation 2 (8 sequences, micro-batch 4) and clipping at 1.0: the tiny model's gradient norms are
# 1.2-2.1 over these steps, so every step is clipped and the clipping threshold shows in the losses.
PLAIN = [*FAST, "evaluation.enabled=false", "callbacks.checkpoint.save_top_k=-1"]


@pytest.fixture
def zero2(deepspeed_on_cpu, small_cfg, tmp_path):
    """A 12-step ZeRO-2 run with a checkpoint folder every 4 steps."""
    run = tmp_path / "zero2"
    return run, train(small_cfg(*PLAIN, *deepspeed_on_cpu, run_dir=run))


def test_zero2_takes_the_steps_of_plain_training(zero2, small_cfg, tmp_path):
    run, metrics = zero2
    plain = train(small_cfg(*PLAIN, run_dir=tmp_path / "plain"))
    ours, theirs = column(read_csv(run), "train/loss"), column(read_csv(tmp_path / "plain"), "train/loss")
    assert sorted(ours) == sorted(theirs) == list(range(12))
    # The step's loss is the mean over its micro-batches (DeepSpeed calls the optimizer hooks after each one), and
    # the gradient is the mean too: Lightning divides the loss by the accumulation and DeepSpeed's backward
    # divided it again, which halved the gradient norm here, so clipping at 1.0 clipped at 2.0.
    assert [ours[s] for s in range(12)] == pytest.approx([theirs[s] for s in range(12)], rel=2e-5)
    assert metrics["train/loss_first"] == pytest.approx(plain["train/loss_first"], rel=1e-6)
    assert (run / "checkpoints" / "step000004.ckpt" / "latest").is_file()  # a folder of ZeRO shards


def test_zero2_in_bf16_follows_the_fp32_run_and_keeps_fp32_master_weights(deepspeed_on_cpu, small_cfg, tmp_path):
    """trainer=deepspeed_bf16's precision (the H100 config): bf16 weights for the matmuls, fp32 master weights in
    the optimizer shards, which read_checkpoint gathers; the weights the engine computes with are their bf16
    rounding."""
    fp32 = train(small_cfg(*PLAIN, "model.dropout=0", run_dir=tmp_path / "fp32"))
    run = tmp_path / "bf16"
    bf16 = train(small_cfg(*PLAIN, "model.dropout=0", *deepspeed_on_cpu, "trainer.precision=bf16-mixed", run_dir=run))
    # The bf16 engine's loss of a micro-batch is a bf16 number, and at ~8.3 (ln 4096) those are 1/16 apart (0.75%):
    # within two such steps. The first step's mean is 8.406 with torch's CPU wheel, 8.4375 with its PyPI (CUDA)
    # wheel on the same CPU, the fp32 loss 8.354.
    assert bf16["train/loss_first"] == pytest.approx(fp32["train/loss_first"], abs=2 / 16)
    assert bf16["train/loss"] == pytest.approx(fp32["train/loss"], rel=3e-2)
    master = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert {v.dtype for v in master.values()} == {torch.float32}
    from transformers import AutoModelForCausalLM

    computed = AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(master[f"model.{k}"].to(torch.bfloat16), v) for k, v in computed.items())
    assert not all(torch.equal(master[f"model.{k}"], v.float()) for k, v in computed.items())


def test_a_zero2_run_resumes_from_its_checkpoint_folder_into_the_uninterrupted_run(zero2, deepspeed_on_cpu,
                                                                                    small_cfg, tmp_path):
    run, whole = zero2
    halfway = run / "checkpoints" / "step000004.ckpt"
    resumed_dir = tmp_path / "resumed"
    resumed = train(small_cfg(*PLAIN, *deepspeed_on_cpu, f"ckpt_path={halfway}", run_dir=resumed_dir))
    assert resumed["steps"] == whole["steps"] == 12
    ours, theirs = column(read_csv(resumed_dir), "train/loss"), column(read_csv(run), "train/loss")
    assert sorted(ours) == list(range(4, 12))
    assert [ours[s] for s in ours] == pytest.approx([theirs[s] for s in ours], rel=1e-6)
    numbers = {k: v for k, v in untimed(whole).items() if isinstance(v, (int, float))}
    assert {k: resumed[k] for k in numbers} == pytest.approx(numbers, rel=1e-6)  # train/loss_first included
    assert untimed(resumed).keys() == untimed(whole).keys()
    assert (resumed["data/pack"], resumed["data/train_sha256"]) == (whole["data/pack"], whole["data/train_sha256"])
    # From the folder of its final step: nothing to train, and the metrics the finished run wrote.
    last = run / "checkpoints" / "last.ckpt"
    again = train(small_cfg(*PLAIN, *deepspeed_on_cpu, f"ckpt_path={last}", run_dir=tmp_path / "again"))
    assert untimed(again) == untimed(whole)


def test_a_checkpoint_resumes_only_under_the_layout_that_wrote_it(zero2, deepspeed_on_cpu, small_cfg, tmp_path):
    """A ZeRO folder resumed without DeepSpeed or on another number of ranks, and a plain file resumed under
    DeepSpeed, each failed after the model was built and the data packed: IsADirectoryError from torch.load,
    DeepSpeed's "used a DP world size of 2 but the current world size is 1", a folder without 'latest'. Now
    each is refused before any work, saying how to resume it and how to start from its weights instead."""
    from phi1.errors import InputError

    folder = zero2[0] / "checkpoints" / "step000004.ckpt"
    plain = tmp_path / "plain"
    train(small_cfg(*PLAIN, "budget.max_steps=4", run_dir=plain))
    refused = tmp_path / "refused"
    for overrides, message in [
        ([f"ckpt_path={folder}"], "is DeepSpeed's folder of ZeRO shards, and this run is not under DeepSpeed"),
        ([*deepspeed_on_cpu, "trainer.devices=2", f"ckpt_path={folder}"],
         "holds ZeRO optimizer shards written by 1 rank, and this run has 2 ranks"),
        ([*deepspeed_on_cpu, f"ckpt_path={plain / 'checkpoints' / 'last.ckpt'}"],
         "is the checkpoint file of a run without DeepSpeed, and this run is under DeepSpeed"),
    ]:
        with pytest.raises(InputError, match=message) as e:
            train(small_cfg(*PLAIN, *overrides, run_dir=refused))
        assert "init_from=" in str(e.value) and not refused.exists()


def test_zero2_checkpoint_folders_load_wherever_a_checkpoint_is_taken(zero2, small_cfg, tmp_path):
    """init_from, evaluate.py's ckpt and the HF export read DeepSpeed's folder as they read a file: the run's
    final weights, as its own HF export holds them."""
    from transformers import AutoModelForCausalLM

    run, _ = zero2
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir()
    final = AutoModelForCausalLM.from_pretrained(run / "hf").state_dict()
    exported = AutoModelForCausalLM.from_pretrained(export_checkpoint(last, tmp_path / "hf")).state_dict()
    evaluated, _ = generate.load(str(last), device="cpu")
    initialised = LanguageModel.from_checkpoint(run / "checkpoints" / "step000012.ckpt")
    initialised.load_weights(str(last))
    for weights in (exported, evaluated.state_dict(), initialised.model.state_dict()):
        assert weights.keys() == final.keys()
        assert all(torch.equal(weights[k], final[k]) for k in final)
    assert read_checkpoint(last)["global_step"] == 12


def test_a_zero2_finetune_keeps_and_exports_its_best_checkpoint(deepspeed_on_cpu, small_cfg, tmp_path, monkeypatch):
    """The paper's finetuning protocol under DeepSpeed: best.ckpt is a folder, and the export holds its weights."""
    seen = scripted_scores(monkeypatch, [0.1, 0.3, 0.2])
    run = tmp_path / "ft"
    metrics = train(small_cfg(*FAST, *deepspeed_on_cpu, "evaluation.every_n_steps=4",
                              "evaluation.allow_code_execution=true", "evaluation.generation.max_new_tokens=4",
                              "evaluation.benchmarks.humaneval.limit=2", "evaluation.keep_best=eval/humaneval/pass@1",
                              run_dir=run))
    assert metrics["eval/best"] == {"step": 8, "eval/humaneval/pass@1": 0.3}
    assert (run / "checkpoints" / "best.ckpt").is_dir()
    assert read_checkpoint(run / "checkpoints" / "best.ckpt")["global_step"] == 8
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run / "hf").state_dict()
    assert all(torch.equal(exported[k], seen[0.3][k]) for k in exported)
    history = json.loads((run / "eval" / "history.json").read_text())
    assert [h["step"] for h in history] == [4, 8, 12]


def test_a_kill_mid_save_leaves_the_previous_zero2_checkpoint_whole(zero2, deepspeed_on_cpu, small_cfg, tmp_path,
                                                                     monkeypatch):
    """Killed while writing last.ckpt at step 8, between the model states and the optimizer shard: last.ckpt is
    still step 4's, whole, and the run resumes from it into the uninterrupted run."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    class Killed(Exception):
        pass

    real, saves = DeepSpeedEngine._save_zero_checkpoint, []

    def killed_at_the_second_last_save(self, save_path, tag):
        saves.append(str(save_path))
        if sum(s.endswith("last.ckpt") for s in saves) == 2:
            raise Killed
        return real(self, save_path, tag)

    run = tmp_path / "killed"
    monkeypatch.setattr(DeepSpeedEngine, "_save_zero_checkpoint", killed_at_the_second_last_save)
    with pytest.raises(Killed):
        train(small_cfg(*PLAIN, *deepspeed_on_cpu, run_dir=run))
    monkeypatch.setattr(DeepSpeedEngine, "_save_zero_checkpoint", real)
    last, step4 = (read_checkpoint(run / "checkpoints" / name) for name in ("last.ckpt", "step000004.ckpt"))
    assert last["global_step"] == 4
    assert all(torch.equal(last["state_dict"][k], v) for k, v in step4["state_dict"].items())

    resumed = train(small_cfg(*PLAIN, *deepspeed_on_cpu, "ckpt_path=last", run_dir=run))
    assert resumed["steps"] == 12
    assert resumed["train/loss"] == pytest.approx(zero2[1]["train/loss"], rel=1e-6)
    folder = run / "checkpoints" / "last.ckpt"
    tags = [p.name for p in folder.iterdir() if p.is_dir()]  # the cut save's folder is gone
    assert tags == [(folder / "latest").read_text()] and tags[0].startswith("step000012-")


def test_a_last_checkpoint_cut_in_its_first_save_names_the_whole_ones(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from phi1.errors import MissingInputError
    from phi1.train import resolve_ckpt_path

    (tmp_path / "last.ckpt" / "step000008-2").mkdir(parents=True)  # shards begun, no `latest` yet
    (tmp_path / "step000008.ckpt" / "step000008-1").mkdir(parents=True)
    (tmp_path / "step000008.ckpt" / "latest").write_text("step000008-1")
    callbacks = [ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    for how in ("last", "auto"):  # auto would have started afresh over the run's checkpoints
        with pytest.raises(MissingInputError, match=r"last.ckpt is unfinished.*step000008.ckpt"):
            resolve_ckpt_path(how, callbacks)
    with pytest.raises(MissingInputError, match="not a checkpoint"):
        resolve_ckpt_path(str(tmp_path / "last.ckpt"), callbacks)
    assert resolve_ckpt_path(str(tmp_path / "step000008.ckpt"), callbacks) == str(tmp_path / "step000008.ckpt")


def test_two_zero2_ranks_take_the_steps_of_one_plain_process(tmp_path, data_dir):
    """The paper's layout in small: ZeRO-2 over 2 CPU processes (optimizer state sharded in two), micro-batch
    2 × accumulation 2, against plain training in 1 process with micro-batch 4. Without dropout every step
    consumes the same 8 sequences, so the losses agree to float rounding; the two shards gather into the weights
    exported."""
    from transformers import AutoModelForCausalLM

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    common = [*SMALL, *FAST, "budget.max_steps=8", "model.dropout=0", "evaluation.enabled=false",
              f"paths.output_dir={tmp_path}", f"paths.data_dir={data_dir}"]
    subprocess.run([sys.executable, "train.py", *common, "run_name=one"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    # The paper's finetuning protocol on the two ranks: evaluations they share, the best kept (a tie at pass@1
    # 0 keeps step 4's) and exported.
    evaluation = ["evaluation.enabled=true", "evaluation.allow_code_execution=true", "evaluation.every_n_steps=4",
                  "evaluation.generation.max_new_tokens=8", "evaluation.keep_best=eval/humaneval/pass@1"]
    subprocess.run([sys.executable, "tests/deepspeed_cpu.py", *common, *OVERRIDES, "trainer.devices=2",
                    "batch.micro_size=2", "run_name=two", *evaluation], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    one, two = (column(read_csv(tmp_path / name), "train/loss") for name in ("one", "two"))
    assert len(one) == len(two) == 8
    assert [two[s] for s in one] == pytest.approx([one[s] for s in one], rel=1e-5)
    last = tmp_path / "two" / "checkpoints" / "last.ckpt"
    assert len(list(last.glob("*/zero_pp_rank_*_optim_states.pt"))) == 2
    history = json.loads((tmp_path / "two" / "eval" / "history.json").read_text())
    assert [(h["step"], h["eval/humaneval/samples"]) for h in history] == [(4, 4), (8, 4)]
    best = read_checkpoint(tmp_path / "two" / "checkpoints" / "best.ckpt")
    assert best["global_step"] == 4
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "hf").state_dict()
    assert all(torch.equal(best["state_dict"][f"model.{k}"], v) for k, v in exported.items())


def test_a_signal_to_one_zero2_rank_saves_the_same_step_on_both(tmp_path, data_dir):
    """Slurm signals every task, but not at the same instant: rank 1 alone gets SIGTERM mid-way through step 3.
    The ranks agree at the step's end, both write their shards of step 3 into last.ckpt and stop; the two-rank
    run resumes from that folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "tests")}
    command = [sys.executable, "tests/deepspeed_cpu.py", *SMALL, *FAST, *OVERRIDES, "budget.max_steps=8",
               "evaluation.enabled=false", "trainer.devices=2", "batch.micro_size=2", f"paths.output_dir={tmp_path}",
               f"paths.data_dir={data_dir}", "run_name=two"]
    signal_rank_1 = ["+callbacks.signal._target_=slow_steps.SignalAt", "+callbacks.signal.step=2",
                     "+callbacks.signal.name=SIGTERM", "+callbacks.signal.rank=1"]
    stopped = subprocess.run([*command, *signal_rank_1], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert stopped.returncode == 1, stopped.stderr[-2000:]
    assert "stopped by a signal to another rank after step 3" in stopped.stderr
    last = tmp_path / "two" / "checkpoints" / "last.ckpt"
    assert len(list(last.glob("*/zero_pp_rank_*_optim_states.pt"))) == 2
    assert read_checkpoint(last)["global_step"] == 3
    resumed = subprocess.run([*command, "ckpt_path=last"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "| 3/8 [" in resumed.stdout and json.loads((tmp_path / "two" / "metrics.json").read_text())["steps"] == 8
