"""`report(cfg)`: the paper's figures and tables from our runs, the paper's numbers beside ours.

Reads every run directory under `runs_dir` (its resolved `config.yaml` and `metrics.json`, written by
train.py and evaluate.py) and, with `wandb=<entity>/<project>`, the runs logged to W&B. Writes into `out`:
  fig2_1.{png,md}     Figure 2.1: HumanEval per (model, tokens) group, one bar per training data
                      (runs of experiment scaling; the mini reproduction's runs as mini_fig2_1.*); a cell
                      run with several seeds is their mean, with each seed's value and the orderings the
                      paper claims counted seed by seed
  fig2_1_curves.png   the training and validation loss of each of those runs against the tokens it has seen
                      since its pretraining began (a finetune continues its base run's line), from the runs'
                      CSV logs (or, for a W&B run, its history)
  emergence.{png,md}  phi-1-small / phi-1-base / phi-1 on HumanEval, MBPP, unconventional (experiment emergence)
  table2.{png,md}     Table 2: unconventional-problem score and HumanEval, the paper's other models beside
  emergence_problems.md  the same runs problem by problem (paper §3): what finetuning (phi-1 against
                      phi-1-base) and scale (phi-1 against phi-1-small) changed, with completions side by side
  table3.{png,md}     Table 3: pass@1 on similar / non-similar HumanEval problems per τ (experiment pruning)
  evaluations.{png,md}  every run evaluated more than once while training (a finetune at each checkpoint,
                      paper §2.3): pass@1 and solution NLL per evaluation, the checkpoint it kept marked
  runs.{md,csv}       every finished run, of any experiment (a user's own too), one row each: what it trained
                      or evaluated, its losses, each benchmark's pass@1, solution NLL and score
  runs_curves.png     the loss curves of the runs of other experiments than the paper's, one panel each
  report.json         every number above with the runs it came from
  wandb/<run id>/     the tables of W&B runs (samples, per-problem NLLs) a per-problem number needed, downloaded once
Each table names the run behind each number; a section without runs says which command makes them.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import logging
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from phi1 import environment, errors, lock  # noqa: E402
from phi1.contamination.decontaminate import PAPER_TABLE3, pass_rates  # noqa: E402
from phi1.errors import InputError, MissingInputError, Phi1Error  # noqa: E402
from phi1.markdown import code_block  # noqa: E402

log = logging.getLogger(__name__)

# DESIGN §3. Figure 2.1's bars are numbers only in the figure's image, except the two the text gives:
# phi-1-base (1.3B on CodeTextbook, 51B tokens) 29% and phi-1 (the same finetuned on CodeExercises) 50.6%,
# drawn in the 1.3B group of the longer budget (the figure's "1.3B, 51-76B tokens" group).
PAPER_FIG21 = {("phi-1", "76b", "codetextbook"): 29.0, ("phi-1", "76b", "codeexercises"): 50.6}
# The compute the figure gives its groups (DESIGN §3, §2.3): 135 GPU-hours for 350M on 26B tokens, 1090 for
# 1.3B on 76B (the Stack+ run; phi-1-base's 51B tokens took 770).
PAPER_FIG21_GPU_HOURS = {("phi-1-small", "26b"): 135, ("phi-1", "76b"): 1090}
# Paper §2.1, the filter on its own: phi-1-small on the unfiltered Stack+ "saturates at 12.19% even after training
# for 96K steps (~200B tokens)"; on the filtered subset it reaches 17.68% after 36K steps (76B tokens).
PAPER_FILTER = {("phi-1-small", "200b", "stack"): 12.19, ("phi-1-small", "76b", "stack_filtered"): 17.68}
# (HumanEval, MBPP, unconventional score on 0-100) per model, paper §1, §3, Table 2.
PAPER_EMERGENCE = {"phi-1-small": (45.0, None, 45.0), "phi-1-base": (29.0, None, 37.0), "phi-1": (50.6, 55.5, 52.0)}
# Table 2: model -> (GPT-4 score on the 50 unconventional problems, HumanEval), both in %.
PAPER_TABLE2 = {"CodeGen-Mono-350M": (19, 13), "CodeGen-Mono-16.1B": (38, 29), "Replit": (37, 22),
                "StarCoder": (51, 34), "phi-1-base": (37, 29), "phi-1-small": (45, 45), "phi-1": (52, 51)}

# The paper's numbers are over every problem: HumanEval's 164, MBPP's 500 of its test split (ids 11-510), the 50
# unconventional problems of Table 2 (ours are 50 of the same kind, unconventional.jsonl). Ours over fewer
# (benchmarks.<b>.limit, a samples file without some, answers the grader could not grade) are marked where they
# stand beside them.
PAPER_PROBLEMS = {"humaneval": 164, "mbpp": 500, "unconventional": 50}


@dataclass(frozen=True)
class ScalingFigure:
    """A figure of one model/tokens/data grid, drawn by scaling(): its files are <stem>.md, <stem>.png and
    <stem>_curves.png."""

    title: str
    stem: str
    arms: dict  # its bars, in the paper's order, by the data a run trained on last
    paper: dict  # (model, budget, data) -> the paper's pass@1
    source: str  # where those numbers come from
    # The metric its orderings are judged by, and whether higher is better: pass@1 at the paper's scale; the
    # solution NLL at the mini scale, where pass@1 is 0 for every run.
    metric: tuple[str, bool] = ("pass@1", True)
    across_budgets: bool = False  # its claim crosses budgets (§2.1: filtered on 76B tokens beats unfiltered on 200B)
    borrows: str | None = None  # another figure's experiment whose runs of the same recipe it draws too


SCALING_FIGURES = {
    "scaling": ScalingFigure(
        "Figure 2.1: HumanEval by model, tokens seen and training data", "fig2_1",
        {"stack": "The Stack+", "codetextbook": "CodeTextbook", "codeexercises": "CodeTextbook → CodeExercises"},
        PAPER_FIG21, "the values its text gives (DESIGN §3)"),
    "mini": ScalingFigure(
        "Figure 2.1: HumanEval by model, tokens seen and training data (mini reproduction)", "mini_fig2_1",
        {"stdlib": "stdlib (unfiltered)", "stdlib_filtered": "filtered stdlib",
         "stdlib_exercises": "filtered → stdlib exercises"},
        {}, "none at this scale", metric=("solution_nll", False)),
    # filter_stack is scaling_stack at another budget, so Figure 2.1's The Stack+ cells (26b, 76b) are §2.1's
    # unfiltered arm at those budgets, drawn rather than trained again.
    "filter": ScalingFigure(
        "Paper §2.1: HumanEval on The Stack+, unfiltered and filtered by the quality classifier", "filter",
        {"stack": "The Stack+ (unfiltered)", "stack_filtered": "The Stack+, filtered"},
        PAPER_FILTER, "§2.1's text, phi-1-small unfiltered after 96K steps (200b, where it saturates) and "
        "filtered after 36K (76b)", across_budgets=True, borrows="scaling"),
}
# The experiment_name of every run a figure or table draws.
FIGURE_EXPERIMENTS = {*SCALING_FIGURES, "emergence", "pruning"}
# The evaluated run an emergence run points at (ckpt=run:<name>...) -> the paper's model name.
EMERGENCE_MODELS = {"phi1_small": "phi-1-small", "phi1_base": "phi-1-base", "phi1": "phi-1"}
# Paper §3's two comparisons: what finetuning on CodeExercises changed (phi-1 against phi-1-base, its weights
# before), and what parameters changed (phi-1 against phi-1-small, the same pipeline at 350M).
EMERGENCE_PAIRS = (("phi-1", "phi-1-base"), ("phi-1", "phi-1-small"))
COLORS = ["#f28e2b", "#8cd17d", "#2e7d32"]  # the paper's orange, light green, dark green


@dataclass
class Run:
    name: str
    config: dict
    metrics: dict
    where: str  # a run directory, or wandb:<entity>/<project>/<id>
    dir: Path | None = None
    environments: list = field(default_factory=list)  # what it ran on (phi1.environment), oldest first
    wandb_run: object = None  # a W&B run (wandb.apis.public.Run): its history holds the losses and evaluations
    cache: Path | None = None  # where a W&B run's samples tables are downloaded to (the report's folder)
    tables: dict = field(default_factory=dict)  # (benchmark, file) -> the file made of its W&B table, or None

    def losses(self) -> dict[str, list[tuple[int, float]]]:
        """The logged train/loss and val/loss as [(step, value)]: from the run dir's CSV logs, or from the W&B
        run's history (read when a figure asks for it: one request per loss per run)."""
        if self.dir is not None:
            return losses(self.dir)
        if self.wandb_run is not None:
            return wandb_losses(self.wandb_run, self.where)
        return {key: [] for key in LOSSES}

    def eval_history(self) -> list | None:
        """The evaluations made while training, [{"step", "eval/<benchmark>/<metric>": value}]: the run dir's
        eval/history.json, or the W&B run's history of the eval/ metrics its summary names."""
        if self.dir is not None:
            path = self.dir / "eval" / "history.json"
            try:
                return json.loads(path.read_text()) if path.exists() else None
            except (OSError, ValueError) as e:
                log.warning("%s: unreadable (%s: %s); left out of evaluations.png", path, type(e).__name__, e)
                return None
        if self.wandb_run is not None:
            keys = sorted(k for k in self.metrics if k.startswith("eval/") and k.endswith(EVAL_METRICS))
            return wandb_evaluations(self.wandb_run, self.where, keys) if keys else None
        return None

    def get(self, dotted: str, default=None):
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def _launched_experiment(folder: Path) -> str | None:
    """The experiment_name of a run folder's last launch, from Hydra's record of it (.hydra/<time>/config.yaml),
    which is written before the command checks anything."""
    launches = sorted(folder.glob(".hydra/*/config.yaml"))
    try:
        config = yaml.safe_load(launches[-1].read_text()) if launches else None
    except yaml.YAMLError:
        return None
    return config.get("experiment_name") if isinstance(config, dict) else None


