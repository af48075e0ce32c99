"""Tokenize the sources and pack them into flat token files (DESIGN §5).

Each document is encoded and followed by the EOS token (paper §2.3: documents joined with <|endoftext|> into
one stream). Documents go to the `val` split when a hash of their id falls under `data.val_fraction`, so the
split is stable across runs, machines and source order. The train split mixes the sources by weight: each
source's stream is repeated (whole passes, then a prefix) until it holds its share of the tokens,
share_i = weight_i / Σ weights of the total, and the manifest records those epochs. Windows of seq_len + 1
tokens are cut when reading, so one pack serves every sequence length.

Output, written to a temporary folder and renamed into place when complete:
  train.bin, val.bin   uint16 tokens (uint32 when the vocabulary exceeds 65,536)
  manifest.json        tokenizer, sources with weights, documents, tokens and epochs, sha256 of each file
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from phi1 import tokenizer as tokenizers
from phi1.data import sources

log = logging.getLogger(__name__)

FORMAT = 1
ENCODE_BATCH = 256  # documents per `encode_batch` call: large enough for tokenizers' threads to share the work


def location(cfg: DictConfig, tokenizer_dir: Path) -> Path:
    spec = OmegaConf.to_container(cfg.data, resolve=True)
    spec.pop("seq_len")  # windows are cut at read time
    key = json.dumps(
        [FORMAT, spec, tokenizers.fingerprint(tokenizer_dir), [sources.fingerprint(s) for s in cfg.data.sources]],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.paths.data_dir).expanduser().resolve() / "packed" / f"{cfg.data.name}-{digest}"


def is_val(doc_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _encode_source(source, tokenizer, fraction: float, dtype, out: dict[str, Path]) -> dict:
    """Append one source's documents to per-split files; return its counts."""
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    backend = tokenizer.backend_tokenizer
    stats = {"train": {"documents": 0, "tokens": 0}, "val": {"documents": 0, "tokens": 0}}
    skipped: list[str] = []
    files = {split: open(path, "ab") for split, path in out.items()}
    bar = tqdm(desc=f"pack {source.name}", unit=" docs", dynamic_ncols=True, mininterval=1.0)
    t0 = time.perf_counter()

    def flush(batch):
        for (doc_id, _), enc in zip(batch, backend.encode_batch([t for _, t in batch], add_special_tokens=False)):
            split = "val" if is_val(doc_id, fraction) else "train"
            ids = np.asarray(enc.ids, dtype=dtype)
            files[split].write(ids.tobytes())
            files[split].write(eos.tobytes())
            stats[split]["documents"] += 1
            stats[split]["tokens"] += len(ids) + 1
        bar.update(len(batch))
        tokens = stats["train"]["tokens"] + stats["val"]["tokens"]
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")

    try:
        batch = []
        for doc in sources.documents(source, skipped):
            batch.append(doc)
            if len(batch) == ENCODE_BATCH:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    finally:
        bar.close()
        for f in files.values():
            f.close()
    for reason in skipped[:5]:
        log.warning("skipped %s", reason)
    if skipped:
        log.warning("source %s: skipped %d input(s)", source.name, len(skipped))
    return {**stats, "skipped": len(skipped)}


def pack(cfg: DictConfig, tokenizer_dir: Path) -> Path:
    """Pack `cfg.data` with the tokenizer in `tokenizer_dir` unless already packed; return the folder."""
    directory = location(cfg, tokenizer_dir)
    if (directory / "manifest.json").exists():
        return directory
    tokenizer = tokenizers.load(tokenizer_dir, cfg)
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _pack_into(tmp, cfg, tokenizer, tokenizer_dir, dtype)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written survives a failure
        raise
    try:
        tmp.rename(directory)
    except OSError:  # another process packed the same data first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("packed %s: %s train / %s val tokens -> %s", cfg.data.name,
             f"{manifest['splits']['train']['tokens']:,}", f"{manifest['splits']['val']['tokens']:,}", directory)
    return directory


def _pack_into(tmp: Path, cfg: DictConfig, tokenizer, tokenizer_dir: Path, dtype) -> dict:

    per_source = []
    for i, source in enumerate(cfg.data.sources):
        parts = {split: tmp / f"source{i}.{split}.bin" for split in ("train", "val")}
        per_source.append((source, parts, _encode_source(source, tokenizer, cfg.data.val_fraction, dtype, parts)))

    # Mix: the train split holds as many tokens as the sources have together, each source weight/Σw of them.
    total = sum(stats["train"]["tokens"] for _, _, stats in per_source)
    weights = sum(source.weight for source, _, _ in per_source)
    itemsize = np.dtype(dtype).itemsize
    manifest_sources = []
    with open(tmp / "train.bin", "wb") as train, open(tmp / "val.bin", "wb") as val:
        for source, parts, stats in per_source:
            have = stats["train"]["tokens"]
            if have == 0:
                raise sources.SourceError(f"source {source.name!r}: every document fell in the validation split")
            target = round(total * source.weight / weights)
            data = np.memmap(parts["train"], dtype=dtype, mode="r")
            for start in range(0, target, have):
                train.write(data[: min(have, target - start)].tobytes())
            del data
            with open(parts["val"], "rb") as f:
                shutil.copyfileobj(f, val)
            for path in parts.values():
                path.unlink()
            manifest_sources.append({
                "name": source.name, "kind": source.kind, "path": source.path, "weight": source.weight,
                "share": source.weight / weights, "train": stats["train"], "val": stats["val"],
                "skipped": stats["skipped"], "epochs": target / have, "train_tokens_in_mix": target,
            })
    for path in ("train.bin", "val.bin"):
        if (tmp / path).stat().st_size == 0:
            raise sources.SourceError(
                f"data {cfg.data.name!r}: the {path[:-4]} split is empty; raise data.val_fraction or add documents"
            )

    manifest = {
        "format": FORMAT,
        "data": cfg.data.name,
        "tokenizer": {
            "name": cfg.tokenizer.name, "fingerprint": tokenizers.fingerprint(tokenizer_dir),
            "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
        },
        "dtype": np.dtype(dtype).name,
        "val_fraction": cfg.data.val_fraction,
        "sources": manifest_sources,
        "splits": {
            split: {"tokens": (tmp / f"{split}.bin").stat().st_size // itemsize, "sha256": _sha256(tmp / f"{split}.bin")}
            for split in ("train", "val")
        },
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
