"""Documents from the configured sources, as (id, text) pairs in a fixed order.

Kinds: `stdlib` (the running interpreter's standard library: the embedded stand-in for The Stack, DESIGN §4),
`stdlib_functions` (its top-level functions that have a docstring and a body: signature + docstring +
body, a CodeExercises-like set; `exercises` splits them into prompt and solution), `dir` (a folder of .py
files, hidden folders and installed packages left out), `jsonl` (files of {"id", "text", ...} rows, gz
allowed), `parquet` (local Parquet files) and `hf` (a Hugging Face dataset, streamed, or a folder written by
`datasets.save_to_disk`).

Rows can be filtered before they count: `where` keeps rows whose field holds one of the listed values (or, for
a list field such as The Stack's licences, shares one), `min_chars`/`max_chars` bound the text's length.

Sharding (`shard`, `num_shards`): a source is a sequence of units (files; a saved dataset's rows; a streamed
dataset's files) and shard k of n takes the k-th contiguous slice of them, so concatenating shards 0..n-1
gives back the unsharded order. A streamed dataset with fewer files than shards falls back to row k, k+n, ...
"""

from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import string
import sys
import sysconfig
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

from omegaconf import DictConfig, OmegaConf

from phi1.errors import InputError

log = logging.getLogger(__name__)

# Folders that hold installed third-party or generated code, not the library's or the user's own: left out of
# every walk. A `dir` source also leaves out hidden folders (.git, .venv, .tox): `path=~/code` read 1 file of a
# project and the 1,394 files (18 MB) of pip in its .venv and venv.
_NOT_OWN = {"site-packages", "dist-packages", "__pycache__"}
# Test suites: kept in `stdlib` (mixed quality is the point, DESIGN §4), left out of `stdlib_functions`.
_TEST_DIRS = {"test", "tests", "idle_test"}


class SourceError(InputError):
    """A source is missing, empty or malformed; the message names the file and line."""


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _py_files(root: Path, skip_tests: bool = False, stdlib: bool = True) -> Iterator[str]:
    """The .py files under root as relative POSIX paths, in Path's order (sorted by their parts), without
    site-packages and caches; `stdlib=False` (a user's folder) also without hidden folders, `skip_tests` without
    test suites. A walk that sorts each folder's entries by name yields that order (files and folders of one
    folder sorted together: the parts first differ there) while holding one folder's names per level: a list
    of every file, built to sort it, took ~40 MB of the pack process for 100K files and was the bulk of its
    memory's growth with the corpus. Strings, not Paths: Path objects cost ~60 µs a file. Symbolic links to
    folders are not followed (as os.walk)."""
    if not root.is_dir():
        raise SourceError(f"{root}: no such directory")
    skip = _NOT_OWN | (_TEST_DIRS if skip_tests else set())

    def walk(folder: str, prefix: str) -> Iterator[str]:
        try:
            with os.scandir(folder) as it:
                entries = sorted((e.name, _kind(e)) for e in it)
        except OSError:  # unreadable: skipped, as os.walk does
            return
        for name, kind in entries:
            if kind == "folder" and name not in skip and (stdlib or not name.startswith(".")):
                yield from walk(os.path.join(folder, name), f"{prefix}{name}/")
            elif kind == "file" and name.endswith(".py"):
                yield prefix + name

    return walk(str(root), "")


def _kind(entry: os.DirEntry) -> str:
    """'folder' (to walk), 'link' (a link to a folder: neither walked nor a file, as in os.walk) or 'file'."""
    try:
        if entry.is_dir():
            return "link" if entry.is_symlink() else "folder"
    except OSError:
        pass
    return "file"


def _shard_of(files, shard: int, num_shards: int) -> Iterator[str]:
    """Shard k of n of a walk (`files()` starts one): counted in a first walk, taken in a second, so that no
    list of every file is kept."""
    if num_shards == 1:
        return files()
    n = sum(1 for _ in files())
    return islice(files(), shard * n // num_shards, (shard + 1) * n // num_shards)


def _read_text(path: str, on_error: str, skipped: list[str]) -> str | None:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        if on_error == "skip":
            skipped.append(f"{path}:{line}: not UTF-8")
            return None
        raise SourceError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start}); set on_error=skip to skip") from e


