"""One process at a time per output (phi1.lock): a second process is refused, naming the first."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT
from phi1 import lock
from phi1.train import train


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    """A single process, whose commands are single processes too: no rank variables (a Trainer built earlier in
    this process sets some)."""
    for name in lock.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_a_second_process_is_refused_naming_the_first_until_it_is_killed(holder, tmp_path, monkeypatch):
    path = tmp_path / "run" / ".lock"
    first = holder(path)
    with pytest.raises(lock.InUse, match=rf"run folder x is in use by another process: pid {first.pid} on "):
        with lock.exclusive(path, "run folder x"):
            pass
    # The other ranks of a multi-device run share the folder by design: they take no lock.
    monkeypatch.setenv("LOCAL_RANK", "1")
    with lock.exclusive(path, "run folder x"):
        pass
    monkeypatch.delenv("LOCAL_RANK")
    # Killed hard, its lock goes with it: nothing to clean up. A job Slurm requeued waits for it (a dead node's
    # lock outlives the node on NFS until the server's lease ends); here the holder is killed 1 s in.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setattr(lock, "REQUEUED_WAIT_S", 30.0)
    killer = threading.Timer(1.0, first.send_signal, (signal.SIGKILL,))
    killer.start()
    t0 = time.monotonic()
    with lock.exclusive(path, "run folder x", poll_s=0.1):
        assert f"pid {os.getpid()} on " in path.read_text()
    assert 1.0 <= time.monotonic() - t0 < 10
    first.wait()
    with lock.exclusive(path, "run folder x"):  # released when the block ends
        pass


def test_a_run_folder_in_use_is_refused_before_anything_is_written(holder, small_cfg, tmp_path):
    """A sweep relaunched while its cells still train (`ckpt_path=auto`) trained each cell twice into one folder."""
    run = tmp_path / "cell"
    first = holder(run / ".lock")
    with pytest.raises(lock.InUse, match=rf"run folder {run} is in use by another process: pid {first.pid} "):
        train(small_cfg("ckpt_path=auto", run_dir=run))
    assert [p.name for p in run.iterdir()] == [".lock"]
    # Its checkpoints are the running process's, not an earlier run's to resume: the refusal names the process.
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"being written")
    with pytest.raises(lock.InUse, match=rf"pid {first.pid} "):
        train(small_cfg(run_dir=run))


def test_a_paid_stage_output_in_use_is_refused(holder, tmp_path):
    """Two runs of a paid stage at once each paid for the requests in flight."""
    out = tmp_path / "data" / "annotations" / "stdlib-heuristic.jsonl"
    first = holder(out.parent / ".stdlib-heuristic.jsonl.lock")
    args = [sys.executable, "prepare.py", "stage=annotate", "stage.n=20", f"paths.data_dir={tmp_path}/data",
            f"hydra.run.dir={tmp_path}/hydra"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"stage=annotate output {out} is in use by another process: pid {first.pid} on " in r.stderr
    assert not out.exists()
    first.kill()
    first.wait()
    subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    assert len(out.read_text().splitlines()) == 20


def test_an_evaluation_folder_in_use_is_refused(holder, tmp_path):
    """Two evaluations with one run_name appended to one generations journal."""
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": "    return False\\n"}\n')
    first = holder(tmp_path / "out" / "he" / ".lock")
    r = subprocess.run([sys.executable, "evaluate.py", f"samples={samples}", "allow_code_execution=true", "run_name=he",
                        f"paths.output_dir={tmp_path}/out", f"paths.data_dir={tmp_path}", "wandb_mode=disabled"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"run folder {tmp_path}/out/he is in use by another process: pid {first.pid} on " in r.stderr
    assert not (tmp_path / "out" / "he" / "metrics.json").exists()


def test_an_embed_filter_or_decontaminate_output_in_use_is_refused(holder, tmp_path):
    """Two embeds of one output (a Slurm array relaunched) each embedded the whole source into one array, and one
    that found no progress yet recreated the file the other was writing. A shard is locked alone: the shards of
    one output run side by side."""
    import joblib
    import numpy as np
    from hydra import compose, initialize_config_dir
    from sklearn.dummy import DummyClassifier

    from conftest import CONF
    from phi1.stages import run

    code = tmp_path / "code"
    code.mkdir()
    for i in range(4):
        (code / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")

    def cfg(stage, *extra):
        source = [f"stage.source={{name: code, kind: dir, path: '{code}'}}"] if stage != "decontaminate" else []
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return compose("prepare", overrides=[f"paths.data_dir={tmp_path}", f"paths.run_dir={tmp_path}/run",
                                                 f"stage={stage}", *source, *extra])

    emb = tmp_path / "embeddings" / "code"
    first = holder(emb.parent / ".code.lock")
    with pytest.raises(lock.InUse, match=rf"stage=embed output {emb} is in use by another process: pid {first.pid} "):
        run(cfg("embed"))
    assert not (emb / "embeddings.npy").exists()
    shard = emb / "shards-2" / "00001"
    second = holder(shard.parent / ".00001.lock")
    with pytest.raises(lock.InUse, match=rf"stage=embed output {shard} is in use"):
        run(cfg("embed", "num_shards=2"))
    assert (emb / "shards-2" / "00000" / "embeddings.npy").exists()  # shard 0 was free
    second.kill()
    second.wait()
    run(cfg("embed", "num_shards=2"))
    labels = tmp_path / "classifier" / "code-heuristic"
    labels.mkdir(parents=True)
    joblib.dump(DummyClassifier(strategy="uniform").fit(np.zeros((2, 384)), [0, 1]), labels / "classifier.joblib")
    out = tmp_path / "filtered" / "filtered-code-00000-of-00002.jsonl"
    held = holder(out.parent / f".{out.name}.lock")
    with pytest.raises(lock.InUse, match=rf"stage=filter output {out} is in use by another process: pid {held.pid} "):
        run(cfg("filter", f"stage.embeddings={emb}", "num_shards=2", "shard=0", "stage.threshold=0"))
    run(cfg("filter", f"stage.embeddings={emb}", "num_shards=2", "shard=1", "stage.threshold=0"))
    assert not out.exists() and (out.parent / "filtered-code-00001-of-00002.jsonl").exists()
    dec = tmp_path / "decontaminate" / "humaneval-stdlib_functions"
    holder(dec.parent / f".{dec.name}.lock")
    with pytest.raises(lock.InUse, match=rf"stage=decontaminate output {dec} is in use"):
        run(cfg("decontaminate"))
    assert not (dec / "scores.json").exists()


@pytest.mark.parametrize("stage", ["textbooks", "exercises"])
def test_a_synthetic_stage_in_use_is_refused_before_any_request(holder, stage, tmp_path):
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from openai_server import FakeOpenAI
    from phi1.stages import run

    out = tmp_path / "synthetic" / stage
    first = holder(out / f".{stage}-s0.lock")
    with FakeOpenAI() as server:
        def cfg(*extra):
            with initialize_config_dir(str(CONF), version_base="1.3"):
                return compose("prepare", overrides=[f"stage={stage}", "stage.n=5", f"paths.data_dir={tmp_path}",
                                                     f"paths.run_dir={tmp_path}/run", "llm=openai_compatible",
                                                     f"llm.base_url={server.base_url}", "llm.model=test-model",
                                                     *extra])

        in_use = rf"stage={stage} output {out}/{stage}-s0 is in use by another process: pid {first.pid} on "
        with pytest.raises(lock.InUse, match=in_use):
            run(cfg())
        assert server.count() == 0 and not list(out.glob("*.jsonl"))
        # Another seed is another set of files: generated beside it, not refused.
        run(cfg("stage.seed=1"))
        assert server.count() == 5 and (out / f"{stage}-s1.jsonl").exists()


def test_a_probe_of_the_lock_does_not_refuse_the_process_taking_it(holder, tmp_path):
    """report.py asks who holds a run's lock (lock.holder) with a shared lock held for an instant: a run that
    starts at that instant waits it out rather than being refused."""
    import fcntl

    path = tmp_path / ".lock"
    assert lock.holder(path) is None  # no file yet
    first = holder(path)
    assert lock.holder(path).startswith(f"pid {first.pid} on ")
    first.kill()
    first.wait()
    assert lock.holder(path) is None
    probe = os.open(path, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(0.3, os.close, (probe,)).start()  # a slow probe
    t0 = time.monotonic()
    with lock.exclusive(path, "run folder x"):
        assert time.monotonic() - t0 >= 0.3
