"""Tokenize, deduplicate and mix the sources into flat token files (DESIGN §5); `prepare.py stage=pack`.

Two steps, so that a cluster can share the first:
  shard k of n   tokenizes its slice of every source (sources.documents) and writes, per source, the tokens
                 (each document followed by EOS: paper §2.3 joins documents with <|endoftext|>) and one record
                 per document: its length, its split and a content hash (+ a MinHash signature for near-dedup).
                 Finished shards are folders renamed into place, so a killed pack redoes only the unfinished.
  merge          walks the records in shard order, drops exact and near duplicates (first one kept, across all
                 sources and both splits), and writes the mix.
Shard slices are contiguous, so the output does not depend on the number of shards.

Split: a document goes to `val` when a hash of its id falls under `data.val_fraction`: stable across runs,
machines, shard counts and source order. Mix: the train split holds as many tokens as the sources have
together after dedup, source i a share w_i / Σw of them: its tokens repeated (whole passes, then a prefix) to
fill that share; the manifest records the passes as `epochs`. Windows of seq_len + 1 tokens are cut when read,
so one pack serves every sequence length.

Encoding: encoder.py (a cache of pre-tokenized pieces: the tokenizer's ids, ~3x faster per core) in one worker
process per core, or `tokenizers` alone on its threads for tokenizers the cache cannot take.

Memory: tokens stream through files in fixed-size batches; folders of files are walked, not listed; each
worker's piece cache is bounded (64K pieces, ~12 MB); what grows with the corpus is the dedup index
(16 bytes + a set slot per document for exact dedup; a dict entry per LSH band per kept document for
near-dedup), ~100 bytes per document for exact: 35M Stack files ≈ 3.5 GB; near-dedup adds ~0.9 KB per kept one.

Output folder (written under a temporary name and renamed when complete):
  train.bin, val.bin   uint16 tokens (uint32 when the vocabulary exceeds 65,536)
  manifest.json        tokenizer, sources (documents, tokens, duplicates, skips, epochs), sha256 of each file
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from phi1 import atomic
from phi1 import tokenizer as tokenizers
from phi1.data import dedup, sources
from phi1.data.encoder import Encoder
from phi1.errors import MissingInputError

log = logging.getLogger(__name__)

FORMAT = 2
# One batch of encoding: up to 1024 documents or 4 MB of text, whichever comes first. Bounded in bytes because
# text in flight costs memory: with `tokenizers` alone an encoding costs ~70 bytes per token (ids, masks, token
# strings), 4 MB of Python is ~1M tokens, ~70 MB encoded; the piece cache's lists of pieces cost about as much.
BATCH_DOCS, BATCH_BYTES = 1024, 4 << 20
# Batches handed to `tokenizers` at once when it encodes alone (a tokenizer the piece cache cannot take). With
# one, a batch's last long document keeps one of its threads busy while the other idles; with two, the idle
# thread starts on the next batch (2 cores, 100 MB of Python, three interleaved runs: 16.8 s -> 15.2 s on
# average; three in flight gained nothing more; BENCHMARKS.md).
IN_FLIGHT = 2
# Worker processes for the piece cache (encoder.py), which is Python and so one core per process. The main
# process reads, hashes and writes ~4x faster than a worker encodes (100 MB of Python: ~2.5 s against ~10 s),
# so more than four workers would wait on it; each costs ~100 MB (its imports, a cache of ~12 MB).
MAX_WORKERS = 4
# Freed heap pages go back to the OS after this many characters of text (see _release_freed_memory). After every batch it cost
# ~1 s of main-thread time and ~1.3 s of page faults per 100 MB; every 16 MB keeps peak RSS within 5% of that.
TRIM_BYTES = 16 << 20
COPY_TOKENS = 4 << 20  # tokens per read when merging (with their masks, ~20 MB): memory flat in corpus size
RECORD = np.dtype([("tokens", "<u8"), ("val", "u1"), ("hash", "V16")])


def location(cfg: DictConfig, tokenizer_dir: Path) -> Path:
    spec = OmegaConf.to_container(cfg.data, resolve=True)
    spec.pop("seq_len")  # windows are cut at read time
    spec["sources"] = [sources.spec(source) for source in spec["sources"]]
    key = json.dumps(
        [FORMAT, spec, tokenizers.fingerprint(tokenizer_dir), [sources.fingerprint(s) for s in cfg.data.sources]],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.paths.data_dir).expanduser().resolve() / "packed" / f"{cfg.data.name}-{digest}"


def require_sources(cfg: DictConfig) -> None:
    """Every source's files exist (sources.require_files), checked before the tokenizer, the model or the pack
    is built. A pack or tokenizer found on disk does not exempt a source: their folders are keyed by the files'
    names, sizes and mtimes (sources.fingerprint), so a source without files never has one."""
    corpus = [cfg.tokenizer.corpus] if cfg.tokenizer.kind == "local" and cfg.tokenizer.corpus else []
    for source in [*cfg.data.sources, *corpus]:
        sources.require_files(source)


def shards_dir(directory: Path, num_shards: int) -> Path:
    return directory.with_name(f"{directory.name}.shards-{num_shards}")


def is_val(doc_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def run(cfg: DictConfig) -> Path | None:
    """`prepare.py stage=pack [shard=k] [num_shards=n]`: one shard, or all of them and the merge."""
    from phi1.config import check, data_checks

    check(data_checks(cfg))  # shard and num_shards: phi1.stages
    require_sources(cfg)
    tokenizer_dir = tokenizers.ensure(cfg)
    if cfg.shard is not None:
        path = pack_shard(cfg, tokenizer_dir, cfg.shard, cfg.num_shards)
        log.info("shard %d of %d done: %s (merge with: prepare.py stage=pack num_shards=%d)",
                 cfg.shard, cfg.num_shards, path, cfg.num_shards)
        return path
    directory = pack(cfg, tokenizer_dir, cfg.num_shards, keep_shards=cfg.stage.keep_shards)
    print(directory)
    return directory


def pack(cfg: DictConfig, tokenizer_dir: Path, num_shards: int = 1, keep_shards: bool = False) -> Path:
    """Pack `cfg.data` with the tokenizer in `tokenizer_dir` unless already packed; return the folder.
    Shards already written (by an earlier, killed run, or by other machines) are reused."""
    directory = location(cfg, tokenizer_dir)
    if (directory / "manifest.json").exists():
        return directory
    tokenizer = tokenizers.load_fast(tokenizer_dir, cfg)
    with _encoding(tokenizer_dir, tokenizer) as encode:
        for k in range(num_shards):
            pack_shard(cfg, tokenizer_dir, k, num_shards, directory, tokenizer, encode)
    manifest = merge(cfg, tokenizer_dir, num_shards, directory, tokenizer)
    if not keep_shards:
        shutil.rmtree(shards_dir(directory, num_shards), ignore_errors=True)
    log.info("packed %s: %s train / %s val tokens -> %s", cfg.data.name,
             f"{manifest['splits']['train']['tokens']:,}", f"{manifest['splits']['val']['tokens']:,}", directory)
    return directory


# ---------------------------------------------------------------------------------------------------- shards


def pack_shard(cfg: DictConfig, tokenizer_dir: Path, shard: int, num_shards: int, directory: Path | None = None,
               tokenizer=None, encode=None) -> Path:
    """Tokenize shard `shard` of `num_shards` of every source into its own folder; skip it if already done."""
    directory = directory or location(cfg, tokenizer_dir)
    out = shards_dir(directory, num_shards) / f"shard-{shard:05d}"
    if (directory / "manifest.json").exists():
        log.info("%s is already packed and merged; shard %d has nothing to do", directory, shard)
        return out
    if (out / "stats.json").exists():
        log.info("shard %d of %d already packed: %s", shard, num_shards, out)
        return out
    tokenizer = tokenizer or tokenizers.load_fast(tokenizer_dir, cfg)
    if encode is None:
        with _encoding(tokenizer_dir, tokenizer) as encode:
            return pack_shard(cfg, tokenizer_dir, shard, num_shards, directory, tokenizer, encode)
    dtype = _dtype(tokenizer)
    try:
        with _build_dir(out) as tmp:
            stats = [
                _encode_source(source, j, encode, tokenizer[1], cfg.data, dtype, tmp, shard, num_shards)
                for j, source in enumerate(cfg.data.sources)
            ]
            (tmp / "stats.json").write_text(json.dumps({"shard": shard, "num_shards": num_shards, "sources": stats}))
    except BaseException:
        with contextlib.suppress(OSError):  # the shards' folder, if this failed shard was its only content
            out.parent.rmdir()
        raise
    return out


@contextmanager
def _encoding(tokenizer_dir: Path, tokenizer):
    """A function `encode(texts)` -> future of (ids, ids per text), and how many batches to keep in flight.

    With the piece cache (encoder.py), one worker process per core, up to MAX_WORKERS, each with its own cache;
    started with `spawn`, not `fork`: a fork would inherit this process's threads (the tokenizer's among
    them). Otherwise `tokenizers` alone, on its own threads, IN_FLIGHT batches at once."""
    dtype = _dtype(tokenizer)
    encoder = Encoder(tokenizer[0], dtype)  # decides, and checks itself against the tokenizer
    if not encoder.fast:
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            yield lambda texts: pool.submit(encoder.encode, texts), IN_FLIGHT
        return
    workers = max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(str(tokenizer_dir / "tokenizer.json"), dtype.str)) as pool:
        # One batch more than workers: a worker that finishes finds the next batch waiting while this process
        # writes the oldest.
        yield lambda texts: pool.submit(_encode_in_worker, texts), workers + 1


_worker_encoder: Encoder | None = None


def _start_worker(tokenizer_json: str, dtype: str) -> None:
    from tokenizers import Tokenizer

    global _worker_encoder
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    # One core per worker: the tokenizer (asked only for pieces not seen yet) runs on this process's thread.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # check=False: the parent has just checked this tokenizer with this library.
    _worker_encoder = Encoder(Tokenizer.from_file(tokenizer_json), np.dtype(dtype), check=False)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_encoder.encode(texts)


def _exit_with_parent(parent: int) -> None:
    """A worker whose pack was killed (SIGKILL, or SIGTERM from a scheduler) would otherwise wait for work
    forever: it holds its own end of the queue it reads, so it never sees the queue close."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


