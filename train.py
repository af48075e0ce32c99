"""Pretrain or finetune a phi-1 model. `python train.py` runs the embedded default (DESIGN §4);
`python train.py experiment=phi1_base` the paper's pretraining; `--cfg job` prints the composed config."""

import hydra

from phi1.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg) -> None:
    from phi1.errors import unwrapped
    from phi1.train import train  # imported here so that --help and --cfg stay fast

    with unwrapped():
        train(cfg)


if __name__ == "__main__":
    main()