def _failure(folder: Path) -> str | None:
    """What stopped a run folder's last launch, when it stopped on an error: the error line its log got
    (phi1.errors), if no record follows it; None for a run killed (a signal, preemption) or still to start."""
    logs = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return None
    with open(logs[-1], "rb") as f:  # its end: a long run's log can be large, and only the last record matters
        f.seek(max(0, f.seek(0, os.SEEK_END) - (64 << 10)))
        tail = f.read().decode("utf-8", "replace")
    records = [line for line in tail.splitlines() if line.startswith("[")]
    last = records[-1] if records else ""
    _, marker, reason = last.partition(f"[ERROR] - {errors.STOPPED}")
    if not marker:
        return None
    return reason if len(reason) <= 160 else reason[:157] + "..."


def unfinished_runs(runs_dir: Path) -> None:
    """The run folders left out of the report for want of a metrics.json: those running now (named with their
    lock's holder, phi1.lock), those that failed (with the error their log ends with) and those that stopped
    before their end otherwise (killed, preempted). Before, a figure drawn mid-sweep lacked its unfinished cells
    without a word."""
    running, stopped, failed = [], [], []
    # A cell of a figure's sweep that failed before writing its config (a finetune whose base cell never finished)
    # has only its log and Hydra's record of the launch: named too. Not every mistyped command's folder.
    folders = {p.parent for p in Path(runs_dir).glob("*/config.yaml")}
    folders |= {p.parent for name in ("train.log", "evaluate.log") for p in Path(runs_dir).glob(f"*/{name}")
                if _launched_experiment(p.parent) in FIGURE_EXPERIMENTS}
    for folder in sorted(folders):
        if (folder / "metrics.json").exists():
            continue
        if who := lock.holder(folder / ".lock"):
            running.append(f"{folder.name} ({who.split(': ', 1)[0]})")
        elif reason := _failure(folder):
            failed.append(f"{folder.name} ({reason})")
        elif (folder / "config.yaml").exists():
            stopped.append(folder.name)

    def listed(names: list[str], sep: str = ", ") -> str:
        return sep.join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")

    if running:
        log.info("%s running now, not in the report yet: %s", _runs(len(running)), listed(running))
    if failed:
        log.warning("%s failed, not in the report: %s. Each log's last error says what to fix; then rerun",
                    _runs(len(failed)), listed(failed, "; "))
    if stopped:
        log.warning("%s stopped before the end, not in the report: %s. Rerun each with the overrides that "
                    "started it (train.py: its overrides.yaml, and ckpt_path=last; evaluate.py: the same command)",
                    _runs(len(stopped)), listed(stopped))


def _runs(n: int) -> str:
    return "1 run" if n == 1 else f"{n} runs"


def local_runs(runs_dir: Path) -> list[Run]:
    """Every finished run under runs_dir: a folder with config.yaml and metrics.json. A folder whose files do not
    parse (edited by hand, say) is named and left out: the other runs' figures are still drawn."""
    runs = []
    for metrics_path in sorted(Path(runs_dir).glob("*/metrics.json")):
        d = metrics_path.parent
        if not (d / "config.yaml").exists():
            continue
        read = {}
        for path, load in ((d / "config.yaml", lambda p: OmegaConf.to_container(OmegaConf.load(p))),
                           (metrics_path, lambda p: json.loads(p.read_text()))):
            try:
                read[path.name] = load(path)
                if not isinstance(read[path.name], dict):
                    raise ValueError(f"a {type(read[path.name]).__name__}, not a mapping")
            except (OSError, ValueError, yaml.YAMLError) as e:
                log.warning("%s: unreadable (%s: %s); this run is left out of the report", path,
                            type(e).__name__, " ".join(str(e).split()))
                break
        else:
            config = read["config.yaml"]
            runs.append(Run(config.get("run_name", d.name), config, read["metrics.json"], str(d), d,
                            environment.read(d)))
    return runs


def wandb_runs(path: str, cache: Path | None = None) -> list[Run]:
    """Finished runs of a W&B project (train.py and evaluate.py log the resolved config under `cfg`, and
    the environment of the run's last segment under `environment`); their samples tables, when a section
    needs them, are downloaded into `cache`."""
    import wandb

    if path.count("/") != 1 or not all(path.split("/")):  # else W&B asks for a key first, and then says less
        raise Phi1Error(f"wandb={path}: expected <entity>/<project> (e.g. my-team/phi1)")
    runs = []
    try:
        for r in wandb.Api().runs(path, filters={"state": "finished"}):
            config = r.config.get("cfg", r.config)
            metrics = {k: v for k, v in r.summary.items() if isinstance(v, (int, float))}
            env = r.config.get("environment")
            runs.append(Run(config.get("run_name", r.name), config, metrics, f"wandb:{path}/{r.id}",
                            environments=[env] if isinstance(env, dict) else [], wandb_run=r,
                            cache=cache and cache / r.id))
    except wandb.errors.Error as e:  # no API key, no network, no such project: the user's to fix
        raise Phi1Error(f"wandb={path}: {e}") from e
    return runs


# What an evaluation was made with that moves its numbers (phi1.config's GenerationConfig, SandboxConfig):
# pass@1 greedy or sampled, completions cut at 384 tokens or fewer, a sample killed at 5 s or 3.
GENERATION_SETTINGS = ("generation.n", "generation.temperature", "generation.top_p", "generation.max_new_tokens",
                       "sandbox.timeout", "sandbox.memory_mb")


def evaluation_settings(run: Run) -> dict[str, str]:
    """{"evaluation generation.temperature": "0.0", ...}: a run's evaluation settings that change its pass@k
    (when it generated: code execution allowed, no samples= file) and its solution NLL (the context)."""
    prefix = "" if run.get("allow_code_execution") is not None else "evaluation."  # evaluate.py's; train.py's
    settings = {}
    if run.get(prefix + "allow_code_execution") and not run.get("samples"):
        settings.update({key: run.get(prefix + key) for key in GENERATION_SETTINGS})
        for name, spec in (run.get(prefix + "benchmarks") or {}).items():
            if isinstance(spec, dict):
                settings[f"benchmarks.{name}.stop"] = spec.get("stop")
    if run.get(prefix + "solution_nll", True) and (prefix or run.get("ckpt")):  # samples= alone: no model, no NLL
        settings["nll_context"] = run.get(prefix + "nll_context") or "the whole prompt"
    return {f"evaluation {k}": json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in settings.items()}


def _pass_at_1(runs: list[Run]) -> str:
    """How the caption names the pass@1: "greedy" only where every run that generated decoded greedily."""
    temperatures = {evaluation_settings(r).get("evaluation generation.temperature") for r in runs} - {None}
    if temperatures <= {"0", "0.0"}:
        return "pass@1 in %, greedy"
    return "pass@1 in %, sampled (generation.temperature > 0) in some runs: see Environment"


def _environment(runs: list[Run], data: dict | None = None) -> tuple[list[str], dict]:
    """The markdown lines saying what the runs behind a figure ran on and were evaluated with, and {setting: how
    it differs}: runs made with other library versions, or scored with other generation settings (pass@1
    sampled beside greedy), can differ by that alone (phi1.environment); `data`: cells whose seeds trained on
    other tokens (_mixed_data)."""
    envs = {r.name: r.environments for r in runs}
    settings = {r.name: evaluation_settings(r) for r in runs}
    diffs = {**(data or {}), **environment.differences(envs),
             **environment.count_differences({name: [s] for name, s in settings.items()})}
    recorded = [history[-1] for history in envs.values() if history]
    lines = ["", "## Environment", ""]
    if recorded:
        same = {k: v for k, v in environment.flatten(recorded[0]).items() if k not in diffs and v != "not recorded"}
        lines.append("Same in every run: " + ", ".join(f"{k} {v}" for k, v in same.items()) + ".")
    else:
        lines.append("Not recorded: the runs predate environment.json.")
    alike = {k: v for k, v in next(iter(settings.values()), {}).items() if k not in diffs}
    if alike:
        lines += ["", "Evaluated alike: " + ", ".join(f"{k.removeprefix('evaluation ')} {v}"
                                                      for k, v in alike.items()) + "."]
    if diffs:
        lines += ["", "**Not the same in every run** (numbers can differ for this reason alone):", "",
                  *(f"- {k}: {v}" for k, v in diffs.items())]
    return lines, diffs


