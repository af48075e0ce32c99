"""HF export: a checkpoint as a folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load.

    python -m phi1.export outputs/<run>/checkpoints/last.ckpt [out_dir]   # default: <run>/hf-<checkpoint name>
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from phi1 import atomic
from phi1.errors import InputError, MissingInputError, Phi1Error

log = logging.getLogger(__name__)


def replaceable(out: Path) -> None:
    """Refuse an `out` that the export would destroy: it replaces its folder whole, and `python -m phi1.export
    <run>/checkpoints/last.ckpt <run>` deleted the run's checkpoints, logs and metrics. New, empty, or an earlier
    export (config.json among files only: save_pretrained writes no subfolder) may be written over."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out}: a file; the export is a folder: choose a new one")
    entries = list(out.iterdir())
    why = ("no config.json" if entries and not (out / "config.json").is_file()
           else "it has subfolders" if any(e.is_dir() for e in entries) else None)
    if why:
        raise InputError(f"{out}: not empty and not an HF export ({why}); the export replaces its folder whole: "
                         "choose a new or empty folder")


def export_hf(module, tokenizer_dir: Path, out: Path) -> Path:
    out = Path(out)
    replaceable(out)
    from transformers import AutoTokenizer

    # Beside `out`, named by host and pid (phi1.atomic): never a folder of the user's, nor another writer's.
    atomic.remove_stale(out, hidden=True)
    tmp = atomic.temporary(out, hidden=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # The model is built before the tokenizer exists; its EOS is known now, and generation should stop there.
    model = module.model
    for config in (model.config, model.generation_config):
        config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("HF export: %s", out)
    return out


def export_checkpoint(ckpt: Path, out: Path | None = None) -> Path:
    from phi1 import tokenizer as tokenizers
    from phi1.checkpoints import is_checkpoint
    from phi1.module import LanguageModel

    ckpt = Path(ckpt)
    if (ckpt / "config.json").is_file():
        raise InputError(f"{ckpt}: an HF folder already (config.json); evaluate.py and from_pretrained read it as "
                         "it is. This command exports a train.py checkpoint (checkpoints/*.ckpt)")
    if not is_checkpoint(ckpt):
        raise MissingInputError(f"{ckpt}: no such checkpoint (a file, or the folder DeepSpeed writes)")
    out = Path(out or ckpt.parent.parent / f"hf-{ckpt.stem}")
    replaceable(out)  # before the checkpoint is read (1.3B: ~20 s)
    module = LanguageModel.from_checkpoint(ckpt)
    with tokenizers.of_checkpoint(module, ckpt) as tokenizer_dir:
        return export_hf(module, tokenizer_dir, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path, help="a Lightning checkpoint written by train.py")
    parser.add_argument("out", type=Path, nargs="?", help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(export_checkpoint(args.ckpt, args.out))
    except Phi1Error as e:  # the message says what to fix; a traceback would bury it
        parser.exit(1, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
