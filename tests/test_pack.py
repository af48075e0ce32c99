"""Packing at scale: shards, merge, dedup, resume after a kill, filters, and hub-style sources read offline."""

import functools
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from phi1 import tokenizer as tokenizers
from phi1.data import pack
from phi1.data.encoder import Encoder
from phi1.data.sources import SourceError, documents, stdlib_dir


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pack(cfg, num_shards=1):
    return pack.pack(cfg, tokenizers.ensure(cfg), num_shards)


def _function(rng: random.Random, i: int) -> str:
    """A distinct small Python function: different names, constants and operations."""
    ops = ["+", "-", "*", "//", "%"]
    lines = [f"def compute_{i}_{rng.randrange(10**6)}(values, limit={rng.randrange(100)}):",
             f'    """Fold the values with {rng.choice(ops)} and stop at the limit (case {i})."""',
             "    total = 0"]
    for k in range(rng.randrange(4, 9)):
        lines.append(f"    total = (total {rng.choice(ops)} values[{k}]) if len(values) > {k} else total + {rng.randrange(1000)}")
    lines += ["    return min(total, limit)", ""]
    return "\n".join(lines)


def test_output_does_not_depend_on_the_number_of_shards(small_cfg, tmp_path):
    rng = random.Random(3)
    src = tmp_path / "src"
    copied = _function(random.Random(99), 0)
    for i in range(90):  # 90 files in 9 folders; files 0, 10, ..., 80 are one text
        (src / f"pkg{i % 9}").mkdir(parents=True, exist_ok=True)
        (src / f"pkg{i % 9}" / f"m{i}.py").write_text(_function(rng, i) if i % 10 else copied)
    source = f"data.sources=[{{name: src, kind: dir, path: '{src}'}}]"
    one = _pack(small_cfg("data.dedup.near=true", "data.val_fraction=0.1", source))
    saved = {name: (one / name).read_bytes() for name in ("train.bin", "val.bin", "manifest.json")}
    for name in saved:
        (one / name).unlink()
    one.rmdir()
    three = _pack(small_cfg("data.dedup.near=true", "data.val_fraction=0.1", source), num_shards=3)
    assert three == one
    for name, data in saved.items():
        assert (three / name).read_bytes() == data, name
    assert not pack.shards_dir(three, 3).exists()  # shard files removed after the merge
    assert json.loads(saved["manifest.json"])["sources"][0]["duplicates"] == {"exact_within": 8}


def test_output_does_not_depend_on_batching(small_cfg, tmp_path, monkeypatch):
    """Batches of 1-3 documents, three encoding at once and a heap trim after each: the same bytes as the
    default batching (results are written in input order whatever batch finishes first)."""
    rng = random.Random(5)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"m{i:02d}.py").write_text(_function(rng, i) * rng.randrange(1, 30))  # 0.3-10 KB: uneven batches
    cfg = small_cfg("data.val_fraction=0.1", f"data.sources=[{{name: src, kind: dir, path: '{src}'}}]")
    default = _pack(cfg)
    saved = {p.name: p.read_bytes() for p in default.iterdir()}
    for p in default.iterdir():
        p.unlink()
    default.rmdir()
    monkeypatch.setattr(pack, "BATCH_DOCS", 3)
    monkeypatch.setattr(pack, "BATCH_BYTES", 4_000)
    monkeypatch.setattr(pack, "MAX_WORKERS", 1)
    monkeypatch.setattr(pack, "TRIM_BYTES", 1)
    small = _pack(cfg)
    assert {p.name: p.read_bytes() for p in small.iterdir()} == saved
    # and `tokenizers` alone, three batches on its threads at once, instead of the piece cache's workers
    for p in small.iterdir():
        p.unlink()
    small.rmdir()
    monkeypatch.setattr(pack, "Encoder", functools.partial(Encoder, fast=False))
    monkeypatch.setattr(pack, "IN_FLIGHT", 3)
    alone = _pack(cfg)
    assert {p.name: p.read_bytes() for p in alone.iterdir()} == saved