def source_lines(text: str) -> list[str]:
    """Python source's lines as `ast` numbers them (ended by \\n, \\r\\n or \\r), with their ends. str.splitlines
    also ends a line at a form feed, \\x1c-\\x1e, \\x85 or \\u2028, which Python does not: after the form feed in
    CPython 3.10's email/__init__.py, every function's prompt lost its docstring's closing line."""
    return io.StringIO(text, newline="").readlines()


def exercises(text: str) -> Iterator[tuple[str, str, str]]:
    """(name, prompt, solution) for each top-level function of a module that has a docstring and a body:
    prompt = decorators, signature and docstring; solution = the rest of the body (CodeExercises' shape,
    paper §2.2). Modules that do not parse yield nothing."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = source_lines(text)
    for node in tree.body:
        if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node)):
            continue
        if len(node.body) < 2:  # a docstring and nothing else: no solution to learn
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        docstring_end = node.body[0].end_lineno
        prompt = "".join(lines[first - 1 : docstring_end])
        solution = "".join(lines[docstring_end : node.end_lineno])
        if node.col_offset == 0 and prompt.strip() and solution.strip():
            yield node.name, prompt, solution if solution.endswith("\n") else solution + "\n"


def documents(
    source, skipped: list[str] | None = None, shard: int = 0, num_shards: int = 1, filtered: Counter | None = None
) -> Iterator[tuple[str, str]]:
    """Yield (id, text) for a SourceConfig (shard k of n of it). Undecodable or malformed inputs are appended
    to `skipped` (on_error=skip) or raise; rows the filters drop are counted by reason in `filtered`."""
    skipped = [] if skipped is None else skipped
    filtered = Counter() if filtered is None else filtered
    if isinstance(source, DictConfig):  # read per document below: a plain object is ~50x faster than OmegaConf's
        source = SimpleNamespace(**OmegaConf.to_container(source, resolve=True))
    count, skipped_before = 0, len(skipped)
    for doc_id, text, row in _documents(source, source.on_error, skipped, shard, num_shards):
        if source.limit is not None and count >= source.limit:
            break
        reason = _filtered_out(source, text, row)
        if reason:
            filtered[reason] += 1
            continue
        count += 1
        yield doc_id, text
    if count == 0 and num_shards == 1:
        raise SourceError(
            f"source {source.name!r} ({source.kind} {source.path or ''}) yielded no documents"
            + (f" ({dict(filtered)} filtered out)" if filtered else "")
            + (f"; {len(skipped) - skipped_before} skipped (on_error=skip), the first: {skipped[skipped_before]}"
               if len(skipped) > skipped_before else "")
        )


def _filtered_out(source, text: str, row: dict | None) -> str | None:
    if source.min_chars is not None and len(text) < source.min_chars:
        return "min_chars"
    if source.max_chars is not None and len(text) > source.max_chars:
        return "max_chars"
    for key, allowed in (source.where or {}).items():
        if row is None:
            raise SourceError(f"source {source.name!r}: `where` needs rows with fields; {source.kind} has none")
        value = row.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        if not set(map(str, values)) & set(map(str, allowed)):
            return f"where.{key}"
    return None


def _slice(units: Sequence, shard: int, num_shards: int) -> Sequence:
    """Shard k of n: the k-th contiguous slice, so shards 0..n-1 concatenated give back the whole."""
    return units[shard * len(units) // num_shards : (shard + 1) * len(units) // num_shards]


def _documents(source, on_error: str, skipped: list[str], shard: int, num_shards: int):
    kind = source.kind
    if kind in ("stdlib", "stdlib_functions", "dir"):
        root = stdlib_dir() if kind.startswith("stdlib") else Path(source.path).expanduser()
        walk = partial(_py_files, root, skip_tests=kind == "stdlib_functions", stdlib=kind != "dir")
        for rel in _shard_of(walk, shard, num_shards):
            text = _read_text(os.path.join(root, rel), on_error, skipped)
            if text is None:
                continue
            if kind == "stdlib_functions":
                for name, prompt, solution in exercises(text):
                    yield f"{source.name}:{rel}:{name}", prompt + solution, None
            elif text.strip():
                yield f"{source.name}:{rel}", text, None
    elif kind in ("jsonl", "parquet"):
        files = require_files(source)
        read = _jsonl if kind == "jsonl" else _parquet
        # A row without an id is named by its file and line, the file relative to the folder all the matched
        # files share: `*/part.jsonl` matches a/part.jsonl and b/part.jsonl, whose first lines were one id,
        # `part.jsonl:1` (and one judgement for both, one embedding row). Files of one folder keep their names.
        base = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        for file in _slice(files, shard, num_shards):
            yield from read(Path(file), os.path.relpath(os.path.abspath(file), base), source, on_error, skipped)
    elif kind == "hf":
        for i, row in _hf_rows(source, shard, num_shards):
            try:
                text = _text(row, source.text_field)
            except (KeyError, TypeError, IndexError) as e:
                _bad_input(f"{source.path} row {i}: {type(e).__name__}: {e}", on_error, skipped, e)
                continue
            yield f"{source.name}:{row.get(source.id_field, i)}", text, row
    else:
        raise SourceError(f"source {source.name!r}: unknown kind {kind!r}")


class SharedIds:
    """Ids that name documents of different texts, which the quality stages cannot tell apart: they join by id
    (a judgement to its document, a label to its embedding row, a score to its text), so each took the other's.
    Documents that share an id and their text are one document to them: The Stack's hexsha is a hash of the
    content, and its exact copies share it. 16 bytes a document (two 64-bit hashes), checked at the end."""

    def __init__(self, what: str, fix: str):
        self.what, self.fix = what, fix
        self._ids, self._texts = array("Q"), array("Q")

    def add(self, doc_id: str, text: str) -> None:
        self._ids.append(_hash64(doc_id))
        self._texts.append(_hash64(text))

    def check(self, ids: Sequence[str]) -> None:
        """Refuse, naming one, if an id of `ids` (the documents added, in order) names two texts."""
        import numpy as np

        id_hash, text_hash = np.frombuffer(self._ids, np.uint64), np.frombuffer(self._texts, np.uint64)
        order = np.lexsort((text_hash, id_hash))
        same_id = id_hash[order][1:] == id_hash[order][:-1]
        bad = np.flatnonzero(same_id & (text_hash[order][1:] != text_hash[order][:-1]))
        if len(bad):
            n = len(np.unique(id_hash[order][1:][bad]))
            raise SourceError(f"{self.what}: the id {ids[order[bad[0]]]!r} names documents of different texts"
                              + (f" (and {n - 1:,} more ids do)" if n > 1 else "") + "; the quality stages join "
                              f"annotations, embeddings and scores by id. {self.fix}")


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


ID_FIX = ("Set the source's id_field to a field unique to each row, or to one the rows lack: each row is then named "
          "by its file and line")


def require_files(source) -> list[str]:
    """The files of a jsonl or parquet source, or a SourceError naming the command that writes them; also checks
    a `dir` source's folder. train.py and prepare.py stage=pack check every source before any work: packing reads
    the sources in turn, and a missing second one stopped it after the first (hours for The Stack's share on a
    cluster, lost with the unfinished shard) and after the model was built (~20 s for 1.3B on the CPU)."""
    made_by = f"; it is written by: {source.made_by}" if getattr(source, "made_by", None) else ""
    if source.kind == "dir" and not Path(source.path).expanduser().is_dir():
        raise SourceError(f"source {source.name!r}: {source.path} is not a directory{made_by}")
    if source.kind not in ("jsonl", "parquet"):
        return []
    files = sorted(glob.glob(str(Path(source.path).expanduser())))
    if not files:
        raise SourceError(f"source {source.name!r}: no file matches {source.path}{made_by}")
    return files


def _jsonl(path: Path, name: str, source, on_error: str, skipped: list[str]) -> Iterator[tuple[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                text = _text(row, source.text_field)
            except (ValueError, KeyError, TypeError) as e:
                _bad_input(f"{path}:{line_no}: {type(e).__name__}: {e}", on_error, skipped, e)
                continue
            yield f"{source.name}:{row.get(source.id_field, f'{name}:{line_no}')}", text, row


def _parquet(path: Path, name: str, source, on_error: str, skipped: list[str]) -> Iterator[tuple[str, str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    except (OSError, pa.ArrowException) as e:  # not a Parquet file, truncated, ...
        raise SourceError(f"{path}: cannot read as Parquet ({e})") from e
    row_no = 0
    for batch in batches:
        for row in batch.to_pylist():
            row_no += 1
            try:
                text = _text(row, source.text_field)
            except (KeyError, TypeError, IndexError) as e:
                _bad_input(f"{path} row {row_no}: {type(e).__name__}: {e}", on_error, skipped, e)
                continue
            yield f"{source.name}:{row.get(source.id_field, f'{name}:{row_no}')}", text, row


def _bad_input(reason: str, on_error: str, skipped: list[str], cause: Exception) -> None:
    """A malformed line or row: counted when on_error=skip, else the end of the run, naming it."""
    if on_error != "skip":
        raise SourceError(reason + "; set on_error=skip to skip such inputs") from cause
    skipped.append(reason)


class MissingField(KeyError):
    def __str__(self) -> str:  # KeyError's own quotes the whole message
        return self.args[0]


def _text(row: dict, text_field: str) -> str:
    """The row's text: one field, or a format string over several ("{problem}{solution}")."""
    if not isinstance(row, dict):
        raise TypeError(f"a row is a JSON object, not {type(row).__name__}")
    try:
        text = text_field.format_map(row) if "{" in text_field else row[text_field]
    except KeyError as e:  # the usual first mistake with one's own data: another field name
        raise MissingField(f"no field {e.args[0]!r} (text_field={text_field!r}); the row has {sorted(row)}: set the "
                           "source's text_field") from None
    if not isinstance(text, str):
        raise TypeError(f"field {text_field!r} is {type(text).__name__}, not a string")
    if "{" in text_field and (empty := [name for _, name, _, _ in string.Formatter().parse(text_field)
                                        if name and row.get(re.split(r"[.[]", name)[0]) is None]):
        # format_map writes a JSON null as the word "None" into the training text
        raise MissingField(f"field {empty[0]!r} is null (text_field={text_field!r})")
    return text


