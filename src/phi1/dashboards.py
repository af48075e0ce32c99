"""W&B dashboards as code (wandb-workspaces): one saved workspace view per figure of the paper, each showing
the runs of one W&B group (= experiment_name: scaling, emergence, pruning, mini) with the metric names of
DESIGN §6, grouped by the tags that tell the cells apart.

  python -m phi1.dashboards --entity <entity> [--project phi1]   # saves the views, prints their URLs
  python -m phi1.dashboards --entity <entity> --dry-run           # lists the views and panels, saves nothing
"""

from __future__ import annotations

import argparse

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws

TRAINING = ["train/loss", "val/loss"]


def _training_section(name: str = "Training") -> ws.Section:
    return ws.Section(name=name, is_open=False, panels=[
        wr.LinePlot(title="loss", y=TRAINING),
        wr.LinePlot(title="learning rate", y=["train/lr"]),
        wr.LinePlot(title="tokens/s (job)", y=["perf/tokens_per_sec"]),
        wr.LinePlot(title="MFU per GPU (DESIGN §7)", y=["perf/mfu"]),
    ])


def _group(name: str) -> ws.RunsetSettings:
    return ws.RunsetSettings(filters=[ws.Metric("Group") == name])


def views(entity: str, project: str) -> list[ws.Workspace]:
    fig21 = [
        wr.BarPlot(title="HumanEval pass@1 by model, tokens and data (Figure 2.1)",
                   metrics=["eval/humaneval/pass@1"], orientation="v", groupby="config.cfg.data.name"),
        wr.BarPlot(title="HumanEval solution NLL, last (lower is better)", metrics=["eval/humaneval/solution_nll"],
                   orientation="v", groupby="config.cfg.data.name"),
        wr.LinePlot(title="HumanEval solution NLL at each evaluation", y=["eval/humaneval/solution_nll"]),
    ]
    return [
        ws.Workspace(entity=entity, project=project, name="Figure 2.1: scaling", runset_settings=_group("scaling"),
                     sections=[ws.Section(name="Figure 2.1", is_open=True, panels=fig21), _training_section()]),
        ws.Workspace(entity=entity, project=project, name="Mini reproduction", runset_settings=_group("mini"),
                     sections=[ws.Section(name="Figure 2.1 in miniature", is_open=True, panels=fig21),
                               _training_section()]),
        ws.Workspace(entity=entity, project=project, name="Emergence and Table 2", runset_settings=_group("emergence"),
                     sections=[ws.Section(name="phi-1-small vs phi-1-base vs phi-1", is_open=True, panels=[
                         wr.BarPlot(title="HumanEval pass@1", metrics=["eval/humaneval/pass@1"], orientation="v"),
                         wr.BarPlot(title="MBPP pass@1", metrics=["eval/mbpp/pass@1"], orientation="v"),
                         wr.BarPlot(title="unconventional problems: GPT-4 score (0-10, Table 2)",
                                    metrics=["eval/unconventional/score"], orientation="v"),
                         wr.BarPlot(title="unconventional problems: pass@1", metrics=["eval/unconventional/pass@1"],
                                    orientation="v"),
                     ])]),
        ws.Workspace(entity=entity, project=project, name="Table 3: pruning", runset_settings=_group("pruning"),
                     sections=[ws.Section(name="retrained on pruned CodeExercises", is_open=True, panels=[
                         wr.BarPlot(title="HumanEval pass@1 by τ", metrics=["eval/humaneval/pass@1"],
                                    orientation="v", groupby="config.cfg.tau"),
                         wr.LinePlot(title="HumanEval pass@1 at each checkpoint", y=["eval/humaneval/pass@1"]),
                     ]), _training_section()]),
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
            print(f"{view.name}: {view.save().url}")


if __name__ == "__main__":
    main()