@contextmanager
def _build_dir(final: Path):
    """A folder written under a temporary name and renamed into place when complete: a killed or failed build
    leaves nothing half-written, and when two processes build the same folder the first one's stays (the
    contents are identical). Named by host and pid: on a disk shared by several nodes, each node's local rank 0
    packs a missing pack (Lightning's prepare_data), and nodes started alike often give it the same pid. What
    a build killed hard on this host left (a pack's worth of tokens) is removed first."""
    atomic.remove_stale(final)
    tmp = atomic.temporary(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the OS. The tokenizer's threads allocate each encoding in their own
    malloc arenas, and the main thread frees them; glibc keeps those pages, so without this the resident size
    creeps up with every batch (measured: 624 MB for 100 MB of Python, 865 MB for 1 GB)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc only (Linux); elsewhere the allocator is left alone
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()


def _dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tokenizer[0].get_vocab_size(True) <= 2**16 else np.uint32)


def _batches(docs):
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc[1])
        if len(batch) == BATCH_DOCS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_source(source, j: int, encode, eos: int, data: DictConfig, dtype, out: Path, shard: int,
                   num_shards: int) -> dict:
    """Write source j's share of this shard: s<j>.tokens, s<j>.docs (RECORD rows) and s<j>.minhash."""
    submit, in_flight = encode
    signer = dedup.Signer(data.dedup) if data.dedup.near else None
    skipped: list[str] = []
    filtered: Counter = Counter()
    counts = {"documents": 0, "tokens": 0}
    untrimmed = 0  # characters of text encoded since the last _release_freed_memory
    val_fraction = data.val_fraction  # read once: a DictConfig lookup per document costs ~30 µs
    bar = tqdm(desc=f"pack {source.name}" + (f" [{shard}/{num_shards}]" if num_shards > 1 else ""),
               unit=" docs", dynamic_ncols=True, mininterval=1.0)
    t0 = time.perf_counter()
    tokens_f, docs_f = open(out / f"s{j}.tokens", "wb"), open(out / f"s{j}.docs", "wb")
    sig_f = open(out / f"s{j}.minhash", "wb") if signer else None

    def emit(batch, encoded):
        # Runs while the workers (or the tokenizer's threads, which release the GIL) encode the next batches,
        # so this work and the reading of the next batch overlap with encoding instead of adding to it.
        nonlocal untrimmed
        flat, lengths = encoded
        stream = np.insert(flat, np.cumsum(lengths), eos)  # each document followed by EOS
        records = np.empty(len(batch), dtype=RECORD)
        records["tokens"] = lengths + 1
        records["val"] = [is_val(doc_id, val_fraction) for doc_id, _ in batch]
        records["hash"] = [hashlib.blake2b(text.encode(), digest_size=16).digest() for _, text in batch]
        tokens_f.write(stream.tobytes())
        docs_f.write(records.tobytes())
        if signer:
            starts = np.cumsum(lengths) - lengths
            sig_f.write(np.stack([signer.signature(flat[a : a + n]) for a, n in zip(starts, lengths)]).tobytes())
        counts["documents"] += len(batch)
        counts["tokens"] += len(stream)
        untrimmed += sum(len(text) for _, text in batch)
        if untrimmed >= TRIM_BYTES:
            _release_freed_memory()
            untrimmed = 0
        bar.update(len(batch))
        bar.set_postfix_str(f"{counts['tokens'] / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")

    try:
        docs = sources.documents(source, skipped, shard, num_shards, filtered)
        pending: deque = deque()  # (batch, future of its ids), oldest first: written in input order
        for batch in _batches(docs):
            pending.append((batch, submit([text for _, text in batch])))
            if len(pending) == in_flight:
                batch, future = pending.popleft()
                emit(batch, future.result())
        while pending:
            batch, future = pending.popleft()
            emit(batch, future.result())
    finally:
        bar.close()
        for f in (tokens_f, docs_f, sig_f):
            if f:
                f.close()
    for reason in skipped[:5]:
        log.warning("skipped %s", reason)
    if skipped:
        log.warning("source %s: skipped %d input(s) (on_error=skip)", source.name, len(skipped))
    return {**counts, "skipped": len(skipped), "skipped_examples": skipped[:20], "filtered": dict(filtered)}


