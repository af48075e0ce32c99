"""Tokenizers: the paper's (codegen-350M-mono, from the hub) or a byte-level BPE trained here, offline.

Either way the tokenizer is saved once under `<data_dir>/tokenizers/` and loaded from there by packing and
training; checkpoints and HF exports carry a copy of its files (`of_checkpoint`). Its identity (`fingerprint`) is
the sha256 of its `tokenizer.json`: packed data records it, and training refuses data packed with another
tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from omegaconf import DictConfig

from phi1 import atomic
from phi1.data import sources
from phi1.errors import MissingInputError, Phi1Error

if TYPE_CHECKING:
    import tokenizers
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)


class TokenizerError(Phi1Error, RuntimeError):
    pass


def location(cfg: DictConfig) -> Path:
    """Where this tokenizer config lives on disk; a local BPE's folder is keyed by its corpus and settings."""
    tok = cfg.tokenizer
    root = Path(cfg.paths.data_dir).expanduser().resolve() / "tokenizers"
    if tok.kind == "hub":
        return root / tok.hub_id.replace("/", "--")
    key = hashlib.sha256(
        json.dumps([tok.vocab_size, tok.eos_token, sources.fingerprint(tok.corpus)]).encode()
    ).hexdigest()[:12]
    return root / f"{tok.name}-{key}"


def fingerprint(directory: Path) -> str:
    return hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest()[:16]


def ensure(cfg: DictConfig) -> Path:
    """Build (local) or fetch (hub) the tokenizer if it is not on disk yet; return its folder."""
    directory = location(cfg)
    if (directory / "tokenizer.json").exists():
        return directory
    tok = cfg.tokenizer
    if tok.kind == "hub":
        tokenizer = _from_hub(tok.hub_id)
    else:
        tokenizer = _train_bpe(tok)
    # Written to a temporary folder and renamed, so a killed build never leaves a half tokenizer behind; named by
    # host and pid, since every node of a multi-node job may build it at once on a shared disk.
    atomic.remove_stale(directory)
    tmp = atomic.temporary(directory)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(directory)
    except OSError:  # another process finished first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


@contextlib.contextmanager
def of_checkpoint(module, ckpt: Path) -> Iterator[Path]:
    """The folder of the tokenizer a train.py checkpoint (LanguageModel.from_checkpoint's module) trained with,
    while the block runs: the copy the checkpoint keeps; for a checkpoint from before it kept one, the folder the
    run's paths.data_dir names, else the run's HF export. The run's data_dir is ./data by default, relative to where
    it trained: `python ~/phi1/evaluate.py ckpt=...` from another folder looked for it there and failed in
    transformers with "Repo id must be in the form 'repo_name'"."""
    if files := module.tokenizer_files:
        with tempfile.TemporaryDirectory(prefix="phi1-tokenizer-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            yield Path(tmp)
        return
    ckpt = Path(ckpt).absolute()
    places = [location(module.cfg)]
    if ckpt.parent.name == "checkpoints":  # <run>/checkpoints/<name>.ckpt (a file, or DeepSpeed's folder)
        places.append(ckpt.parent.parent / "hf")
    for place in places:
        if (place / "tokenizer.json").is_file():
            yield place
            return
    raise MissingInputError(
        f"{ckpt}: its tokenizer is in none of {', '.join(map(str, places))} (the run's paths.data_dir is "
        f"{module.cfg.paths.data_dir!r}, relative to the folder it trained in where not absolute): run this command "
        "from that folder, or export the run there (python -m phi1.export) and use the export")


def load(directory: Path, cfg: DictConfig) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    _check(directory, cfg, tokenizer.eos_token, len(tokenizer))
    return tokenizer


def load_fast(directory: Path, cfg: DictConfig) -> tuple[tokenizers.Tokenizer, int]:
    """The bare `tokenizers` object and its EOS id: what packing needs, without importing transformers
    (2.4 s of start-up here)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(cfg.tokenizer.eos_token)
    _check(directory, cfg, None if eos_id is None else cfg.tokenizer.eos_token, tokenizer.get_vocab_size(True))
    return tokenizer, eos_id


def _check(directory: Path, cfg: DictConfig, eos: str | None, size: int) -> None:
    if eos != cfg.tokenizer.eos_token:
        raise TokenizerError(f"{directory}: EOS token is {eos!r}, but tokenizer.eos_token={cfg.tokenizer.eos_token!r}")
    if cfg.tokenizer.vocab_size is not None and size != cfg.tokenizer.vocab_size:
        raise TokenizerError(
            f"{directory}: the tokenizer has {size} tokens, but tokenizer.vocab_size={cfg.tokenizer.vocab_size}"
        )


def _from_hub(hub_id: str) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hub_id)
    except (OSError, ValueError) as e:
        raise TokenizerError(
            f"cannot fetch tokenizer {hub_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Without network access, use tokenizer=local (a byte-level BPE trained on the local corpus)."
        ) from e


def _train_bpe(tok: DictConfig) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    bpe = Tokenizer(models.BPE())
    # Byte-level: every string is encodable, no unknown token (as GPT-2/codegen's tokenizer).
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tok.vocab_size,
        special_tokens=[tok.eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    skipped: list[str] = []
    texts = (text for _, text in sources.documents(tok.corpus, skipped))
    bpe.train_from_iterator(texts, trainer=trainer)
    log.info("trained a %d-token byte-level BPE on %s in %.1f s (%d inputs skipped)",
             bpe.get_vocab_size(), tok.corpus.name, time.perf_counter() - t0, len(skipped))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=tok.eos_token, bos_token=tok.eos_token, unk_token=tok.eos_token
    )