def _hf_rows(source, shard: int, num_shards: int) -> Iterator[tuple[int, dict]]:
    import datasets

    path = Path(source.path).expanduser()
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(path))
        ds = ds[source.split] if isinstance(ds, datasets.DatasetDict) else ds
        first = shard * len(ds) // num_shards
        yield from enumerate(ds.shard(num_shards, shard, contiguous=True), first)
        return
    try:
        ds = datasets.load_dataset(
            source.path, name=source.subset, data_dir=source.data_dir, split=source.split, streaming=True
        )
    except Exception as e:  # the hub raises a dozen different types for "not reachable / not found"
        raise SourceError(
            f"source {source.name!r}: cannot load hub dataset {source.path!r} ({type(e).__name__}: {e}). "
            "Offline? Use a local source (data=stdlib) or a folder saved with datasets.save_to_disk."
        ) from e
    if num_shards == 1:
        yield from enumerate(ds)
    elif ds.num_shards >= num_shards:  # whole files per shard: each shard reads only its own
        yield from ((f"{shard}-{i}", row) for i, row in enumerate(ds.shard(num_shards, shard, contiguous=True)))
    else:
        log.warning("source %s has %d file(s) for %d shards: each shard reads every row and keeps 1 in %d",
                    source.name, ds.num_shards, num_shards, num_shards)
        yield from ((i, row) for i, row in enumerate(ds) if i % num_shards == shard)


def spec(source) -> dict:
    """The source's settings that decide its documents: all but `made_by`, a hint for error messages."""
    return {k: source.get(k) for k in sorted(source) if k != "made_by"}


def fingerprint(source) -> str:
    """Cheap identity of a source's content: file names, sizes and mtimes (or the dataset's coordinates)."""
    h = hashlib.sha256()
    h.update(json.dumps(spec(source), sort_keys=True, default=str).encode())
    if source.kind in ("stdlib", "stdlib_functions", "dir"):
        root = stdlib_dir() if source.kind.startswith("stdlib") else Path(source.path).expanduser()
        h.update(sys.version.encode() if source.kind.startswith("stdlib") else b"")
        for rel in _py_files(root, skip_tests=source.kind == "stdlib_functions", stdlib=source.kind != "dir"):
            st = os.stat(os.path.join(root, rel))
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    elif source.kind in ("jsonl", "parquet", "hf"):
        for file in sorted(glob.glob(str(Path(source.path).expanduser()))):
            for p in [Path(file), *sorted(Path(file).rglob("*"))] if Path(file).is_dir() else [Path(file)]:
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