def _mixed_data(cells: dict) -> dict[str, str]:
    """{"training data of <cell>": the packs its seeds trained on} for each cell whose seeds trained on other
    tokens (metrics.json's data/train_sha256): the filter run again with another threshold, and only new seeds
    trained on its output, averages the old data's runs with the new ones in one cell."""
    mixed = {}
    for (model, budget, data), seeds in cells.items():
        packs: dict[tuple, list] = {}
        for seed, run in _by_seed(seeds).items():
            if sha := run.metrics.get("data/train_sha256"):
                packs.setdefault((run.metrics.get("data/pack"), sha), []).append(str(seed))
        if len(packs) > 1:
            mixed[f"training data of {model}/{budget}/{data}"] = ", ".join(
                f"{pack} (seed{'s' if len(which) > 1 else ''} {', '.join(which)})"
                for (pack, _), which in packs.items())
    for cell, packs in mixed.items():
        _warn_once(f"{cell}: its seeds trained on other tokens, {packs} (the sources' files changed between their "
                   "runs), and its mean mixes them: train the seeds of the old data again (their folders moved "
                   "aside, the sweep retrains them)")
    return mixed


def _pct(v):
    return None if v is None else 100.0 * v


def _fmt(v, digits=1):
    return "–" if v is None else f"{v:.{digits}f}"


def _paper(v) -> str:
    """A number of the paper's as it gives it: 12.19, 29, 50.6."""
    return "–" if v is None else f"{v:g}"


def _of(problems: int | None, bench: str) -> str:
    """The mark ' (of 20 problems)' after a number scored on fewer problems than the paper's (PAPER_PROBLEMS)."""
    full = PAPER_PROBLEMS.get(bench)
    return f" (of {problems} problems)" if problems is not None and full and problems < full else ""


def _score_of(row: dict) -> str:
    """The mark of an unconventional score over fewer graded answers than the paper's 50."""
    return _of(row["unconventional_graded"], "unconventional") if row["unconventional_score"] is not None else ""


PARTIAL_NOTE = ("A number marked (of n problems) was scored on fewer problems than the paper's (HumanEval 164, "
                "MBPP 500, unconventional 50): not comparable with the paper's.")


def _one_each(runs: list[Run], key, what: str) -> dict:
    """{key(run): run} over the runs with a key (None: left out). Two runs with one key (a cell rerun under
    another run_name) are named, once, and the later in the runs' order (by name; W&B's after the folders) is
    drawn: the figures used to take it without a word."""
    chosen: dict = {}
    for r in runs:
        if (k := key(r)) is None:
            continue
        if k in chosen:
            _warn_once(f"{what} {k}: two runs, {chosen[k].where} and {r.where}; drawn from the latter. Move the "
                       "other out of the runs folder to choose")
        chosen[k] = r
    return chosen


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def _samples(run: Run, bench: str, file: str = "samples.jsonl") -> Path | None:
    """A benchmark's samples (or per-problem solution NLLs: file=solution_nll.jsonl) of a train run's
    evaluation: of its best checkpoint when one was kept, else the last; an evaluate.py run keeps them in
    <run>/<bench>/."""
    if run.dir is None:
        if run.wandb_run is None:
            return None
        if (bench, file) not in run.tables:
            run.tables[bench, file] = wandb_table(run, bench, file)
        return run.tables[bench, file]
    if (run.dir / bench / file).exists():
        return run.dir / bench / file
    best = run.metrics.get("eval/best")
    if isinstance(best, dict) and "step" in best:
        path = run.dir / "eval" / f"step{int(best['step']):06d}" / bench / file
        if path.exists():
            return path
    steps = sorted((run.dir / "eval").glob(f"step*/{bench}/{file}"))
    return steps[-1] if steps else None


# ------------------------------------------------------------------------------------------------ Figure 2.1

def scaling(runs: list[Run], experiment: str, out: Path) -> dict | None:
    figure = SCALING_FIGURES[experiment]
    arms = figure.arms

    def cell_of(r: Run, of: str) -> tuple | None:
        if r.get("experiment_name") == of and r.get("data.name") in arms:
            return r.get("model.name"), r.get("budget.name"), r.get("data.name"), r.get("seed")
        return None

    ours = _one_each(runs, lambda r: cell_of(r, experiment), f"{experiment} (model, tokens, data, seed)")
    if lender := figure.borrows:  # its cells of the models run here, where this figure has none
        models = {k[0] for k in ours}
        for k, r in _one_each(runs, lambda r: cell_of(r, lender), f"{lender} (model, tokens, data, seed)").items():
            if k[0] in models:
                ours.setdefault(k, r)
    cells: dict[tuple, dict] = {}  # (model, budget, data) -> {seed: run}
    for (*key, seed), r in ours.items():
        cells.setdefault(tuple(key), {})[seed] = r
    title, stem, paper = figure.title, figure.stem, figure.paper
    if not cells:
        log.info("%s (%s): no runs; make them with `python train.py +sweep=%s`", title.split(":")[0], experiment,
                 experiment)
        return None
    groups = sorted({(m, b) for m, b, _ in cells}, key=lambda g: (_group_size(cells, g), _budget(cells, g), g[1]))
    behind = [r for seeds in cells.values() for r in seeds.values()]
    rows, table = [], {}
    for m, b in groups:
        for arm, label in arms.items():
            seeds = cells.get((m, b, arm), {})
            cell = _cell(seeds)
            cell["paper_pass@1"] = paper.get((m, b, arm))
            table[f"{m}/{b}/{arm}"] = cell
            rows.append(f"| {m} | {b} | {label} | {_fmt_sd(cell, 'pass@1', 1)}{_of(cell['problems'], 'humaneval')} "
                        f"| {_fmt_sd(cell, 'solution_nll', 3)} "
                        f"| {_hours(cell['device_hours'])} | {_fmt(cell['passes'], 2)} "
                        f"| {_paper(cell['paper_pass@1'])} "
                        f"| {len(seeds) or '–'} | "
                        f"{', '.join(r.name for r in _by_seed(seeds).values()) or '–'} |")
    metric, higher = figure.metric
    orderings = _orderings(cells, groups, arms, metric, higher, figure.across_budgets)
    paper_hours = {g: PAPER_FIG21_GPU_HOURS.get(g) for g in groups} if experiment == "scaling" else {}
    md = [f"# {title}", "",
          f"{_pass_at_1(behind)}; solution NLL = mean per-token negative log-likelihood of the canonical solutions "
          "(lower is better); device-hours = the run's training wall clock × devices, over all its resumes; "
          "passes = how many times the run read its training data (a finetune: its own data), the repetition "
          "the paper's budgets imply (phi-1-base: 51B tokens, ~8 passes over CodeTextbook's ~7B). "
          "A cell run with several seeds: their mean ± sample standard deviation. "
          f"Paper: {figure.source}"
          + "".join(f"; {m} on {b} tokens took {h:,} GPU-hours" for (m, b), h in paper_hours.items() if h) + ". "
          + PARTIAL_NOTE, "",
          "| model | tokens | data | pass@1 | solution NLL | device-hours | passes | paper pass@1 | seeds | runs |",
          "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
          f"## Orderings, seed by seed ({'pass@1' if metric == 'pass@1' else 'solution NLL'})", "",
          "Each comparison pairs the two cells' runs of the same seed (same initialisation and data order) and "
          "counts the seeds where the paper's ordering holds; the difference is the mean ± sd over those seeds.",
          "", *(o["line"] for o in orderings)]
    env_lines, env_diffs = _environment(behind, _mixed_data(cells))
    (out / f"{stem}.md").write_text("\n".join(md + env_lines) + "\n")
    labels = [_group_label(cells, g, paper_hours.get(g)) for g in groups]
    _bars(out / f"{stem}.png", title, groups, labels, arms, table, show_nll=experiment == "mini")
    curves = _curves(out / f"{stem}_curves.png", experiment, groups, labels, arms, cells, runs)
    return {"cells": table, "orderings": orderings, "environment_differences": env_diffs, "curves": curves}


def _by_seed(seeds: dict) -> dict:
    """{seed: run} in seed order (a run whose config names no seed has None, first)."""
    return dict(sorted(seeds.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))


def _values(run: Run) -> dict:
    return {"pass@1": _pct(run.metrics.get("eval/humaneval/pass@1")),
            "solution_nll": run.metrics.get("eval/humaneval/solution_nll"),
            "device_hours": run.metrics.get("device_hours"), "passes": run.metrics.get("data/epochs"),
            "problems": run.metrics.get("eval/humaneval/problems")}


