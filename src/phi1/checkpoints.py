"""The checkpoints train.py writes: a file (plain Lightning), or a folder of ZeRO shards (Lightning's DeepSpeed
strategy, `trainer=deepspeed`). Everything that reads one (`init_from`, evaluate.py's `ckpt`, the HF export,
the best finetuning checkpoint) takes either, through `read_checkpoint`. Either is whole or absent: a file is
written to a temporary name and renamed (Lightning), a folder gets its `latest` file last
(`phi1.strategies.DeepSpeedStrategy`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from phi1.errors import MissingInputError


def is_deepspeed(path: Path) -> bool:
    """A folder that DeepSpeed finished writing: its `latest` file names the tag folder of the shards."""
    return (Path(path) / "latest").is_file()


def is_checkpoint(path: Path) -> bool:
    return Path(path).is_file() or is_deepspeed(path)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint as Lightning's dict (state_dict, hyper_parameters, global_step, callbacks, ...), on the CPU.
    From a DeepSpeed folder the weights are DeepSpeed's fp32 master weights gathered from the ZeRO shards
    (`zero_to_fp32`), not the bf16/fp16 copies the engine computes with."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    if not is_deepspeed(path):
        raise MissingInputError(f"{path}: not a checkpoint (a file, or a DeepSpeed folder with a 'latest' file)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_model_state_files

    tag = (path / "latest").read_text().strip()
    # Rank 0's model-states file holds Lightning's state beside the engine's; "module" (the weights in the
    # precision of the run) and "optimizer" are dropped, as the weights come from the shards.
    state = torch.load(sorted(get_model_state_files(str(path / tag)))[0], map_location="cpu", weights_only=False)
    checkpoint = {k: v for k, v in state.items() if k not in ("module", "optimizer")}
    weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag)
    # Lightning before 2.1 wrapped the module: its keys start with "_forward_module.".
    checkpoint["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in weights.items()}
    return checkpoint
