"""Lightning's DeepSpeed strategy on the CPU, for tests: the real strategy, engine, ZeRO-2 optimizer and
checkpoint format, so that the paths the paper's configs take (`trainer=deepspeed`) run where there is no GPU.

Lightning refuses the CPU ("only supported on CUDA GPUs") but DeepSpeed runs there (its CPU accelerator, gloo).
`allow(setattr)` lifts Lightning's CUDA and device-index checks, DeepSpeed's device index (None on the CPU) and
DeepSpeed's shared-memory collectives for CPU ranks (a C++ build of ~30 s; gloo does without).

    python tests/deepspeed_cpu.py <train.py overrides>    # train.py so, e.g. with trainer.devices=2
"""

import importlib

import hydra

OVERRIDES = ["trainer=deepspeed", "trainer.accelerator=cpu", "trainer.num_nodes=1", "trainer.precision=32-true"]


def allow(setattr=setattr) -> None:
    """Apply the lifts with `setattr` (pytest's monkeypatch.setattr undoes them after the test)."""
    import lightning.pytorch.strategies.deepspeed as lightning_deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine
    from lightning.pytorch.strategies import DDPStrategy

    setattr(lightning_deepspeed.DeepSpeedStrategy, "setup_environment", DDPStrategy.setup_environment)
    setattr(lightning_deepspeed, "_validate_device_index_selection", lambda devices: None)
    # (deepspeed.comm's attribute `torch` is torch itself, hence import_module)
    setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    set_distributed_vars = DeepSpeedEngine._set_distributed_vars

    def device_zero(self, args):
        if getattr(args, "device_rank", 0) is None:
            args.device_rank = 0
        return set_distributed_vars(self, args)

    setattr(DeepSpeedEngine, "_set_distributed_vars", device_zero)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg) -> None:
    from phi1.train import train

    train(cfg)


if __name__ == "__main__":  # Lightning starts the other ranks with this same command line
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: else CUDA where there is one
    from phi1.config import register_configs

    register_configs()
    allow()
    main()