def _stdlib_texts(n: int) -> list[str]:
    """n files of the standard library, a third of them with non-ASCII text (names, docs, test strings)."""
    unicode, ascii_ = [], []
    for path in sorted(stdlib_dir().rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # the test suite's deliberately broken files
            continue
        (ascii_ if text.isascii() else unicode).append(text)
        if len(unicode) >= n // 3 and len(ascii_) >= n:
            break
    return unicode[: n // 3] + ascii_[: n - n // 3]


def _same_ids(encoder: Encoder, backend, texts: list[str]) -> None:
    flat, lengths = encoder.encode(texts)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for k, encoding in enumerate(backend.encode_batch_fast(texts, add_special_tokens=False)):
        assert flat[offsets[k] : offsets[k + 1]].tolist() == encoding.ids, texts[k][:200]


def test_the_piece_cache_gives_the_tokenizers_ids(small_cfg, monkeypatch):
    """On 240 standard-library files (80 with non-ASCII text), with the local BPE and with codegen's added
    tokens (runs of 2-31 spaces and 2-9 tabs); with texts cut into short parts and a cache emptied every 500
    pieces; and an EOS in the text."""
    from tokenizers import AddedToken, Tokenizer

    from phi1.data import encoder as encoder_module

    backend = Tokenizer.from_file(str(tokenizers.ensure(small_cfg()) / "tokenizer.json"))
    texts = _stdlib_texts(240)
    assert sum(not t.isascii() for t in texts) == 80
    texts.append("x = 1<|endoftext|>y = 'é'<|endoftext|>\n")
    encoder = Encoder(backend, np.uint16)
    assert encoder.fast  # else this compares `tokenizers` with itself
    for k in range(0, len(texts), 60):
        _same_ids(encoder, backend, texts[k : k + 60])
    assert len(encoder.cache) > 5000
    monkeypatch.setattr(encoder_module, "MAX_PIECES", 500)
    monkeypatch.setattr(encoder_module, "PART_CHARS", 300)  # texts cut into parts, pieces in groups of ~300 chars
    assert max(len(encoder._parts(t)) for t in texts[:40]) > 100
    _same_ids(encoder, backend, texts[:40])
    codegen_like = Tokenizer.from_file(str(tokenizers.ensure(small_cfg()) / "tokenizer.json"))
    codegen_like.add_tokens([AddedToken(" " * n) for n in range(31, 1, -1)] + [AddedToken("\t" * n) for n in range(9, 1, -1)])
    encoder = Encoder(codegen_like, np.uint16)
    assert encoder.fast
    _same_ids(encoder, codegen_like, texts)


def test_tokenizers_the_piece_cache_cannot_take_are_encoded_by_tokenizers_alone(small_cfg, monkeypatch, caplog):
    from tokenizers import Tokenizer, normalizers

    from phi1.data import encoder as encoder_module

    caplog.set_level(logging.INFO, logger="phi1.data.encoder")
    path = str(tokenizers.ensure(small_cfg()) / "tokenizer.json")
    texts = _stdlib_texts(30)
    lowercased = Tokenizer.from_file(path)
    lowercased.normalizer = normalizers.Lowercase()
    encoder = Encoder(lowercased, np.uint16)
    assert not encoder.fast and "it has a normalizer" in caplog.text
    _same_ids(encoder, lowercased, texts)
    # The self-check: a pattern that forgets the contractions ('s, 't, ...) is caught on creation.
    monkeypatch.setattr(encoder_module, "ASCII_PIECES", re.compile(encoder_module.ASCII_PIECES.pattern.split("|", 7)[7]))
    plain = Tokenizer.from_file(path)
    encoder = Encoder(plain, np.uint16)
    assert not encoder.fast and "its ids differ from the tokenizer's on" in caplog.text
    _same_ids(encoder, plain, texts)


def test_limit_means_the_first_documents_of_the_whole_source_when_sharded(small_cfg):
    one = _pack(small_cfg("data.sources.0.limit=100"))
    saved = {name: (one / name).read_bytes() for name in ("train.bin", "val.bin")}
    for p in one.iterdir():
        p.unlink()
    one.rmdir()
    four = _pack(small_cfg("data.sources.0.limit=100"), num_shards=4)
    assert {name: (four / name).read_bytes() for name in saved} == saved


def _modules(n: int) -> list[str]:
    """n distinct real modules: the standard library's top-level files of 2-20 KB."""
    texts = []
    for path in sorted(stdlib_dir().glob("*.py")):
        if 2_000 < path.stat().st_size < 20_000:
            texts.append(path.read_text(encoding="utf-8"))
    return texts[:n]


def _edit(text: str, k: int) -> str:
    """A near copy: one line in ~every 25 changed or dropped, a header comment added."""
    lines = text.splitlines(keepends=True)
    edited = [line for i, line in enumerate(lines) if i % 25 != k % 25]
    return f"# vendored copy {k}\n" + "".join(edited)


def test_the_near_duplicate_index_decides_as_datasketchs_lsh():
    """dedup.Index keeps one dict per band instead of datasketch's MinHashLSH (~4x less memory at 1M documents,
    bench/dedup_index.py): on real modules and copies edited from lightly to heavily, it must call the same
    documents near-duplicates of the same first documents, at every threshold."""
    from datasketch import MinHash, MinHashLSH
    from omegaconf import OmegaConf

    from phi1.data import dedup
    from phi1.synthetic.gates import WORD

    texts = _modules(40)
    docs = texts + [_edit(t, k) for k, t in enumerate(texts[:20])]  # light edits: near copies
    for every in (2, 3, 4, 6):  # heavier edits, around the thresholds: keep one line in `every`
        docs += ["".join(t.splitlines(keepends=True)[::every]) for t in texts[20:30]]
    docs += [texts[i] + texts[i + 1] for i in range(30, 39)]  # two modules joined: similar to either or neither
    cfg = OmegaConf.create({"exact": False, "near": True, "num_perm": 128, "ngram": 5, "threshold": 0.8})
    signer = dedup.Signer(cfg)
    signatures = [signer.signature(np.array([zlib.crc32(w.encode()) for w in WORD.findall(t)], dtype=np.uint32))
                  for t in docs]
    for threshold in (0.5, 0.7, 0.8, 0.9):
        cfg.threshold = threshold
        index = dedup.Index(cfg)
        ours = [index.add(b"", s, "a" if i < 40 else "b") for i, s in enumerate(signatures)]
        lsh, owner, theirs = MinHashLSH(threshold=threshold, num_perm=128), [], []
        for i, s in enumerate(signatures):
            m = MinHash(num_perm=128, hashvalues=s.astype(np.uint64), scheme="affine32")
            if matches := lsh.query(m):
                theirs.append("near_within" if owner[min(matches)] == ("a" if i < 40 else "b") else "near_across")
            else:
                lsh.insert(len(owner), m, check_duplication=False)
                owner.append("a" if i < 40 else "b")
                theirs.append(None)
        assert ours == theirs, threshold
        assert None in ours[40:] and "near_across" in ours, (threshold, ours)  # both verdicts occur


def test_planted_exact_and_near_duplicates_are_caught_within_and_across_sources(small_cfg, tmp_path):
    texts = _modules(60)
    a_texts, b_texts = texts[:40], texts[40:]
    # a: 40 originals, then 5 exact copies of a[0..4] and 5 near copies of a[5..9].
    a_rows = [{"id": f"a{i}", "text": t}
              for i, t in enumerate(a_texts + a_texts[:5] + [_edit(t, k) for k, t in enumerate(a_texts[5:10])])]
    # b: 20 originals, plus 3 exact copies of a[10..12] and 2 near copies of a[13..14]: duplicates across.
    b_rows = [{"id": f"b{i}", "text": t}
              for i, t in enumerate(b_texts + a_texts[10:13] + [_edit(t, 7) for t in a_texts[13:15]])]
    a, b = _jsonl(tmp_path / "a.jsonl", a_rows), _jsonl(tmp_path / "b.jsonl", b_rows)
    cfg = small_cfg("data.val_fraction=0.1", "data.dedup.near=true",
                    f"data.sources=[{{name: a, kind: jsonl, path: '{a}'}}, {{name: b, kind: jsonl, path: '{b}'}}]")
    manifest = json.loads((_pack(cfg) / "manifest.json").read_text())
    by_name = {s["name"]: s for s in manifest["sources"]}
    assert by_name["a"]["duplicates"] == {"exact_within": 5, "near_within": 5}
    assert by_name["b"]["duplicates"] == {"exact_across": 3, "near_across": 2}
    for name, originals in (("a", 40), ("b", 20)):
        s = by_name[name]
        assert s["train"]["documents"] + s["val"]["documents"] == originals
    # exact only: the near copies survive
    exact = small_cfg("data.val_fraction=0.1", "data.dedup.near=false",
                      f"data.sources=[{{name: a, kind: jsonl, path: '{a}'}}, {{name: b, kind: jsonl, path: '{b}'}}]")
    manifest = json.loads((_pack(exact) / "manifest.json").read_text())
    assert [s["duplicates"] for s in manifest["sources"]] == [{"exact_within": 5}, {"exact_across": 3}]


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read() if entry.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def test_a_killed_pack_resumes_without_redoing_finished_shards(tmp_path):
    """SIGKILL a 4-shard pack once its first shard is done: its worker processes exit too (checked on Linux);
    the rerun keeps that shard's files untouched and writes exactly what an uninterrupted pack writes."""
    env = {**os.environ, "PHI1_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, str(ROOT / "prepare.py"), "stage=pack", "data.sources.0.limit=600", "num_shards=4",
            "tokenizer.corpus.limit=150", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    packed = tmp_path / "data" / "packed"
    deadline = time.time() + 120
    while not list(packed.glob("*.shards-4/shard-00000/stats.json")):
        assert proc.poll() is None and time.time() < deadline, "the pack ended before it could be killed"
        time.sleep(0.05)
    linux = os.path.isdir("/proc")  # where the pack's worker processes can be found
    workers = _children(proc.pid) if linux else []  # the piece cache's encoding processes
    assert workers or not linux
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers):  # they exit with their parent
        assert time.time() < deadline, f"worker processes {workers} outlived the killed pack"
        time.sleep(0.1)
    (first,) = packed.glob("*.shards-4/shard-00000")
    assert not list(packed.glob("*/manifest.json"))  # no merged pack yet
    before = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    subprocess.run([*args, "stage.keep_shards=true"], cwd=ROOT, env=env, check=True, capture_output=True)
    (merged,) = [p for p in packed.iterdir() if (p / "manifest.json").exists()]
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == before  # the finished shard was not redone
    # Repack from scratch elsewhere and compare bytes.
    clean_env = {**env, "PHI1_DATA_DIR": str(tmp_path / "clean")}
    subprocess.run(args[:-1] + [f"hydra.run.dir={tmp_path}/run2"], cwd=ROOT, env=clean_env, check=True,
                   capture_output=True)
    (clean,) = [p for p in (tmp_path / "clean" / "packed").iterdir() if (p / "manifest.json").exists()]
    for name in ("train.bin", "val.bin", "manifest.json"):
        assert (merged / name).read_bytes() == (clean / name).read_bytes(), name
    assert not list(packed.rglob("*.tmp-*"))  # the killed run's half-built shard went with it


def test_what_a_writer_killed_hard_left_is_removed_by_the_next_and_only_that(small_cfg, tmp_path):
    """SIGKILL runs no clean-up: before, a pack or a synthetic set killed mid-write left its temporary folder or
    files (a pack's worth of tokens, GBs at the paper's scale) for good, since the next run writes under its
    own pid."""
    import socket

    from phi1.synthetic.generate import Output

    cfg = small_cfg("data.sources.0.limit=40")
    tokenizer_dir = tokenizers.ensure(cfg)
    final = pack.shards_dir(pack.location(cfg, tokenizer_dir), 2) / "shard-00000"
    out = tmp_path / "synthetic"
    out.mkdir()
    write = ("import sys; from pathlib import Path; from phi1 import atomic; "
             "p = atomic.temporary(Path(sys.argv[1]), hidden=sys.argv[2] == '1'); "
             "p.mkdir(parents=True) if sys.argv[3] == 'dir' else p.write_text('x' * 1000); print(p)")
    dead = [Path(subprocess.run([sys.executable, "-c", write, str(path), hidden, kind], check=True, text=True,
                                capture_output=True).stdout.strip())
            for path, hidden, kind in ((final, "0", "dir"), (out / "textbooks-s1.jsonl", "1", "file"),
                                       (out / "textbooks-s1.rejected.jsonl", "1", "file"))]
    assert all(p.exists() for p in dead)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host, dead_pid = socket.gethostname(), dead[0].name.rsplit("-", 1)[1]
        kept = [final.with_name(f"{final.name}.tmp-{host}-{live.pid}"),  # its writer still runs
                final.with_name(f"{final.name}.tmp-another-host-{dead_pid}"),  # whether it runs can't be told
                final.with_name(f"shard-00001.tmp-{host}-{dead_pid}")]  # another output's
        for p in kept:
            p.mkdir()
        pack.pack_shard(cfg, tokenizer_dir, 0, 2)
        with Output(out, "textbooks-s1") as output:
            output.finish({})
        assert not any(p.exists() for p in dead)
        assert all(p.exists() for p in kept)
    finally:
        live.kill()


def test_finished_shards_are_reused(small_cfg, monkeypatch):
    cfg = small_cfg("data.sources.0.limit=120")
    tokenizer_dir = tokenizers.ensure(cfg)
    done = [pack.pack_shard(cfg, tokenizer_dir, k, 3) for k in (0, 1)]  # a run killed during shard 2
    stamps = [{p.name: p.stat().st_mtime_ns for p in d.iterdir()} for d in done]
    encoded = []
    real = pack._encode_source
    monkeypatch.setattr(pack, "_encode_source", lambda *a: encoded.append(a[7]) or real(*a))
    pack.pack(cfg, tokenizer_dir, 3, keep_shards=True)
    assert encoded == [2]  # only the unfinished shard was tokenized
    assert [{p.name: p.stat().st_mtime_ns for p in d.iterdir()} for d in done] == stamps


def test_merge_names_missing_shards(small_cfg):
    cfg = small_cfg("data.sources.0.limit=60")
    tokenizer_dir = tokenizers.ensure(cfg)
    pack.pack_shard(cfg, tokenizer_dir, 1, 2)
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) \[0\] of 2 are not packed yet"):
        pack.merge(cfg, tokenizer_dir, 2)


def test_filters_and_parquet_and_a_saved_hf_dataset(small_cfg, tmp_path):
    import datasets

    rng = random.Random(1)
    rows = [{"hexsha": f"h{i}", "content": _function(rng, i), "lang": "Python" if i % 3 else "Shell",
             "licenses": ["mit"] if i % 2 else ["gpl-3.0", "other"]} for i in range(60)]
    rows.append({"hexsha": "huge", "content": "x = 1\n" * 5000, "lang": "Python", "licenses": ["mit"]})
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    common = ("text_field: content, id_field: hexsha, where: {lang: [Python], licenses: [mit, apache-2.0]},"
              " max_chars: 10000")
    wanted = sum(1 for i in range(60) if i % 3 and i % 2)  # Python and MIT; `huge` is over max_chars
    for kind, path in (("hf", tmp_path / "saved"), ("parquet", tmp_path / "rows.parquet")):
        src = small_cfg(f"data.sources=[{{name: s, kind: {kind}, path: '{path}', {common}}}]").data.sources[0]
        from collections import Counter

        filtered = Counter()
        docs = list(documents(src, filtered=filtered))
        assert len(docs) == wanted and filtered == {"where.lang": 20, "where.licenses": 20, "max_chars": 1}, kind
        assert docs[0][0] == "s:h1"
        # shards of a saved dataset are contiguous row ranges that add up to the whole, in order
        if kind == "hf":
            parts = [d for k in range(3) for d in documents(src, shard=k, num_shards=3)]
            assert parts == docs


def test_hub_code_path_streams_a_local_dataset_folder(small_cfg, tmp_path, caplog):
    """`kind: hf` with a folder runs `datasets.load_dataset(..., streaming=True)`: the call that reads The Stack
    from the hub, here on local JSONL files in the hub's layout (data/python/*.jsonl)."""
    rng = random.Random(2)
    folder = tmp_path / "the-stack-local" / "data" / "python"
    folder.mkdir(parents=True)
    for f in range(4):
        _jsonl(folder / f"train-{f:05d}.jsonl",
               [{"hexsha": f"{f}-{i}", "content": _function(rng, f * 100 + i), "lang": "Python"} for i in range(10)])
    cfg = small_cfg("data.val_fraction=0.1",
                    f"data.sources=[{{name: stack, kind: hf, path: '{tmp_path / 'the-stack-local'}',"
                    " data_dir: data/python, text_field: content, id_field: hexsha}]")
    whole = list(documents(cfg.data.sources[0]))
    assert len(whole) == 40 and whole[0][0] == "stack:0-0"
    # 4 files, 2 shards: each shard streams its own 2 files; together they are the whole, in order
    assert [d for k in range(2) for d in documents(cfg.data.sources[0], shard=k, num_shards=2)] == whole
    # 4 files, 3 shards: still whole files per shard (2, 1, 1), together the whole in order
    assert [d for k in range(3) for d in documents(cfg.data.sources[0], shard=k, num_shards=3)] == whole
    # 4 files, 5 shards: a file cannot be split, so each shard reads every row and keeps 1 in 5, and says so
    with caplog.at_level("WARNING", logger="phi1.data.sources"):
        dealt = [list(documents(cfg.data.sources[0], shard=k, num_shards=5)) for k in range(5)]
    assert [len(d) for d in dealt] == [8] * 5 and sorted(sum(dealt, [])) == sorted(whole)
    assert "source stack has 4 file(s) for 5 shards: each shard reads every row and keeps 1 in 5" in caplog.text
    manifest = json.loads((_pack(cfg, num_shards=2) / "manifest.json").read_text())
    assert manifest["sources"][0]["read"]["documents"] == 40
    # A hub id that cannot be reached (offline here, a typo there): the source and the way out are named.
    offline = small_cfg("data.sources=[{name: x, kind: hf, path: nobody/nothing, text_field: content}]")
    with pytest.raises(SourceError, match=r"^source 'x': cannot load hub dataset 'nobody/nothing' \(.*\)\. Offline\? "
                                          r"Use a local source \(data=stdlib\)"):
        list(documents(offline.data.sources[0]))


def test_codeexercises_hub_reads_jinaais_layout_as_prompt_then_body(small_cfg, tmp_path):
    """data=codeexercises_hub as shipped (text_field, split) on a local copy in jinaai/code_exercises' hub layout
    (data/train-*.parquet with `problem` and `solution` columns): each row becomes one document, the signature and
    docstring followed by the body, as phi-1 was finetuned on it; rows are numbered across the files."""
    import datasets

    folder = tmp_path / "code_exercises" / "data"
    folder.mkdir(parents=True)
    rows = [{"problem": f'def f{i}(x):\n    """Return x plus {i}."""\n', "solution": f"    return x + {i}\n"}
            for i in range(12)]
    for f in range(2):
        datasets.Dataset.from_list(rows[f * 6:(f + 1) * 6]).to_parquet(str(folder / f"train-{f:05d}-of-00002.parquet"))
    cfg = small_cfg("data=codeexercises_hub", f"data.sources.0.path={tmp_path / 'code_exercises'}")
    docs = list(documents(cfg.data.sources[0]))
    assert [d[1] for d in docs] == [r["problem"] + r["solution"] for r in rows]
    assert docs[7][0] == "code_exercises:7"
    namespace = {}
    exec(docs[3][1], namespace)  # a whole function: the prompt's signature with the solution's body
    assert namespace["f3"](1) == 4

def test_empty_sources_and_bad_parquet_are_clear_errors(small_cfg, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(SourceError, match=rf"{bad}: cannot read as Parquet"):
        _pack(small_cfg(f"data.sources=[{{name: p, kind: parquet, path: '{bad}'}}]"))
    rows = _jsonl(tmp_path / "short.jsonl", [{"id": i, "text": "x"} for i in range(5)])
    cfg = small_cfg(f"data.sources=[{{name: s, kind: jsonl, path: '{rows}', min_chars: 10}}]")
    with pytest.raises(SourceError, match=r"yielded no documents \(\{'min_chars': 5\} filtered out\)"):
        _pack(cfg)
    # Nothing is left behind: not the shard's build folder, nor the shards' folder it was the only one in.
    packed = pack.location(cfg, tokenizers.ensure(cfg))
    assert [p.name for p in packed.parent.iterdir() if p.name.startswith(packed.name)] == []
    # A small corpus (a user's repository) can give the default 1% no validation document: the message counts
    # them and names a share that holds some out.
    rng = random.Random(0)
    rows = _jsonl(tmp_path / "mine.jsonl", [{"id": f"m{i}", "text": _function(rng, i)} for i in range(8)])
    with pytest.raises(SourceError, match=r"^data 'stdlib' \(sources: mine\): none of its 8 documents fell in the "
                                          r"validation split at data.val_fraction=0.01 .* \(data.val_fraction=0.25 "
                                          r"holds out ~2\) or add documents$"):
        _pack(small_cfg(f"data.sources=[{{name: mine, kind: jsonl, path: '{rows}'}}]", "data.val_fraction=0.01"))


def test_training_refuses_a_pack_with_a_larger_vocabulary_than_the_model(small_cfg):
    from phi1.config import plan
    from phi1.data.datamodule import DataMismatchError, PackedData

    cfg = small_cfg("model.vocab_size=1000")  # the local BPE has 4,096 tokens
    with pytest.raises(DataMismatchError, match="4096 tokens but model.vocab_size=1000"):
        PackedData(cfg, plan(cfg)).setup("fit")


def test_mix_repeats_sources_in_passes_recorded_as_epochs(small_cfg, tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "text": "alpha " * (20 + i)} for i in range(30)])
    b = _jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "text": "alpha " * (20 + i)} for i in range(6)])
    cfg = small_cfg("data.val_fraction=0", "data.dedup.exact=false", "data.dedup.near=false",
                    f"data.sources=[{{name: a, kind: jsonl, path: '{a}', weight: 1}},"
                    f" {{name: b, kind: jsonl, path: '{b}', weight: 1}}]")
    directory = _pack(cfg)
    manifest = json.loads((directory / "manifest.json").read_text())
    a_info, b_info = manifest["sources"]
    total = a_info["train"]["tokens"] + b_info["train"]["tokens"]
    assert a_info["train_tokens_in_mix"] == b_info["train_tokens_in_mix"] == total // 2
    assert b_info["epochs"] == pytest.approx(total / 2 / b_info["train"]["tokens"]) and b_info["epochs"] > 2
    tokens = np.fromfile(directory / "train.bin", dtype=manifest["dtype"])
    b_part = tokens[a_info["train_tokens_in_mix"]:]
    one_pass = b_info["train"]["tokens"]
    assert (b_part[one_pass : 2 * one_pass] == b_part[:one_pass]).all()  # whole passes, in the same order


