"""Evaluate a model (or a samples file) on HumanEval, MBPP or any HumanEval-format benchmark.
`python evaluate.py ckpt=<checkpoint | HF dir | hub id> benchmark=humaneval allow_code_execution=true`."""

import hydra

from phi1.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg) -> None:
    from phi1.errors import unwrapped
    from phi1.evaluate import evaluate

    with unwrapped():
        evaluate(cfg)


if __name__ == "__main__":
    main()