# ----------------------------------------------------------------------------------------------------- merge


def merge(cfg: DictConfig, tokenizer_dir: Path, num_shards: int, directory: Path | None = None,
          tokenizer=None) -> dict:
    """Deduplicate and mix finished shards into the pack folder; return its manifest."""
    directory = directory or location(cfg, tokenizer_dir)
    root = shards_dir(directory, num_shards)
    shard_dirs = [root / f"shard-{k:05d}" for k in range(num_shards)]
    missing = [k for k, d in enumerate(shard_dirs) if not (d / "stats.json").exists()]
    if missing:
        raise MissingInputError(
            f"{root}: shard(s) {missing} of {num_shards} are not packed yet; run prepare.py stage=pack "
            f"shard=<k> num_shards={num_shards} for them (or without shard= to pack them here)"
        )
    tokenizer = tokenizer or tokenizers.load_fast(tokenizer_dir, cfg)
    dtype = _dtype(tokenizer)
    with _build_dir(directory) as tmp:
        manifest = _merge_into(tmp, cfg, tokenizer, tokenizer_dir, dtype, shard_dirs)
    return manifest


def _merge_into(tmp: Path, cfg: DictConfig, tokenizer, tokenizer_dir: Path, dtype, shard_dirs: list[Path]) -> dict:
    stats = [json.loads((d / "stats.json").read_text())["sources"] for d in shard_dirs]
    index = dedup.Index(cfg.data.dedup)
    itemsize = dtype.itemsize
    per_source = []
    with open(tmp / "val.bin", "wb") as val:
        for j, source in enumerate(cfg.data.sources):
            part = tmp / f"s{j}.train"
            kept = {"train": {"documents": 0, "tokens": 0}, "val": {"documents": 0, "tokens": 0}}
            dups = Counter()
            seen = 0
            with open(part, "wb") as train:
                for d in shard_dirs:
                    # `limit` is the first N documents of the whole source: each shard stopped at N, and the
                    # merge keeps the first N in shard order, as one unsharded pass would have.
                    room = None if source.limit is None else source.limit - seen
                    seen += _copy_kept(d, j, source.name, index, cfg.data.dedup, dtype, train, val, kept, dups, room)
            if seen == 0:
                raise sources.SourceError(f"source {source.name!r} ({source.kind} {source.path or ''}) yielded no documents")
            if kept["train"]["tokens"] == 0:
                raise sources.SourceError(
                    f"source {source.name!r}: no training documents left (every one fell in the validation split"
                    " or was a duplicate)"
                )
            per_source.append((source, part, kept, dups, [s[j] for s in stats], seen))

        # Mix: the train split holds as many tokens as the sources have together, each source weight/Σw of them.
        total = sum(kept["train"]["tokens"] for _, _, kept, *_ in per_source)
        weights = sum(source.weight for source, *_ in per_source)
        manifest_sources = []
        with open(tmp / "train.bin", "wb") as train:
            for source, part, kept, dups, shard_stats, seen in per_source:
                have = kept["train"]["tokens"]
                target = round(total * source.weight / weights)
                _repeat(part, train, target * itemsize)
                part.unlink()
                filtered = sum((Counter(s["filtered"]) for s in shard_stats), Counter())
                manifest_sources.append({
                    "name": source.name, "kind": source.kind, "path": source.path, "weight": source.weight,
                    "share": source.weight / weights,
                    "read": {"documents": seen},
                    # skips and filters as the shards met them (with `limit`, each shard reads up to N)
                    "skipped": sum(s["skipped"] for s in shard_stats),
                    "skipped_examples": [e for s in shard_stats for e in s["skipped_examples"]][:20],
                    "filtered": dict(filtered),
                    "duplicates": dict(dups),
                    "train": kept["train"], "val": kept["val"],
                    "epochs": target / have, "train_tokens_in_mix": target,
                })
    if (tmp / "val.bin").stat().st_size == 0 and cfg.data.val_fraction > 0:
        # A hash of each id picks ~val_fraction of the documents: a small corpus (a user's repository of a hundred
        # files at the default 0.01) can get none. The count and the fraction that holds out ~2 say how far off.
        documents = sum(kept["train"]["documents"] for _, _, kept, *_ in per_source)
        names = ", ".join(source.name for source, *_ in per_source)
        enough = min(0.5, math.ceil(200 / max(documents, 1)) / 100)  # the least whole percent expected to give 2
        raise sources.SourceError(
            f"data {cfg.data.name!r} (sources: {names}): none of its {documents:,} documents fell in the validation "
            f"split at data.val_fraction={cfg.data.val_fraction:g} (a hash of each id picks that share); raise it "
            f"(data.val_fraction={enough:g} holds out ~{enough * documents:.0f}) or add documents"
        )
    manifest = {
        "format": FORMAT,
        "data": cfg.data.name,
        "tokenizer": {
            "name": cfg.tokenizer.name, "kind": cfg.tokenizer.kind, "hub_id": cfg.tokenizer.hub_id,
            "fingerprint": tokenizers.fingerprint(tokenizer_dir),
            "vocab_size": tokenizer[0].get_vocab_size(True), "eos_token_id": tokenizer[1],
        },
        "dtype": dtype.name,
        "val_fraction": cfg.data.val_fraction,
        "dedup": OmegaConf.to_container(cfg.data.dedup),
        "sources": manifest_sources,
        "splits": {
            split: {"tokens": (tmp / f"{split}.bin").stat().st_size // itemsize, "sha256": _sha256(tmp / f"{split}.bin")}
            for split in ("train", "val")
        },
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _copy_kept(shard: Path, j: int, name: str, index: "dedup.Index", cfg, dtype, train, val, kept, dups,
               room: int | None) -> int:
    """Append source j's documents of one shard (the first `room` of them) that are not duplicates to the split
    files; return how many documents were considered."""
    records = np.fromfile(shard / f"s{j}.docs", dtype=RECORD)[:room]  # 25 bytes a document
    signatures = (np.memmap(shard / f"s{j}.minhash", dtype=np.uint32, mode="r").reshape(-1, cfg.num_perm)
                  if cfg.near else None)
    ends = np.cumsum(records["tokens"], dtype=np.int64)
    start = 0
    with open(shard / f"s{j}.tokens", "rb") as tokens:
        while start < len(records):  # chunks of whole documents, ~COPY_TOKENS tokens each
            base = int(ends[start - 1]) if start else 0
            stop = max(start + 1, int(np.searchsorted(ends, base + COPY_TOKENS, side="right")))
            chunk = records[start:stop]
            stream = np.frombuffer(tokens.read(int(chunk["tokens"].sum()) * dtype.itemsize), dtype=dtype)
            keep = np.ones(len(chunk), dtype=bool)
            for i, record in enumerate(chunk):
                reason = index.add(record["hash"].tobytes(),
                                   None if signatures is None else signatures[start + i], name)
                if reason:
                    keep[i] = False
                    dups[reason] += 1
            for split, flag, f in (("train", 0, train), ("val", 1, val)):
                docs = keep & (chunk["val"] == flag)
                mask = np.repeat(docs, chunk["tokens"].astype(np.int64))
                f.write(stream[mask].tobytes())
                kept[split]["documents"] += int(docs.sum())
                kept[split]["tokens"] += int(mask.sum())
            start = stop
    return len(records)


def _repeat(src: Path, dst, nbytes: int, chunk: int = 1 << 24) -> None:
    """Write `nbytes` of src to dst: whole passes over it, then a prefix (in chunks: flat memory)."""
    size = src.stat().st_size
    with open(src, "rb") as f:
        while nbytes > 0:
            f.seek(0)
            left = min(size, nbytes)
            while left > 0:
                data = f.read(min(chunk, left))
                dst.write(data)
                left -= len(data)
            nbytes -= min(size, nbytes)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