def _mean_sd(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _cell(seeds: dict) -> dict:
    """A cell's numbers: the mean over its seeds (sd where there are several), each seed's, and the runs."""
    per_seed = {s: _values(r) for s, r in _by_seed(seeds).items()}
    cell = {}
    for key in ("pass@1", "solution_nll", "device_hours", "passes"):
        cell[key], sd = _mean_sd([v[key] for v in per_seed.values()])
        if key in ("pass@1", "solution_nll"):
            cell[f"{key}_sd"] = sd
    counts = [v["problems"] for v in per_seed.values() if v["problems"] is not None]
    cell["problems"] = min(counts, default=None)  # the fewest any seed's HumanEval was scored on
    cell.update(seeds=list(per_seed), per_seed=per_seed, runs=[r.where for r in _by_seed(seeds).values()])
    return cell


def _fmt_sd(cell: dict, key: str, digits: int) -> str:
    sd = cell[f"{key}_sd"]
    return _fmt(cell[key], digits) + ("" if sd is None else f" ± {sd:.{digits}f}")


def _orderings(cells: dict, groups: list, arms: dict, metric: str, higher: bool,
               across_budgets: bool = False) -> list[dict]:
    """The paper's orderings (Figure 2.1), each counted over the seeds both cells ran: within a group each
    bar beats the one before it (filtered beats unfiltered data, finetuning on exercises beats the filtered
    pretraining), and at the same budget and data the larger model beats the smaller. `across_budgets`: each
    bar also beats the one before it on a larger budget of the same model (§2.1: filtered on 76B tokens beats
    unfiltered on 200B; groups are sorted by tokens)."""
    pairs = []
    names = list(arms)
    for m, b in groups:
        for worse, better in zip(names, names[1:]):
            pairs.append(((m, b, worse), (m, b, better), f"{m}, {b} tokens: {arms[better]} beats {arms[worse]}"))
    for (m1, b1), (m2, b2) in itertools.combinations(groups, 2):  # sorted small model first, then fewer tokens
        if b1 == b2 and m1 != m2:
            pairs += [((m1, b1, arm), (m2, b2, arm), f"{b1} tokens, {label}: {m2} beats {m1}")
                      for arm, label in arms.items()]
        if across_budgets and m1 == m2:
            pairs += [((m1, b2, worse), (m1, b1, better),
                       f"{m1}: {arms[better]} on {b1} tokens beats {arms[worse]} on {b2}")
                      for worse, better in zip(names, names[1:])]
    result = []
    for worse, better, claim in pairs:
        a, c = cells.get(worse, {}), cells.get(better, {})
        va, vc = ({s: _values(r)[metric] for s, r in cell.items()} for cell in (a, c))
        diffs = {s: vc[s] - va[s] for s in _by_seed(a) if va[s] is not None and vc.get(s) is not None}
        if not diffs:
            continue
        holds = [s for s, d in diffs.items() if (d > 0 if higher else d < 0)]
        mean, sd = _mean_sd(list(diffs.values()))
        digits = 1 if metric == "pass@1" else 3
        spread = "" if sd is None else f" ± {sd:.{digits}f}"
        pairs = [(a[s], c[s]) for s in diffs]
        ci = _problem_ci(pairs, metric)
        line = (f"- {claim}: in {len(holds)} of {len(diffs)} seed{'s' * (len(diffs) > 1)} "
                f"({'solution NLL' if metric == 'solution_nll' else metric} {mean:+.{digits}f}{spread}"
                + ("" if ci is None else f"; 95% interval over the problems {ci[0]:+.{digits}f} to "
                                         f"{ci[1]:+.{digits}f}") + ")")
        result.append({"claim": claim, "holds": len(holds), "seeds": len(diffs), "diff": mean, "diff_sd": sd,
                       "ci95_problems": ci, "line": line})
    return result


def _per_problem(run: Run, metric: str) -> dict[str, tuple[float, float]] | None:
    """task_id -> (numerator, denominator) of the run's metric on that problem, its value over any set of
    problems being sum(numerators) / sum(denominators): pass@1 in % (the problem's pass rate × 100, 1), from
    samples.jsonl; the solution NLL (nats, tokens of the canonical solution), a token-weighted mean, from
    solution_nll.jsonl. None for a run without the file (the NLL terms are kept since 2026-11-23)."""
    path = _samples(run, "humaneval", "samples.jsonl" if metric == "pass@1" else "solution_nll.jsonl")
    if path is None:
        return None
    if metric == "pass@1":
        return {task: (100.0 * rate, 1.0) for task, rate in pass_rates(str(path)).items()}
    return {r["task_id"]: (r["nats"], r["tokens"]) for r in map(json.loads, path.read_text().splitlines())}


def _problem_ci(pairs: list[tuple[Run, Run]], metric: str) -> tuple[float, float] | None:
    """95% bootstrap interval of the metric's difference over HumanEval's problems, from the runs' per-problem
    terms: how far another draw of 164 problems of the same kind could move it, the uncertainty a single seed
    leaves (Figure 2.1's bars are one run each; 9 problems are 5.5 pass@1 points). Each resample of problems
    (the same problems for both runs of every seed) recomputes each run's value and averages the differences
    over the seeds; 10,000 resamples by scipy, seeded, so the report is reproducible."""
    import numpy as np
    from scipy.stats import bootstrap

    terms = [_per_problem(run, metric) for pair in pairs for run in pair]  # worse, better, worse, better, ...
    if any(t is None for t in terms):
        return None
    tasks = sorted(set.intersection(*(set(t) for t in terms)))
    if len(tasks) < 2:
        return None
    columns = [np.array([t[k][i] for k in tasks], dtype=float) for t in terms for i in (0, 1)]

    def difference(*cols):
        values = [num.sum() / den.sum() for num, den in zip(cols[::2], cols[1::2])]
        return np.mean([better - worse for worse, better in zip(values[::2], values[1::2])])

    res = bootstrap(columns, difference, paired=True, vectorized=False, confidence_level=0.95,
                    n_resamples=10_000, method="percentile", rng=np.random.default_rng(0))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _hours(v) -> str:
    return "–" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _group_runs(cells, group) -> list[Run]:
    return [r for (m, b, _), seeds in cells.items() if (m, b) == group for r in seeds.values()]


def _group_label(cells, group, paper_hours: float | None = None) -> str:
    """'tiny (1.85M params)\\n246K tokens\\n0.0168 device-h': the model, its pretraining tokens and compute (the
    longest pretraining run of the group), read from the runs; the paper's GPU-hours where it gives them."""
    rs = _group_runs(cells, group)
    params = max((r.metrics.get("params", 0) for r in rs), default=0)
    pretraining = [r for r in rs if r.get("phase") != "finetune"]
    tokens = max((_tokens(r) for r in pretraining), default=0)
    hours = max((r.metrics["device_hours"] for r in pretraining if "device_hours" in r.metrics), default=None)
    return (f"{group[0]}" + (f" ({_human(params)} params)" if params else "") + "\n"
            + (f"{_human(tokens)} tokens" if tokens else f"{group[1]} tokens")
            + (f"\n{_hours(hours)} device-h" if hours is not None else "")
            + (f" (paper {paper_hours:,})" if paper_hours else ""))


def _budget(cells, group) -> int:
    """A group's tokens budget (budget.tokens of its runs' configs): 76b before 200b, which their names sort
    after."""
    return max((r.get("budget.tokens") or 0 for r in _group_runs(cells, group)), default=0)


def _group_size(cells, group) -> float:
    """Sort key of a (model, budget) group: the model's parameters (from a run's metrics), small first."""
    return min((r.metrics.get("params", 0) for r in _group_runs(cells, group)), default=0)


def _bars(path: Path, title: str, groups, labels, arms: dict, table: dict, show_nll: bool) -> None:
    panels = [("pass@1", "HumanEval pass@1 (%)")] + ([("solution_nll", "HumanEval solution NLL (lower is better)")]
                                                     if show_nll else [])
    most_seeds = max(len(cell["seeds"]) for cell in table.values())
    if most_seeds > 1:
        title += f"\nbars: mean over seeds (up to {most_seeds}), whiskers: ± sd, dots: each seed"
    # Wide enough for each group's three-line label (model, tokens, compute).
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.5, 2.3 * len(groups)) * len(panels) + 1, 4.4),
                             squeeze=False)
    width = 0.8 / len(arms)
    for ax, (key, ylabel) in zip(axes[0], panels):
        for i, (arm, label) in enumerate(arms.items()):
            xs = [g + (i - (len(arms) - 1) / 2) * width for g in range(len(groups))]
            cells = [table[f"{m}/{b}/{arm}"] for m, b in groups]
            vals = [c[key] for c in cells]
            ax.bar(xs, [v or 0 for v in vals], width, label=label, color=COLORS[i % 3])
            for x, c in zip(xs, cells):
                if c[key] is None:
                    continue
                seeds = [v[key] for v in c["per_seed"].values() if v[key] is not None]
                top = c[key]
                if len(seeds) > 1 and c[f"{key}_sd"]:  # the spread of the seeds (none when they all agree)
                    ax.errorbar(x, c[key], yerr=c[f"{key}_sd"], color="black", capsize=3, lw=1)
                    ax.scatter([x] * len(seeds), seeds, s=6, color="black", zorder=3)
                    top = max(*seeds, c[key] + c[f"{key}_sd"])
                ax.annotate(f"{c[key]:.1f}" if key == "pass@1" else f"{c[key]:.2f}", (x, top), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=8)
            if key == "pass@1":
                paper = [table[f"{m}/{b}/{arm}"]["paper_pass@1"] for m, b in groups]
                if any(p is not None for p in paper):
                    ax.scatter([x for x, p in zip(xs, paper) if p is not None], [p for p in paper if p is not None],
                               marker="_", s=400, color="black", zorder=3, label="paper" if i == len(arms) - 1 else None)
        ax.set_xticks(range(len(groups)), labels, fontsize=8)
        ax.set_ylabel(ylabel)
        every = [v[key] for c in table.values() for v in c["per_seed"].values() if v[key] is not None]
        if key == "pass@1":  # all zeros at the mini scale: keep the axis readable
            top = max([*every, *(c["paper_pass@1"] or 0 for c in table.values())], default=0)
            ax.set_ylim(0, max(5.0, 1.15 * top))
        if key == "solution_nll":
            ax.set_ylim(bottom=max(0.0, min(every, default=0.5) - 0.5))
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


