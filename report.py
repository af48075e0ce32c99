"""Draw the paper's figures and tables (Figure 2.1, emergence, Tables 2 and 3) from the runs under outputs/:
`python report.py` (and `wandb=<entity>/<project>` to add the runs logged to W&B)."""

import hydra

from phi1.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="report")
def main(cfg) -> None:
    from phi1.errors import unwrapped
    from phi1.report import report

    with unwrapped():
        report(cfg)


if __name__ == "__main__":
    main()
