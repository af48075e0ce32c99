"""One process at a time per output: a run's folder (train.py, evaluate.py) or a data stage's output.

A second process given the same output while the first still runs (a sweep relaunched before it ended, a
command started again in another terminal) is refused at once, naming the first. Before, both wrote the same
checkpoints, journals and files, and two runs of a paid stage each paid for the requests in flight.

The lock is an `flock` on a hidden file (a run folder's `.lock`; beside a stage's output, `.<name>.lock`, per
seed for the synthetic sets), which the kernel releases when its process ends, however it ends: nothing is left
to clean up after a kill. Only the job's first process takes it (global rank 0 by the launchers' variables):
the other ranks of a multi-device run write into the same folder by design.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from phi1.errors import InputError

log = logging.getLogger(__name__)

# Set by the launchers of multi-process jobs (torchrun and Lightning's own: RANK, LOCAL_RANK, NODE_RANK, GROUP_RANK;
# srun: SLURM_PROCID; submitit's local executor (hydra/launcher=local): SUBMITIT_LOCAL_GLOBALID; MPI:
# OMPI_COMM_WORLD_RANK, PMI_RANK); a single process has none of them, or 0.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID",
                  "OMPI_COMM_WORLD_RANK", "PMI_RANK")
# A probe (holder(), for report.py) holds the lock for an instant: a process that finds it held tries again for
# this long before it is refused.
PROBE_GRACE_S = 1.0
# A job that Slurm requeued after its node died may find the dead node's lock still held on a network file
# system until the server's lease runs out (NFSv4: 90 s by default); it waits this long for it.
REQUEUED_WAIT_S = 300.0


class InUse(InputError):
    pass


def first_process() -> bool:
    return all((os.environ.get(name) or "0") == "0" for name in RANK_VARIABLES)


@contextlib.contextmanager
def exclusive(path: Path, what: str, instead: str = "", poll_s: float = 5.0):
    """Hold the lock file `path` while the block runs; raise InUse, naming its holder and `instead` (what else the
    user can do), where another process holds it. Where the file system has no locks (ENOLCK: NFS without a lock
    daemon), a warning, and no lock."""
    if not first_process():
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        start = time.monotonic()
        deadline = start + max(PROBE_GRACE_S, REQUEUED_WAIT_S if requeued else 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if (now := time.monotonic()) < deadline:
                    time.sleep(0.05 if now - start < PROBE_GRACE_S else poll_s)
                    continue
                raise InUse(f"{what} is in use by another process: {_text(fd)}. Two processes would write the same "
                            f"files: wait for it to end (or stop it){', or ' + instead if instead else ''}. The lock "
                            f"is {path}, released when that process ends.") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning("%s: the file system takes no locks (%s): nothing stops a second process from writing "
                            "%s at the same time", path, e.strerror, what)
                break
            else:
                since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
                me = (f"pid {os.getpid()} on {socket.gethostname()}, since {since}: "
                      f"{shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
                os.ftruncate(fd, 0)
                os.pwrite(fd, me.encode() + b"\n", 0)
                break
        yield
    finally:
        os.close(fd)  # releases the lock


def _text(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"


def holder(path: str | Path) -> str | None:
    """Who holds the lock file `path` now (pid, host, start, command), or None: probed with a shared lock held for
    an instant, which a process taking the lock at that moment waits out (PROBE_GRACE_S)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _text(fd)
    except OSError:  # no locks on this file system: nothing to tell
        return None
    finally:
        os.close(fd)
    return None


def stage_output(output: str | Path, stage: str):
    """exclusive() for a data stage's output (a file, a folder, or the stem of a set of files), taken after the
    stage's checks: two runs of a paid stage at once each paid for the requests in flight, and two embeds of
    one output each embedded the whole source. The lock file is a hidden one beside the output."""
    output = Path(output)
    return exclusive(output.with_name(f".{output.name}.lock"), f"stage={stage} output {output}",
                     "give this one another stage.output")