def test_slurm_and_local_launchers_compose():
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    for launcher, target in (("slurm", "SlurmLauncher"), ("local", "LocalLauncher")):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("prepare", overrides=["stage=pack", f"hydra/launcher={launcher}", "shard=3", "num_shards=8"],
                          return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith(target)
        assert cfg.shard == 3 and cfg.num_shards == 8


def test_multirun_shards_through_the_submitit_launcher_then_merge(tmp_path):
    """The cluster recipe on one machine: `-m ... 'shard=range(0,3)' hydra/launcher=local` (submitit runs each
    shard as its own process), then the merge; the result equals an unsharded pack byte for byte."""
    env = {**os.environ, "PHI1_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    common = ["stage=pack", "data.sources.0.limit=300", "tokenizer.corpus.limit=150"]
    prepare = [sys.executable, str(ROOT / "prepare.py")]
    subprocess.run([*prepare, "-m", *common, "num_shards=3", "shard=range(0,3)", "hydra/launcher=local",
                    f"hydra.sweep.dir={tmp_path}/sweep"], cwd=ROOT, env=env, check=True, capture_output=True)
    (shards,) = (tmp_path / "data" / "packed").glob("*.shards-3")
    assert sorted(p.name for p in shards.iterdir()) == ["shard-00000", "shard-00001", "shard-00002"]
    subprocess.run([*prepare, *common, "num_shards=3", f"hydra.run.dir={tmp_path}/merge"], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    (merged,) = [p for p in (tmp_path / "data" / "packed").iterdir() if (p / "manifest.json").exists()]
    env["PHI1_DATA_DIR"] = str(tmp_path / "plain")
    subprocess.run([*prepare, *common, f"hydra.run.dir={tmp_path}/plain-run"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    (plain,) = [p for p in (tmp_path / "plain" / "packed").iterdir() if (p / "manifest.json").exists()]
    for name in ("train.bin", "val.bin"):
        assert (merged / name).read_bytes() == (plain / name).read_bytes()


def test_two_nodes_that_gave_the_packer_one_pid_build_apart(tmp_path, monkeypatch):
    """On a disk shared by several nodes, each node's local rank 0 packs a missing pack; nodes started alike often
    give it the same pid. Building in one temporary folder, one node's writes would land in the other's files."""
    import socket

    final = tmp_path / "stdlib-0123"
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    monkeypatch.setattr(socket, "gethostname", lambda: "node0")
    with pack._build_dir(final) as node0:
        monkeypatch.setattr(socket, "gethostname", lambda: "node1")
        with pack._build_dir(final) as node1, open(node1 / "train.bin", "wb") as f:
            f.write(b"1111")
            f.flush()  # a pack's writes reach the file as it goes
            (node0 / "train.bin").write_bytes(b"00000000")  # node0 writes its copy meanwhile
            f.write(b"1111")
    assert (final / "train.bin").read_bytes() == b"11111111"  # node1 finished first; node0's copy is dropped
    assert not list(tmp_path.glob("*.tmp-*"))
