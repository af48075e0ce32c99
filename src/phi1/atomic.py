"""Outputs written under a temporary name beside their final one and renamed into place when complete, so that a
killed writer never leaves half a file; and the clean-up of what such a writer left when it was killed hard
(SIGKILL: the OOM killer, a scheduler past its grace period), which no `finally` removes.

The temporary name holds the host and the pid: several nodes may write the same output on a shared disk, and a
later run on the same host removes a leftover only when its process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def temporary(final: Path, hidden: bool = False) -> Path:
    """Where this process writes `final` before renaming it (hidden: with a leading dot, which globs skip)."""
    return final.with_name(f"{'.' if hidden else ''}{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def remove_stale(final: Path, hidden: bool = False) -> int:
    """Remove the temporary copies of `final` left by writers on this host that are no longer running; the
    bytes freed. Another host's are left alone: whether its writer still runs cannot be told from here."""
    prefix = f"{'.' if hidden else ''}{final.name}.tmp-"
    freed, here = 0, socket.gethostname()
    for path in sorted(final.parent.glob("*.tmp-*")) if final.parent.is_dir() else []:
        host, _, pid = path.name.removeprefix(prefix).rpartition("-")
        if not path.name.startswith(prefix) or host != here or not pid.isdigit() or _alive(int(pid)):
            continue
        size = _size(path)
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        log.warning("removed %s (%.1f MB), left by a run that was killed (pid %s)", path, size / 1e6, pid)
        freed += size
    return freed


def write(final: Path, save: Callable[[Path], object], hidden: bool = True) -> None:
    """`save(tmp)` writes the file, which is then renamed to `final`: readers see the old file or the new one,
    never half of one. A temporary left by a writer killed hard on this host is removed first."""
    remove_stale(final, hidden=hidden)
    tmp = temporary(final, hidden=hidden)
    try:
        save(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(final: Path, value) -> None:
    """`value` as indented JSON, renamed into place: a metrics.json is a run's mark of completion (runs waiting
    for it start on it, a resume takes it for a finished run), so a write cut short (a full disk, a kill) must
    leave none rather than half of one."""
    write(Path(final), lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n"))
