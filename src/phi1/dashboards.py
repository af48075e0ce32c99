"""W&B dashboards as code (wandb-workspaces): one saved workspace view per figure of the paper, each showing
the runs of one W&B group (= experiment_name: scaling, mini, filter, emergence, pruning) with the metric names of
DESIGN §6. Runs are grouped by the config keys that make a cell of the figure (model, data, token budget,
phase, and τ for Table 3) and by nothing else, so the seeds of a cell (run names ending -s<seed>) are one
group: its bar is their mean, its line their mean with the min-max band.

  python -m phi1.dashboards --entity <entity> [--project phi1]   # saves the views, prints their URLs
  python -m phi1.dashboards --entity <entity> --dry-run           # lists the views and panels, saves nothing
"""

from __future__ import annotations

import argparse

import wandb
import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from wandb_workspaces.expr import Config

TRAINING = ["train/loss", "val/loss"]


def _training_section(name: str = "Training") -> ws.Section:
    return ws.Section(name=name, is_open=False, panels=[
        _lines("loss", TRAINING),
        _lines("learning rate", ["train/lr"]),
        _lines("tokens/s (job)", ["perf/tokens_per_sec"]),
        _lines("MFU per GPU (DESIGN §7)", ["perf/mfu"]),
    ])


# What tells the cells of a figure apart; the seed is left out on purpose. train.py logs its config as `cfg`.
CELL = ["model.name", "data.name", "budget.name", "phase"]


def _group(name: str, cell: list[str] = CELL) -> ws.RunsetSettings:
    return ws.RunsetSettings(filters=[ws.Metric("Group") == name], groupby=[Config(f"cfg.{key}") for key in cell])


# W&B draws 10 runs (or groups) a panel unless told: Figure 2.1 has 2 models x 2 budgets x 3 data = 12 cells
# (sweeps/scaling.yaml), and the mini reproduction 6 cells x 3 seeds = 18 runs, which the runs table lists.
SETTINGS = ws.WorkspaceSettings(max_runs=100)


def _bars(title: str, metric: str) -> wr.BarPlot:
    return wr.BarPlot(title=title, metrics=[metric], orientation="v", groupby_aggfunc="mean",
                      groupby_rangefunc="minmax")


def _lines(title: str, metrics: list[str]) -> wr.LinePlot:
    return wr.LinePlot(title=title, y=metrics, groupby_aggfunc="mean", groupby_rangefunc="minmax")


def views(entity: str, project: str) -> list[ws.Workspace]:
    def view(name: str, group: str, sections: list[ws.Section], cell: list[str] = CELL) -> ws.Workspace:
        return ws.Workspace(entity=entity, project=project, name=name, settings=SETTINGS,
                            runset_settings=_group(group, cell), sections=sections)

    fig21 = [
        _bars("HumanEval pass@1 by model, tokens and data (Figure 2.1), mean over seeds", "eval/humaneval/pass@1"),
        _bars("HumanEval solution NLL, last (lower is better)", "eval/humaneval/solution_nll"),
        _lines("HumanEval solution NLL at each evaluation", ["eval/humaneval/solution_nll"]),
    ]
    return [
        view("Figure 2.1: scaling", "scaling",
             [ws.Section(name="Figure 2.1", is_open=True, panels=fig21), _training_section()]),
        view("Mini reproduction", "mini",
             [ws.Section(name="Figure 2.1 in miniature", is_open=True, panels=fig21), _training_section()]),
        view("§2.1: the quality filter", "filter",
             [ws.Section(name="phi-1-small on The Stack+, unfiltered and filtered", is_open=True, panels=fig21),
              _training_section()]),
        view("Emergence and Table 2", "emergence", [ws.Section(
            name="phi-1-small vs phi-1-base vs phi-1", is_open=True, panels=[
                _bars("HumanEval pass@1", "eval/humaneval/pass@1"),
                _bars("MBPP pass@1", "eval/mbpp/pass@1"),
                _bars("unconventional problems: GPT-4 score (0-10, Table 2)", "eval/unconventional/score"),
                _bars("unconventional problems: pass@1", "eval/unconventional/pass@1"),
            ])]),
        view("Table 3: pruning", "pruning", [ws.Section(
            name="retrained on pruned CodeExercises", is_open=True, panels=[
                _bars("HumanEval pass@1 by τ", "eval/humaneval/pass@1"),
                _lines("HumanEval pass@1 at each checkpoint", ["eval/humaneval/pass@1"]),
            ]), _training_section()], cell=[*CELL, "tau"]),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entity", required=True)
    parser.add_argument("--project", default="phi1")
    parser.add_argument("--dry-run", action="store_true", help="list the views and panels; save nothing")
    args = parser.parse_args(argv)
    for view in views(args.entity, args.project):
        panels = [p.title for s in view.sections for p in s.panels]
        if args.dry_run:
            print(f"{view.name}: {len(panels)} panels: {'; '.join(panels)}")
        else:
            try:
                url = view.save().url
            except wandb.errors.Error as e:  # no key (UsageError), a key the server refuses, no server
                raise SystemExit(f"W&B did not save the view {view.name!r}: {type(e).__name__}: {e}\nThe views need "
                                 "`wandb login` (or WANDB_API_KEY) and a reachable server; --dry-run lists them "
                                 "without either.") from None
            print(f"{view.name}: {url}")


if __name__ == "__main__":
    main()
