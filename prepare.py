"""Data stages: `python prepare.py stage=annotate llm=gpt4` (paper §2.1), ... (DESIGN §1)."""

import hydra

from phi1.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
def main(cfg) -> None:
    from phi1.errors import unwrapped
    from phi1.stages import run

    with unwrapped():
        run(cfg)


if __name__ == "__main__":
    main()
