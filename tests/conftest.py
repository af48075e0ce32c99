import os
import subprocess
import sys
from pathlib import Path

# Before anything imports transformers/datasets: a hub lookup would otherwise hang ~50 s before failing. Set, not
# defaulted: the suite must not depend on the caller's shell. A researcher's exported WANDB_MODE=disabled (or
# online, or a WANDB_RUN_ID, WANDB_PROJECT) made the tests that read their offline runs' folders find none, and
# would upload test runs to their account; every W&B run of the suite is offline, under the test's tmp_path.
# A researcher's PHI1_ROOT / PHI1_DATA_DIR (conf/paths) would send the tests that leave paths at their defaults into
# their real outputs and data: each test names its own folders, or gets the defaults under the clone. And no test
# may reach a paid API with the caller's OPENAI_API_KEY (or OPENAI_BASE_URL): each names its fake server.
for _var in [v for v in os.environ if v.startswith(("WANDB_", "PHI1_", "OPENAI_"))]:
    del os.environ[_var]
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"})
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from phi1.config import register_configs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()

# A few hundred stdlib files and short windows: the whole pipeline in seconds.
SMALL = [
    "tokenizer.corpus.limit=150",
    "data.sources.0.limit=250",
    "data.seq_len=64",
    "data.val_fraction=0.05",
    "batch.global_size=8",
    "batch.micro_size=4",
    "budget.tokens=null",
    "budget.max_steps=12",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "eval_every_steps=6",
    "val_batches=2",
    "callbacks.checkpoint.every_n_train_steps=4",
    "evaluation.benchmarks.humaneval.limit=4",
]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_cfg(overrides=(), run_dir=None, data_dir=None):
    """Compose conf/train.yaml; `overrides` come last, so they win over run_dir and data_dir."""
    paths = [f"paths.run_dir={run_dir}"] if run_dir is not None else []
    paths += [f"paths.data_dir={data_dir}"] if data_dir is not None else []
    overrides = paths + list(overrides)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Lightning and DeepSpeed set MASTER_ADDR, LOCAL_RANK, ... in the process that builds a Trainer; a later
    `python train.py` started by a test would inherit them and wait for ranks that no one launches."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Tokenizers and packed data shared by the tests (built once, then cache hits)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def small_cfg(tmp_path, data_dir):
    def make(*extra, run_dir=None):
        return make_cfg([*SMALL, *extra], run_dir=run_dir or tmp_path / "run", data_dir=data_dir)

    return make


@pytest.fixture
def deepspeed_on_cpu(monkeypatch):
    """Lightning's DeepSpeed strategy with ZeRO-2 on the CPU, one rank (tests/deepspeed_cpu.py): the overrides."""
    if torch.cuda.is_available():
        # DeepSpeed picks its accelerator once per process, and CUDA where there is one; there tests/test_gpu.py
        # runs DeepSpeed for real.
        pytest.skip("DeepSpeed on the CPU: this process's DeepSpeed accelerator is CUDA")
    import deepspeed_cpu

    deepspeed_cpu.allow(monkeypatch.setattr)
    return [*deepspeed_cpu.OVERRIDES, "trainer.devices=1"]


_HOLD = ("import sys, time\nfrom phi1 import lock\nwith lock.exclusive(sys.argv[1], 'x'):\n"
         "    print('held', flush=True)\n    time.sleep(600)\n")


@pytest.fixture
def holder():
    """Another process that holds a lock file (phi1.lock) until it is killed: `holder(path)` -> its Popen."""
    from phi1 import lock

    started = []

    def hold(path):
        env = {k: v for k, v in os.environ.items() if k not in lock.RANK_VARIABLES}
        proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
        started.append(proc)
        assert proc.stdout.readline() == "held\n"
        return proc

    yield hold
    for proc in started:
        proc.kill()
        proc.wait()
