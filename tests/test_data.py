"""Packing: deterministic, mixed by weight, split stably; bad input named; the sampler resumes exactly."""

import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import ROOT, make_cfg
from phi1 import tokenizer as tokenizers
from phi1.data import pack, sources
from phi1.data.datamodule import DataMismatchError, PackedData, StepSampler
from phi1.data.sources import SourceError, documents
from phi1.config import SourceConfig, plan


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pack(cfg):
    return pack.pack(cfg, tokenizers.ensure(cfg))


def test_packing_is_byte_identical_across_runs(small_cfg, tmp_path):
    first = _pack(small_cfg())
    again = _pack(small_cfg(f"paths.data_dir={tmp_path}/elsewhere"))
    assert first != again
    for name in ("train.bin", "val.bin", "manifest.json"):
        assert (first / name).read_bytes() == (again / name).read_bytes()
    manifest = json.loads((first / "manifest.json").read_text())
    source = manifest["sources"][0]
    assert source["read"]["documents"] == 250
    assert source["train"]["documents"] + source["val"]["documents"] + sum(source["duplicates"].values()) == 250
    tokens = np.fromfile(first / "train.bin", dtype=manifest["dtype"])
    assert len(tokens) == manifest["splits"]["train"]["tokens"]
    # documents joined with EOS (paper §2.3): one EOS per train document
    assert (tokens == manifest["tokenizer"]["eos_token_id"]).sum() == manifest["sources"][0]["train"]["documents"]


def test_validation_split_is_held_out_by_document(small_cfg):
    cfg = small_cfg("data.dedup.exact=false", "data.dedup.near=false")  # every document kept: counts compare
    directory = _pack(cfg)
    manifest = json.loads((directory / "manifest.json").read_text())
    val_docs = manifest["sources"][0]["val"]["documents"]
    assert 0 < val_docs < 250 * 0.15  # ~5% of 250
    from phi1.data.sources import documents
    ids = [i for i, _ in documents(cfg.data.sources[0])]
    assert sum(pack.is_val(i, cfg.data.val_fraction) for i in ids) == val_docs


def test_sources_are_mixed_by_weight(small_cfg, tmp_path):
    # Source a: 40 docs of "alpha"; source b: 10 docs of "omega". Weights 1:3 invert their natural 4:1 sizes.
    a = _jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "text": "alpha " * 50} for i in range(40)])
    b = _jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "text": "omega " * 50} for i in range(10)])
    cfg = small_cfg("data.val_fraction=0.2", "data.dedup.exact=false", "data.dedup.near=false",
                    f"data.sources=[{{name: a, kind: jsonl, path: '{a}', weight: 1}},"
                    f" {{name: b, kind: jsonl, path: '{b}', weight: 3}}]")
    directory = _pack(cfg)
    manifest = json.loads((directory / "manifest.json").read_text())
    tok = tokenizers.load(tokenizers.location(cfg), cfg)
    tokens = np.fromfile(directory / "train.bin", dtype=manifest["dtype"])
    # Each source's tokens, counted by the ids only its documents have (the BPE is trained on this Python's
    # standard library: on 3.12's, "alpha" and "omega" share an id), scaled to its documents' length.
    ids_a, ids_b = tok("alpha " * 50)["input_ids"], tok("omega " * 50)["input_ids"]

    def count(ids, other):
        only = set(ids) - set(other)
        per_doc = sum(i in only for i in ids)
        assert per_doc > 0
        return np.isin(tokens, list(only)).sum() / per_doc * (len(ids) + 1)  # + the <|endoftext|> after each

    n_a, n_b = count(ids_a, ids_b), count(ids_b, ids_a)
    assert n_a + n_b == pytest.approx(len(tokens), rel=0.02)
    assert n_b / (n_a + n_b) == pytest.approx(0.75, abs=0.01)
    by_name = {s["name"]: s for s in manifest["sources"]}
    assert by_name["b"]["epochs"] > 1 > by_name["a"]["epochs"]  # b repeated, a cut to its share