LOSSES = ("train/loss", "val/loss")
EVAL_METRICS = ("/pass@1", "/solution_nll")  # what evaluations.png draws of each benchmark


def _splice(curves: dict, rows: list[tuple[int, str, float]]) -> None:
    """Add one segment's (step, key, value) rows to the curves. A segment replaces what the segments before it
    logged from its first step on: the steps a killed run took past its last checkpoint were taken again, and
    only the second time counts."""
    if rows:
        start = min(step for step, _, _ in rows)
        for key in curves:
            curves[key] = [point for point in curves[key] if point[0] < start]
        for step, key, value in rows:
            curves[key].append((step, value))


def losses(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """A run's logged train/loss and val/loss as [(step, value)], from its CSV logs: one
    csv/version_<k>/metrics.csv per segment (a resumed run starts a new version), spliced by `_splice`."""
    curves: dict[str, list[tuple[int, float]]] = {key: [] for key in LOSSES}
    def version(path: Path) -> int:  # version_10 after version_9
        number = path.parent.name.removeprefix("version_")
        return int(number) if number.isdigit() else -1

    for path in sorted(Path(run_dir).glob("csv/version_*/metrics.csv"), key=version):
        try:
            with path.open(newline="") as f:
                rows = [(int(row["step"]), key, float(row[key])) for row in csv.DictReader(f)
                        for key in curves if row.get(key)]
        except (OSError, ValueError, KeyError, TypeError, csv.Error) as e:  # a log cut short by a kill, say
            log.warning("%s: unreadable (%s: %s); its losses are left out of the curves", path, type(e).__name__, e)
            continue
        _splice(curves, rows)
    return curves


def _wandb_errors() -> tuple[type[Exception], ...]:
    """What reading a W&B run's history or files can raise: the API's errors (a 502, a run deleted), an answer
    not shaped as logged, a download that cannot be written."""
    import wandb

    return wandb.errors.Error, OSError, ValueError, TypeError, KeyError


def wandb_evaluations(run, where: str, keys: list[str]) -> list[dict] | None:
    """A W&B run's evaluations during training, one entry per step (a step evaluated again after a resume: the
    later one), as eval/history.json holds them."""

    step, by_step = "trainer/global_step", {}
    try:
        for key in keys:
            for row in run.scan_history(keys=[step, key]):
                by_step.setdefault(int(row[step]), {"step": int(row[step])})[key] = float(row[key])
    except _wandb_errors() as e:
        log.warning("%s: history unreadable (%s: %s); left out of evaluations.png", where, type(e).__name__, e)
        return None
    return [by_step[s] for s in sorted(by_step)]


# The W&B table an evaluation logs (phi1.evaluate.wandb_tables) for each file it writes in a run folder.
WANDB_TABLES = {"samples.jsonl": "samples_table", "solution_nll.jsonl": "solution_nll_table"}


def wandb_table(run: Run, bench: str, file: str) -> Path | None:
    """A W&B run's `file` of `bench` (samples.jsonl, solution_nll.jsonl) made of the table it logged: at its kept
    checkpoint's step when it kept one (`eval/best_step`), else the last one (train.py logs one per evaluation,
    evaluate.py one). Downloaded once into the run's cache folder under the table's W&B name, which holds its
    step and hash: a step evaluated again after a resume logged another table, and a report made again reads
    the file it has."""

    key, step = f"eval/{bench}/{WANDB_TABLES[file]}", "trainer/global_step"
    if run.cache is None:
        return None
    try:
        rows = list(run.wandb_run.scan_history(keys=[step, key])) or list(run.wandb_run.scan_history(keys=[key]))
        if not rows:
            _warn_once(f"{run.where} ({run.name}): no {key} in its W&B history (logged since 2026-11-23): the "
                       "per-problem numbers that need it need the run's folder (report.py runs_dir=...)")
            return None
        best = run.metrics.get("eval/best_step")
        table = next((r for r in reversed(rows) if best is not None and r.get(step) == best), rows[-1])[key]
        path = run.cache / table["path"].replace(".table.json", ".jsonl")
        if not path.exists():
            run.wandb_run.file(table["path"]).download(root=str(run.cache), replace=True).close()
            logged = json.loads((run.cache / table["path"]).read_text())
            part = path.with_suffix(".part")  # a report killed here leaves no half file to be read next time
            part.write_text("".join(json.dumps(dict(zip(logged["columns"], row))) + "\n" for row in logged["data"]))
            part.replace(path)
            (run.cache / table["path"]).unlink()
            log.info("%s: %s of %s (%d rows) downloaded into %s", run.where, file, bench, len(logged["data"]), path)
    except _wandb_errors() as e:
        _warn_once(f"{run.where} ({run.name}): {key} unreadable ({type(e).__name__}: {e}); the per-problem numbers "
                   "that need it are left out")
        return None
    return path


def wandb_losses(run, where: str) -> dict[str, list[tuple[int, float]]]:
    """A W&B run's train/loss and val/loss as [(step, value)], from its full history (not `history()`, which
    samples 500 rows). Lightning logs each row with `trainer/global_step`. A run resumed online logs into the
    same W&B run (phi1.monitoring), so its history holds both segments in the order they ran: a new segment
    begins where a loss's step goes back, and is spliced as a CSV segment is."""

    step = "trainer/global_step"
    rows = []
    try:
        for key in LOSSES:
            rows += [(int(row["_step"]), int(row[step]), key, float(row[key]))
                     for row in run.scan_history(keys=["_step", step, key])]
    except _wandb_errors() as e:
        log.warning("%s: history unreadable (%s: %s); its losses are left out of the curves", where,
                    type(e).__name__, e)
        return {key: [] for key in LOSSES}
    curves: dict[str, list[tuple[int, float]]] = {key: [] for key in LOSSES}
    segment, last = [], {}
    for _, s, key, value in sorted(rows):
        if s <= last.get(key, -1):
            _splice(curves, segment)
            segment, last = [], {}
        segment.append((s, key, value))
        last[key] = s
    _splice(curves, segment)
    return curves


def _tokens_per_step(run: Run) -> int:
    return (run.get("batch.global_size") or 0) * (run.get("data.seq_len") or 0)


def _start_tokens(run: Run, by_name: dict[str, Run]) -> int:
    """Tokens the run's weights had seen when it began: a finetune started from `run:<base>` has seen its base's
    tokens (up to the step of the checkpoint it names, e.g. phi-1 from phi-1-base's step 24,000: 24,000 × 1024 ×
    2048 = 50.3B, the paper's "51B"); 0 for a run from scratch or from weights this report cannot place."""
    ref = str(run.get("init_from") or "")
    if not ref.startswith("run:"):
        return 0
    name, _, file = ref.removeprefix("run:").partition("/")
    base = by_name.get(name)
    if base is None:
        return 0
    step = re.search(r"step(\d+)", file)
    if step and _tokens_per_step(base):
        return int(step.group(1)) * _tokens_per_step(base)
    return _tokens(base)


def _tokens(run: Run) -> int:
    """Tokens the run trained on: metrics.json's, or a W&B summary's (logged since 2026-11-23; before, its last
    step, which Lightning logs with every metric, × tokens per step)."""
    return int(run.metrics.get("tokens") or (run.metrics.get("trainer/global_step") or 0) * _tokens_per_step(run))


def _plot_losses(ax, logged: dict, start: int, per_step: int, color, label: str | None = None) -> None:
    """One run's training loss (solid) and validation loss (dashed, dots) against the tokens seen, from `start`.
    `label` goes on the first line drawn: a short run may have logged a validation loss alone."""
    # A loss logged at step s was that of the (s+1)-th optimizer step: (s+1) batches seen.
    for key, style in (("train/loss", {"lw": 1.2}), ("val/loss", {"ls": "--", "marker": "o", "ms": 3})):
        if points := logged[key]:
            ax.plot([start + (s + 1) * per_step for s, _ in points], [v for _, v in points], color=color,
                    alpha=0.8, label=label, **style)
            label = None


def _curves(path: Path, experiment: str, groups, labels, arms: dict, cells: dict, runs: list[Run]) -> dict | None:
    """Figure 2.1's runs as loss curves, one panel per (model, tokens) group, one colour per training data,
    one line per seed: the training loss (solid) and the validation loss (dashed, dots). Each run's loss is on
    its own data, so the levels of two colours are not comparable (HumanEval in fig2_1 is the common yardstick);
    the shapes say whether a run converged, diverged or spiked. None when no run logged a loss."""
    by_name = {r.name: r for r in runs}
    drawn: dict[str, dict] = {}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups) + 0.6, 4.2), squeeze=False)
    for ax, group, label in zip(axes[0], groups, labels):
        for i, arm in enumerate(arms):
            for r in _by_seed(cells.get((*group, arm), {})).values():
                per_step = _tokens_per_step(r)
                logged = r.losses() if per_step else {}
                if not any(logged.values()):
                    continue
                start = _start_tokens(r, by_name)
                _plot_losses(ax, logged, start, per_step, COLORS[i % 3])
                drawn[r.name] = {"start_tokens": start, "train_points": len(logged["train/loss"]),
                                 "val_points": len(logged["val/loss"]), "run": r.where}
        ax.set_title(label.replace("\n", ", "), fontsize=8)
        ax.set_xlabel("tokens seen since pretraining began")
        ax.xaxis.set_major_formatter(lambda x, _: _human(x) if x > 0 else "0")
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    axes[0][0].set_ylabel("loss (nats per token)")
    handles = [plt.Line2D([], [], color=COLORS[i % 3], label=label) for i, label in enumerate(arms.values())]
    handles += [plt.Line2D([], [], color="gray", label="train"),
                plt.Line2D([], [], color="gray", ls="--", marker="o", ms=3, label="validation")]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper right")
    figure = SCALING_FIGURES[experiment].title.split(":")[0]
    fig.suptitle(f"{figure}'s runs ({experiment}): loss against tokens seen, each run on its own data "
                 "(levels of two colours are not comparable; one line per seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"figure": path.name, "runs": drawn}


# ----------------------------------------------------------------------------------- emergence and Table 2

def _emergence_model(run: Run) -> str:
    ckpt = str(run.get("ckpt") or "")
    name = ckpt.removeprefix("run:").split("/")[0] if ckpt.startswith("run:") else ckpt
    return EMERGENCE_MODELS.get(name, name)


def _emergence_runs(runs: list[Run]) -> dict[str, Run]:
    return _one_each(runs, lambda r: _emergence_model(r) if r.get("experiment_name") == "emergence" else None,
                     "emergence model")


def emergence(runs: list[Run], out: Path) -> dict | None:
    evals = _emergence_runs(runs)
    if not evals:
        log.info("emergence / Table 2: no runs; make them with `python evaluate.py +sweep=emergence`")
        return None
    order = [m for m in PAPER_EMERGENCE if m in evals] + sorted(set(evals) - set(PAPER_EMERGENCE))
    table = {}
    for m in order:
        r = evals[m]
        score = r.metrics.get("eval/unconventional/score")
        table[m] = {"humaneval": _pct(r.metrics.get("eval/humaneval/pass@1")),
                    "humaneval_problems": r.metrics.get("eval/humaneval/problems"),
                    "mbpp": _pct(r.metrics.get("eval/mbpp/pass@1")),
                    "mbpp_problems": r.metrics.get("eval/mbpp/problems"),
                    "unconventional_pass@1": _pct(r.metrics.get("eval/unconventional/pass@1")),
                    "unconventional_problems": r.metrics.get("eval/unconventional/problems"),
                    "unconventional_score": None if score is None else 10.0 * score,  # 0-10 -> the paper's 0-100
                    "unconventional_graded": r.metrics.get("eval/unconventional/graded"),
                    "paper": PAPER_EMERGENCE.get(m), "run": r.where}
    md = ["# Emergence: phi-1-small, phi-1-base, phi-1 (paper §3-4)", "",
          f"{_pass_at_1(list(evals.values()))}; unconventional score = mean GPT grade × 10 (the paper's scale). "
          "Paper in brackets. "
          + PARTIAL_NOTE, "",
          "| model | HumanEval | MBPP | unconventional pass@1 | unconventional score | run |", "|---|---|---|---|---|---|"]
    for m, v in table.items():
        p = v["paper"] or (None, None, None)
        md.append(f"| {m} | {_fmt(v['humaneval'])}{_of(v['humaneval_problems'], 'humaneval')} ({_fmt(p[0])}) | "
                  f"{_fmt(v['mbpp'])}{_of(v['mbpp_problems'], 'mbpp')} ({_fmt(p[1])}) | "
                  f"{_fmt(v['unconventional_pass@1'])}{_of(v['unconventional_problems'], 'unconventional')} | "
                  f"{_fmt(v['unconventional_score'])}{_score_of(v)} ({_fmt(p[2])}) | "
                  f"{evals[m].name} |")
    (out / "emergence.md").write_text("\n".join(md + _environment(list(evals.values()))[0]) + "\n")

    t2 = ["# Table 2: understanding of 50 unconventional problems (GPT-4 score) and HumanEval, in %", "",
          "| model | score | HumanEval | source |", "|---|---|---|---|"]
    t2 += [f"| {m} | {s} | {h} | paper |" for m, (s, h) in PAPER_TABLE2.items()]
    t2 += [f"| {m} (ours) | {_fmt(v['unconventional_score'])}{_score_of(v)} | "
           f"{_fmt(v['humaneval'])}{_of(v['humaneval_problems'], 'humaneval')} | {evals[m].name} |"
           for m, v in table.items()]
    if any(_score_of(v) or _of(v["humaneval_problems"], "humaneval") for v in table.values()):
        t2 += ["", PARTIAL_NOTE]
    (out / "table2.md").write_text("\n".join(t2) + "\n")
    _table2_png(out / "table2.png", table)

    fig, ax = plt.subplots(figsize=(7, 4))
    benches = [("humaneval", "HumanEval", 0), ("mbpp", "MBPP", 1), ("unconventional_score", "unconventional score", 2)]
    width = 0.8 / (2 * len(order))
    for i, m in enumerate(order):
        for j, (key, _, pi) in enumerate(benches):
            ours, paper = table[m][key], (table[m]["paper"] or (None,) * 3)[pi]
            x = j + (2 * i - len(order) + 0.5) * width
            ax.bar(x, ours or 0, width, color=COLORS[i % 3], label=m if j == 0 else None)
            if paper is not None:
                ax.bar(x + width, paper, width, color="none", edgecolor=COLORS[i % 3], hatch="//",
                       label=f"{m} (paper)" if j == 0 else None)
    ax.set_xticks(range(len(benches)), [b[1] for b in benches])
    ax.set_ylabel("%")
    top = max((v or 0 for m in order for v in (*[table[m][k] for k, _, _ in benches], *(table[m]["paper"] or ()))),
              default=0)
    ax.set_ylim(0, max(5.0, 1.45 * top))  # room for the legend above the bars
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    ax.set_title("Emergence: ours (solid) and the paper's (hatched)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "emergence.png", dpi=120)
    plt.close(fig)
    return table


def _first_samples(path: Path) -> dict[str, dict]:
    """task_id -> the problem's first sample (greedy decoding, the paper's setting, writes only one)."""
    first: dict[str, dict] = {}
    with path.open() as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                first.setdefault(row["task_id"], row)
    return first


def _code(sample: dict) -> str:
    return sample.get("completion", "").rstrip("\n")


def _prompts(run: Run, bench: str) -> dict[str, str]:
    """task_id -> prompt of the benchmark as the run configured it; {} where it cannot be read here (MBPP from
    the hub is not fetched: a report does not wait on the network)."""
    from phi1.eval.benchmarks import load

    spec = run.get(f"benchmarks.{bench}") or run.get(f"evaluation.benchmarks.{bench}")
    if not isinstance(spec, dict) or (spec.get("kind") == "mbpp" and not spec.get("path")):
        return {}
    try:
        return {p.task_id: p.prompt for p in load(OmegaConf.create(spec))}
    except (Phi1Error, OSError) as e:
        log.info("emergence problem by problem: %s's prompts not shown (%s)", bench, e)
        return {}


def emergence_problems(runs: list[Run], out: Path, examples: int = 3) -> dict | None:
    """The emergence runs problem by problem: for each pair of EMERGENCE_PAIRS and each benchmark both were
    scored on, how many problems pass under both models, only one, neither, and the first `examples` problems
    each passes alone, both completions side by side (the failing one's error). Where a pass@1 gain comes
    from, which the totals hide: two models at 30% can pass different problems."""
    evals = _emergence_runs(runs)
    if not evals:  # emergence() said how to make them
        return None
    lines = ["# Emergence problem by problem (paper §3)", "",
             "Each problem's first sample under both models (greedy: its only one). Counts, then the first "
             f"{examples} problems each model passes alone, with both completions.", "",
             "| benchmark | models | problems | both pass | only the first | only the second | neither |",
             "|---|---|---|---|---|---|---|"]
    details, result = [], {}
    for a, b in EMERGENCE_PAIRS:
        for bench in ("humaneval", "mbpp", "unconventional"):
            paths = [_samples(evals[m], bench) if m in evals else None for m in (a, b)]
            if None in paths:
                continue
            sa, sb = (_first_samples(p) for p in paths)
            common = [t for t in sa if t in sb]
            alone = {a: [t for t in common if sa[t].get("passed") and not sb[t].get("passed")],
                     b: [t for t in common if sb[t].get("passed") and not sa[t].get("passed")]}
            both = sum(1 for t in common if sa[t].get("passed") and sb[t].get("passed"))
            neither = len(common) - both - len(alone[a]) - len(alone[b])
            result[f"{a} vs {b}/{bench}"] = {"problems": len(common), "both": both, f"only {a}": len(alone[a]),
                                             f"only {b}": len(alone[b]), "neither": neither,
                                             "runs": [evals[a].where, evals[b].where]}
            lines.append(f"| {bench} | {a} vs {b} | {len(common)} | {both} | {len(alone[a])} | {len(alone[b])} | "
                         f"{neither} |")
            prompts = _prompts(evals[a], bench)
            for winner, loser, won, lost in ((a, b, sa, sb), (b, a, sb, sa)):
                for t in alone[winner][:examples]:
                    details += [f"### {bench} {t}: {winner} passes, {loser} fails", ""]
                    if t in prompts:
                        details += ["The prompt:", "", *code_block(prompts[t].rstrip("\n")), ""]
                    details += [f"{winner} ({evals[winner].name}):", "", *code_block(_code(won[t])), "",
                                f"{loser} ({evals[loser].name}), {lost[t].get('result', 'failed')}:", "",
                                *code_block(_code(lost[t])), ""]
    if not result:
        log.info("emergence problem by problem: no pair of phi-1 with phi-1-base or phi-1-small with samples; "
                 "make them with `python evaluate.py +sweep=emergence`")
        return None
    (out / "emergence_problems.md").write_text("\n".join(lines + ["", *details]).rstrip() + "\n")
    return result


def _table2_png(path: Path, table: dict) -> None:
    """Table 2 as a chart: score and HumanEval per model, the paper's models hatched, ours solid."""
    rows = [(f"{m} (paper)", s, h, True) for m, (s, h) in PAPER_TABLE2.items()]
    rows += [(f"{m} (ours)", v["unconventional_score"], v["humaneval"], False) for m, v in table.items()]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    ys = range(len(rows))
    for offset, idx, label, color in ((-0.2, 1, "unconventional score", COLORS[2]), (0.2, 2, "HumanEval", COLORS[0])):
        for y, row in zip(ys, rows):
            ax.barh(y + offset, row[idx] or 0, 0.4, color=color, hatch="//" if row[3] else None,
                    label=label if y == 0 else None, alpha=0.6 if row[3] else 1.0)
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("%")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Table 2: unconventional problems (GPT-4 score) and HumanEval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ Table 3

def table3(runs: list[Run], decontaminate_dir: Path, out: Path) -> dict | None:
    pruned = _one_each(runs, lambda r: round(float(r.get("tau")), 2)
                       if r.get("experiment_name") == "pruning" and r.get("tau") is not None else None, "pruning τ")
    if not pruned:
        log.info("Table 3: no runs; make them with `python train.py +sweep=pruning`")
        return None
    full = next((r for r in reversed(runs) if r.get("experiment_name") == "phi1"), None)
    full_rates = pass_rates(str(p)) if full and (p := _samples(full, "humaneval")) else {}
    table, lines = {}, ["# Table 3: HumanEval pass@1 (%) on problems similar / not similar to CodeExercises", "",
                        "Ours: phi-1 and phi-1 retrained on CodeExercises pruned at τ; paper in brackets "
                        "(StarCoder-Prompted from the paper only).", "",
                        "| τ | problems | count | phi-1 | retrained on pruned | StarCoder-Prompted (paper) | runs |",
                        "|---|---|---|---|---|---|---|"]
    for tau in sorted(pruned, reverse=True):
        r = pruned[tau]
        path = _samples(r, "humaneval")
        rates = pass_rates(str(path)) if path else {}
        sim_file = Path(decontaminate_dir) / f"similar-tau{tau:.2f}.txt"
        non_file = Path(decontaminate_dir) / f"nonsimilar-tau{tau:.2f}.txt"
        if not sim_file.exists():
            log.warning("Table 3: %s is missing (run prepare.py stage=decontaminate); τ=%.2f skipped", sim_file, tau)
            continue
        paper = PAPER_TABLE3.get(tau)
        table[f"{tau:.2f}"] = {}
        for i, (part, f) in enumerate((("similar", sim_file), ("non-similar", non_file))):
            ids = [t for t in f.read_text().split() if t]
            ours = [(100 * sum(rs.get(t, 0.0) for t in ids) / len(ids)) if ids and rs else None
                    for rs in (full_rates, rates)]
            p = paper[i] if paper else (None,) * 4
            table[f"{tau:.2f}"][part] = {"count": len(ids), "phi-1": ours[0], "retrained": ours[1],
                                         "paper": p, "runs": [full.where if full else None, r.where]}
            lines.append(f"| {tau:.2f} | {part} | {len(ids)} ({_fmt(p[0], 0)}) | {_fmt(ours[0])} ({_fmt(p[1])}) | "
                         f"{_fmt(ours[1])} ({_fmt(p[2])}) | {_fmt(p[3])} | {full.name if full else '–'}, {r.name} |")
        table[f"{tau:.2f}"]["retrained_total"] = _pct(r.metrics.get("eval/humaneval/pass@1"))
    behind = [r for r in (full, *pruned.values()) if r is not None]
    (out / "table3.md").write_text("\n".join(lines + _environment(behind)[0]) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    taus = list(table)
    for i, (part, key) in enumerate([(p, k) for p in ("similar", "non-similar") for k in ("phi-1", "retrained")]):
        xs = [t + (i - 1.5) * 0.2 for t in range(len(taus))]
        ax.bar(xs, [table[t][part][key] or 0 for t in taus], 0.2, label=f"{key}, {part}",
               color=COLORS[1 + (key == "retrained")], hatch="//" if part == "non-similar" else None)
    ax.set_xticks(range(len(taus)), [f"τ = {t}" for t in taus])
    ax.set_ylabel("HumanEval pass@1 (%)")
    ax.set_title("Table 3: problems similar / not similar to the finetuning set (paper: table3.md)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "table3.png", dpi=120)
    plt.close(fig)
    return table


# ------------------------------------------------------------------------------- evaluations during training

def evaluations(runs: list[Run], out: Path) -> dict | None:
    """Runs evaluated at least twice during training (`evaluation.every_n_steps`; experiment=phi1 at each of its
    6 checkpoints, the best by pass@1 kept, paper §2.3): each evaluation's pass@1 and solution NLL per benchmark,
    from the run's eval/history.json (kept in its checkpoints, so a resumed run's history is whole) or its W&B
    history, with the step of the checkpoint it kept (`best.ckpt`). Whether the kept checkpoint is a peak or
    one point of a plateau the seeds' noise could reorder is what the curve shows and the final number does
    not."""
    histories = {}
    for r in runs:
        history = r.eval_history()
        drawn = [e for e in history if isinstance(e, dict) and any(
            k.endswith(EVAL_METRICS) for k in e)] if isinstance(history, list) else []
        if len(drawn) >= 2:
            histories[r.name] = (r, drawn)
    if not histories:
        return None
    panels = [(suffix, label) for suffix, label in (("pass@1", "pass@1 (%)"), ("solution_nll", "solution NLL"))
              if any(k.endswith("/" + suffix) for _, h in histories.values() for e in h for k in e)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 0.5, 4), squeeze=False)
    md = ["# Evaluations during training", "",
          "The runs evaluated more than once while training, each evaluation (pass@1 in %); ★ = the checkpoint "
          "a run kept (`checkpoints/best.ckpt`, by `evaluation.keep_best`).", ""]
    result = {}
    for name, (r, history) in histories.items():
        best = r.metrics.get("eval/best")  # a W&B run's summary has its step alone
        best_step = best.get("step") if isinstance(best, dict) else r.metrics.get("eval/best_step")
        keys = sorted({k for e in history for k in e
                       if k.startswith("eval/") and k.endswith(EVAL_METRICS)})
        md += [f"## {name}", "", "| step | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for e in history:
            cells = [_fmt(_pct(e.get(k)) if k.endswith("pass@1") else e.get(k), 1 if k.endswith("pass@1") else 3)
                     for k in keys]
            md.append(f"| {e['step']}{' ★' if e['step'] == best_step else ''} | " + " | ".join(cells) + " |")
        md.append("")
        for ax, (suffix, label) in zip(axes[0], panels):
            for k in (k for k in keys if k.endswith("/" + suffix)):
                points = [(e["step"], e[k]) for e in history if e.get(k) is not None]
                scale = 100 if suffix == "pass@1" else 1
                line, = ax.plot([s for s, _ in points], [v * scale for _, v in points], marker="o", ms=3,
                                label=f"{name} ({k.split('/')[1]})")
                kept = [v for s, v in points if s == best_step]
                if kept:
                    ax.scatter([best_step], [kept[0] * scale], marker="*", s=160, color=line.get_color(), zorder=3)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        result[name] = {"history": history, "best_step": best_step, "run": r.where}
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Evaluations during training (★ the checkpoint kept)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "evaluations.png", dpi=120)
    plt.close(fig)
    (out / "evaluations.md").write_text("\n".join(md).rstrip() + "\n")
    return result


# The columns of runs.md per benchmark, in this order (evaluate.py's metric names: eval/<benchmark>/<metric>),
# with the digits each is shown to.
RUN_METRICS = {"pass@1": ("pass@1 (%)", 1), "solution_nll": ("solution NLL", 3), "score": ("score (0-10)", 1)}


def runs_table(runs: list[Run], out: Path) -> dict | None:
    """Every finished run, one row each (runs.md, runs.csv): a user's own experiments beside the paper's, which
    the figures above leave out (they draw the runs of their experiments alone). What each run trained (model,
    data, tokens, epochs, device-hours) or evaluated (its ckpt or samples file), its losses, and each benchmark's
    numbers, those scored on fewer problems than the paper's marked. runs.csv holds the same rows unrounded."""
    if not runs:
        return None
    benches = sorted({k.split("/")[1] for r in runs for k in r.metrics if k.count("/") == 2 and k.startswith("eval/")})
    columns = [(b, m) for b in benches for m in RUN_METRICS if any(f"eval/{b}/{m}" in r.metrics for r in runs)]
    rows = []
    for r in sorted(runs, key=lambda r: (str(r.get("experiment_name", "")), r.name)):
        evaluation = r.get("allow_code_execution") is not None  # evaluate.py's config has it at the top
        m = r.metrics
        row = {"run": r.name, "experiment": r.get("experiment_name", ""),
               "phase": "evaluate" if evaluation else r.get("phase", ""), "init_from": r.get("init_from") or "",
               "model": (r.get("ckpt") or r.get("samples") or "") if evaluation else r.get("model.name", ""),
               "data": "" if evaluation else r.get("data.name", ""),
               **{k: m.get(k) for k in ("tokens", "data/epochs", "device_hours", "train/loss", "val/loss")}}
        for b, metric in columns:
            row[f"eval/{b}/{metric}"] = m.get(f"eval/{b}/{metric}")
            row[f"eval/{b}/problems"] = m.get(f"eval/{b}/problems")
        rows.append({**row, "where": r.where})
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    def cell(row, b, metric):
        v = row[f"eval/{b}/{metric}"]
        text = _fmt(_pct(v) if metric == "pass@1" else v, RUN_METRICS[metric][1])
        return text + (_of(row[f"eval/{b}/problems"], b) if v is not None else "")

    heads = ["run", "experiment", "phase", "model (or ckpt)", "data", "tokens", "epochs", "device-hours",
             "train/loss", "val/loss", *(f"{b} {RUN_METRICS[metric][0]}" for b, metric in columns)]
    md = ["# Runs", "", f"Every finished run the report read ({_runs(len(rows))}), by experiment; runs.csv holds "
          "the same rows unrounded, with where each run is.", "",
          "| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for row in rows:
        md.append("| " + " | ".join([
            row["run"], str(row["experiment"]), " from ".join(str(v) for v in (row["phase"], row["init_from"]) if v),
            str(row["model"]), str(row["data"]),
            _human(row["tokens"]) if row["tokens"] is not None else "–", _fmt(row["data/epochs"], 2),
            _hours(row["device_hours"]), _fmt(row["train/loss"], 3), _fmt(row["val/loss"], 3),
            *(cell(row, b, metric) for b, metric in columns)]) + " |")
    if any(_of(row[f"eval/{b}/problems"], b) for row in rows for b, _ in columns):
        md += ["", PARTIAL_NOTE]
    (out / "runs.md").write_text("\n".join(md) + "\n")
    return {"columns": list(rows[0]), "rows": rows}


def runs_curves(runs: list[Run], out: Path, per_row: int = 3) -> dict | None:
    """runs_curves.png: the loss curves of the runs no figure draws (experiments other than the paper's), one panel
    per experiment, one colour per run: training loss (solid) and validation loss (dashed, dots) against the
    tokens seen since pretraining began (a finetune continues its base's count). None when none logged a loss."""
    by_name = {r.name: r for r in runs}
    experiments: dict[str, list[tuple[Run, dict, int, int]]] = {}
    for r in sorted(runs, key=lambda r: r.name):
        experiment = str(r.get("experiment_name", ""))
        if experiment in FIGURE_EXPERIMENTS or not (per_step := _tokens_per_step(r)):
            continue
        logged = r.losses()
        if any(logged.values()):
            experiments.setdefault(experiment, []).append((r, logged, per_step, _start_tokens(r, by_name)))
    if not experiments:
        return None
    rows = -(-len(experiments) // per_row)
    cols = min(per_row, len(experiments))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols + 0.4, 4.0 * rows), squeeze=False)
    drawn = {}
    for ax, (experiment, drawn_runs) in zip(axes.flat, sorted(experiments.items())):
        for i, (r, logged, per_step, start) in enumerate(drawn_runs):
            _plot_losses(ax, logged, start, per_step, plt.cm.tab10(i % 10), label=r.name)
            drawn[r.name] = {"experiment": experiment, "start_tokens": start, "run": r.where}
        ax.set_title(f"{experiment} ({_runs(len(drawn_runs))})", fontsize=9)
        ax.set_xlabel("tokens seen since pretraining began")
        ax.xaxis.set_major_formatter(lambda x, _: _human(x) if x > 0 else "0")
        ax.grid(alpha=0.3)
        if len(drawn_runs) <= 12:  # beyond, the legend would cover the curves
            ax.legend(fontsize=6, loc="upper right")
    for ax in list(axes.flat)[len(experiments):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("loss (nats per token)")
    fig.suptitle("Runs of other experiments than the paper's:\ntraining loss (solid) and validation loss (dashed),"
                 " each run on its own data", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "runs_curves.png", dpi=120)
    plt.close(fig)
    return {"figure": "runs_curves.png", "runs": drawn}


def _figures(out: Path) -> dict[str, int]:
    """The figures and tables in out (runs.csv too), with their modification times (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir()) if p.suffix in (".png", ".md", ".csv")}


def report(cfg: DictConfig) -> dict:
    if not Path(cfg.runs_dir).is_dir():  # a mistyped folder would otherwise read as "no runs yet"
        raise MissingInputError(f"runs_dir={cfg.runs_dir}: no such folder (the folder of run folders, outputs/ "
                                "by default)")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"out={cfg.out}: a file, not a folder (where the report's figures and tables go)")
    out.mkdir(parents=True, exist_ok=True)
    before = _figures(out)
    runs = local_runs(Path(cfg.runs_dir))
    unfinished_runs(Path(cfg.runs_dir))
    if cfg.wandb:
        # A run logged to W&B from a folder under runs_dir is read from its folder, which holds more (CSV logs,
        # per-problem solution NLLs): its W&B ids are the suffixes of its wandb/(offline-)run-<time>-<id>.
        here = {folder.name.rsplit("-", 1)[1] for r in runs for folder in (r.dir / "wandb").glob("*run-*-*")}
        remote = wandb_runs(cfg.wandb, out / "wandb")
        runs += [r for r in remote if r.wandb_run.id not in here]
        if skipped := sum(r.wandb_run.id in here for r in remote):
            log.info("%d W&B runs are run folders under %s too: read from their folders", skipped, cfg.runs_dir)
    log.info("%s finished (%s%s)", _runs(len(runs)), cfg.runs_dir, f", wandb:{cfg.wandb}" if cfg.wandb else "")
    result = {"fig2_1": scaling(runs, "scaling", out), "mini_fig2_1": scaling(runs, "mini", out),
              "filter": scaling(runs, "filter", out),
              "emergence": emergence(runs, out), "emergence_problems": emergence_problems(runs, out),
              "table3": table3(runs, Path(cfg.decontaminate_dir), out), "evaluations": evaluations(runs, out),
              "runs": runs_table(runs, out), "runs_curves": runs_curves(runs, out)}
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    # Named by whether this call wrote them: a figure left from an earlier report whose runs are gone (or not
    # under this runs_dir) is not passed off as this one's. Earlier files are kept, not deleted.
    after = _figures(out)
    made = [name for name in after if after[name] != before.get(name)]
    log.info("report in %s: %s", out, ", ".join(made) or "nothing (no finished runs)")
    if stale := [name for name in after if after[name] == before.get(name)]:
        log.info("left from an earlier report, not remade (no runs for them now): %s", ", ".join(stale))
    return result