def test_malformed_jsonl_line_is_named(small_cfg, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "def f(): pass"}\n{"id": 2, "text": \n{"id": 3, "text": "x = 1"}\n')
    cfg = small_cfg(f"data.sources=[{{name: bad, kind: jsonl, path: '{bad}'}}]")
    with pytest.raises(SourceError, match=rf"{bad}:2: JSONDecodeError"):
        _pack(cfg)
    assert not list(pack.location(cfg, tokenizers.location(cfg)).parent.glob("*.tmp-*"))  # nothing half-written
    skip = small_cfg(f"data.sources=[{{name: bad, kind: jsonl, path: '{bad}', on_error: skip}}]", "data.val_fraction=0.4")
    manifest = json.loads((_pack(skip) / "manifest.json").read_text())
    source = manifest["sources"][0]
    assert source["skipped"] == 1 and source["train"]["documents"] + source["val"]["documents"] == 2


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_row_without_the_text_field_names_the_fields_it_has(tmp_path, kind):
    """One's own data usually keeps its text under another name (The Stack: content)."""
    import datasets

    rows = [{"content": "x = 1\n", "path": "a.py"}, {"content": "y = 2\n", "path": "b.py"}]
    path = tmp_path / f"mine.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    where = f"{path}:1" if kind == "jsonl" else f"{path} row 1"
    source = OmegaConf.structured(SourceConfig(name="mine", kind=kind, path=str(path)))
    with pytest.raises(SourceError, match=re.escape(f"{where}: MissingField: no field 'text' (text_field='text'); the "
                                                    "row has ['content', 'path']: set the source's text_field")):
        list(documents(source))
    source.text_field = "# {path}\n{content}"
    assert [text for _, text in documents(source)] == ["# a.py\nx = 1\n", "# b.py\ny = 2\n"]
    source.text_field = "{content}{license}"
    with pytest.raises(SourceError, match=re.escape("no field 'license' (text_field='{content}{license}')")):
        list(documents(source))
    # A JSON null (a StackOverflow answer's Title): format_map wrote the word "None" into the training text.
    rows[1]["path"] = None
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    source.text_field = "# {path}\n{content}"
    second = f"{path}:2" if kind == "jsonl" else f"{path} row 2"
    with pytest.raises(SourceError, match=re.escape(f"{second}: MissingField: field 'path' is null (text_field=")):
        list(documents(source))


def test_the_command_line_prints_an_input_error_without_a_traceback(tmp_path):
    """phi1.errors: the message names the file and line, so `prepare.py` prints it alone and exits 1;
    HYDRA_FULL_ERROR=1 still shows where it was raised."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "x = 1"}\n{"id": 2, "text": \n')
    args = [sys.executable, str(ROOT / "prepare.py"), "stage=pack", f"paths.data_dir={tmp_path}/data",
            f"paths.output_dir={tmp_path}/out", "tokenizer.corpus.limit=50",
            f"data.sources=[{{name: bad, kind: jsonl, path: '{bad}'}}]"]
    for full, traceback in [("", False), ("1", True)]:
        env = {**os.environ, "HYDRA_FULL_ERROR": full}
        r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, r.stderr[-2000:]
        assert f"{bad}:2: JSONDecodeError" in r.stderr
        assert ("Traceback" in r.stderr) is traceback, r.stderr[-2000:]


def test_non_utf8_file_is_named(small_cfg, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.py").write_text("def f():\n    return 1\n")
    (src / "latin.py").write_bytes(b"# ok\nname = '\xe9t\xe9'\n")
    with pytest.raises(SourceError, match=r"latin.py:2: not UTF-8"):
        _pack(small_cfg(f"data.sources=[{{name: src, kind: dir, path: '{src}'}}]"))


def test_a_folder_is_walked_in_paths_order_and_sharded_without_gaps(tmp_path):
    """`dir` sources are walked, not listed and sorted: the walk must still give Path's order (by parts, which
    plain string order is not: "a-b.py" < "a.py" < "a/b.py" as strings), leave out links to folders, and its
    shards must add up to the whole, in order. Installed packages and hidden folders (a project's .venv) are
    not the user's code."""
    names = ["a.py", "a/b.py", "a-b.py", "a_b/c.py", "a.b/x.py", "A/z.py", "a/a.py", "ab.py", "a/b/c.py",
             "a/b.py2", "x.py/y.py", "é/f.py", "a /g.py", "test/t.py", "site-packages/s.py",
             ".venv/lib/python3.11/site-packages/pip/v.py", "venv/lib/python3.11/site-packages/w.py", "a/.tox/t.py",
             ".hidden.py"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    os.symlink(tmp_path / "a", tmp_path / "link.py")  # a link to a folder: neither walked nor read as a file
    python = [n for n in names if n.endswith(".py") and "site-packages/" not in n and n != "a/.tox/t.py"]
    expected = sorted(python, key=lambda n: n.split("/"))
    assert expected != sorted(python)  # the tree tells the two orders apart
    assert list(sources._py_files(tmp_path, stdlib=False)) == expected
    stdlib = sorted([n for n in expected if not n.startswith("test/")] + ["a/.tox/t.py"], key=lambda n: n.split("/"))
    assert list(sources._py_files(tmp_path, skip_tests=True)) == stdlib
    source = make_cfg([f"data.sources=[{{name: src, kind: dir, path: '{tmp_path}'}}]"]).data.sources[0]
    whole = [doc_id for doc_id, _ in sources.documents(source)]
    assert whole == [f"src:{n}" for n in expected]
    for n in (2, 3, 5):
        assert [d for k in range(n) for d, _ in sources.documents(source, shard=k, num_shards=n)] == whole


def test_missing_and_empty_sources_are_clear_errors(small_cfg, tmp_path):
    with pytest.raises(SourceError, match="no file matches"):
        _pack(small_cfg(f"data.sources=[{{name: gone, kind: jsonl, path: '{tmp_path}/nope.jsonl'}}]"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="yielded no documents"):
        _pack(small_cfg(f"data.sources=[{{name: empty, kind: dir, path: '{tmp_path}/empty'}}]"))
    # Every row skipped: the error gives the first reason (it said only "yielded no documents").
    (tmp_path / "samples.jsonl").write_text('{"task_id": 1, "completion": "x"}\nnot json\n')
    with pytest.raises(SourceError, match=r"yielded no documents; 2 skipped \(on_error=skip\), the first: "
                                          r".*samples.jsonl:1: MissingField: no field 'text'"):
        _pack(small_cfg(f"data.sources=[{{name: s, kind: jsonl, path: '{tmp_path}/samples.jsonl', "
                        "on_error: skip}]"))
    # The paper's mix before our stages wrote it: the error says which command makes the missing files.
    with pytest.raises(SourceError, match=r"filtered_code': no file matches .*filtered-stack\*\.jsonl; it is "
                                          r"written by: python prepare.py stage=filter stage.source.name=stack"):
        _pack(small_cfg("data=codetextbook", f"paths.data_dir={tmp_path}/fresh"))


def test_a_missing_second_source_stops_training_before_any_work(small_cfg, tmp_path, monkeypatch):
    """Packing reads the sources in turn: a mix whose second source has no files used to pack the first one
    (hours for The Stack's share) after building the model, and then stop. Now nothing is built or packed."""
    import phi1.train

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the sources were checked")

    monkeypatch.setattr(phi1.train, "LanguageModel", no_model)
    fresh = tmp_path / "fresh"
    mix = [f"paths.data_dir={fresh}", "data.sources=[{name: code, kind: stdlib, limit: 250},"
           f" {{name: books, kind: jsonl, path: '{tmp_path}/books-*.jsonl', made_by: 'prepare.py stage=textbooks'}}]"]
    with pytest.raises(SourceError, match=r"'books': no file matches .*books-\*\.jsonl; it is written by: prepare"):
        phi1.train.train(small_cfg(*mix))
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        prepare = compose("prepare", overrides=["stage=pack", *mix])
    with pytest.raises(SourceError, match=r"'books': no file matches"):
        pack.run(prepare)
    assert not fresh.exists()  # no tokenizer trained, nothing packed
    with pytest.raises(SourceError, match=rf"'code': {tmp_path}/nodir is not a directory"):
        phi1.train.train(small_cfg(f"paths.data_dir={fresh}",
                                   f"data.sources=[{{name: code, kind: dir, path: '{tmp_path}/nodir'}}]"))


def test_hub_tokenizer_offline_names_the_local_alternative(tmp_path):
    with pytest.raises(tokenizers.TokenizerError, match="tokenizer=local"):
        tokenizers.ensure(make_cfg(["tokenizer=codegen"], run_dir=tmp_path, data_dir=tmp_path))


def test_data_packed_with_another_tokenizer_is_refused(small_cfg):
    cfg = small_cfg()
    directory = _pack(cfg)
    manifest_path = directory / "manifest.json"
    saved = manifest_path.read_text()
    manifest = json.loads(saved)
    manifest["tokenizer"]["fingerprint"] = "0" * 16
    manifest_path.write_text(json.dumps(manifest))
    try:
        with pytest.raises(DataMismatchError, match="packed with tokenizer 0000"):
            PackedData(cfg, plan(cfg)).setup("fit")
    finally:
        manifest_path.write_text(saved)


def test_a_validation_split_of_few_documents_is_named_at_setup(small_cfg, caplog):
    """1% of 250 documents held out is a handful: val/loss is then those files' loss, and the run says so."""
    for fraction, warned in (("0.01", True), ("0.1", False)):
        cfg = small_cfg(f"data.val_fraction={fraction}")
        directory = _pack(cfg)
        held_out = json.loads((directory / "manifest.json").read_text())["sources"][0]["val"]["documents"]
        assert (held_out < 10) == warned, held_out
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="phi1.data.datamodule"):
            PackedData(cfg, plan(cfg)).setup("fit")
        message = f"the validation split of {directory.name} holds {held_out} documents"
        assert (message in caplog.text) == warned, caplog.text
        if warned:
            assert "data.val_fraction=0.01 sets the share held out" in caplog.text


def test_a_validation_split_shorter_than_one_window_says_what_to_raise(small_cfg):
    """A small finetuning set (238 exercises, 0.2% held out: one of 81 tokens) cannot fill one validation
    window: the error says which two settings fix it."""
    directory = _pack(small_cfg())
    manifest = json.loads((directory / "manifest.json").read_text())
    held_out, tokens = manifest["sources"][0]["val"]["documents"], manifest["splits"]["val"]["tokens"]
    cfg = small_cfg(f"data.seq_len={tokens}")
    _pack(cfg)
    plural = "" if held_out == 1 else "s"
    with pytest.raises(DataMismatchError, match=rf"the val split has {tokens} tokens, less than one window of "
                       rf"data.seq_len \+ 1 = {tokens + 1}: raise data.val_fraction \(now 0.05: {held_out} "
                       rf"document{plural} held out; a new pack\), or lower data.seq_len"):
        PackedData(cfg, plan(cfg)).setup("fit")


def test_sampler_resumes_where_it_stopped_and_shards_ranks():
    whole = list(StepSampler(n=50, seed=7, global_batch=8, max_steps=20, rank=0, world=1))
    assert len(whole) == 160
    assert sorted(whole[:50]) == list(range(50))  # a full pass visits every window once
    assert whole[:50] != list(range(50))  # shuffled
    resumed = StepSampler(n=50, seed=7, global_batch=8, max_steps=20, rank=0, world=1)
    resumed.start_step = 9
    assert list(resumed) == whole[9 * 8:]
    ranks = [list(StepSampler(50, 7, 8, 20, rank=r, world=2)) for r in (0, 1)]
    for step in range(20):  # the two ranks split each step's 8 samples between them
        assert sorted(ranks[0][step * 4:(step + 1) * 4] + ranks[1][step * 4:(step + 1) * 4]) == \
            sorted(whole[step * 8:(step + 1) * 8])


def test_stdlib_functions_are_documented_functions():
    from omegaconf import OmegaConf
    from phi1.data.sources import documents

    from phi1.config import SourceConfig

    src = OmegaConf.structured(SourceConfig(name="f", kind="stdlib_functions", limit=200, on_error="skip"))
    docs = list(documents(src))
    assert len(docs) == 200
    import ast

    for _, text in docs:
        (node,) = ast.parse(text).body
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node)


def test_stdlib_exercises_are_docstring_completion_problems(tmp_path):
    import ast

    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from phi1.stages import run

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("prepare", overrides=["stage=stdlib_exercises", f"paths.data_dir={tmp_path}",
                                            f"paths.run_dir={tmp_path}/run"])
    summary = run(cfg)
    rows = [json.loads(line) for line in open(summary["output"])]
    assert len(rows) == summary["exercises"] > 1500  # 1,902 from CPython 3.11.7's standard library
    assert len({r["task_id"] for r in rows}) == len(rows)
    for r in rows:
        (node,) = ast.parse(r["prompt"] + r["canonical_solution"]).body  # prompt + solution: one function
        assert node.name == r["entry_point"] and ast.get_docstring(node)
        stub = ast.parse(r["prompt"] + "    ...\n").body[0]  # the prompt is the signature and docstring only
        assert len(stub.body) == 2 and r["text"] == r["prompt"] + r["canonical_solution"]


def test_a_form_feed_or_unicode_line_break_before_a_function_leaves_its_prompt_whole():
    """Python ends lines at \\n, \\r\\n and \\r only; str.splitlines also at a form feed (CPython 3.10's
    email/__init__.py has one), \\x85 and U+2028, so every later prompt lost its docstring's closing line."""
    text = ('"""A module."""\n\x0c\n# a comment with \u2028 and \x85 in it\r\n'
            'def f(x):\n    """Double x."""\n    return 2 * x\n')
    ((name, prompt, solution),) = sources.exercises(text)
    assert (name, prompt, solution) == ("f", 'def f(x):\n    """Double x."""\n', "    return 2 * x\n")
    # A synthetic exercise's prompt keeps the imports before its function, counted the same way.
    from phi1.synthetic.exercises import split

    answer = 'import math\n\x0c\n# \u2028\ndef f(x):\n    """Double x."""\n    return 2 * x\n'
    assert split(answer)["prompt"] == 'import math\n\x0c\n# \u2028\ndef f(x):\n    """Double x."""\n'
