"""The sandbox worker: runs inside bubblewrap as an unprivileged user and forks one process per sample.

Standard library only; started as `python -I -c <this source>` so that the sandbox user needs no
read access to the project. Protocol: one JSON object per line on stdin
  {"id": ..., "program": "...", "timeout": seconds}
and one per line on stdout
  {"id": ..., "status": "passed" | "failed" | "timeout", "output": "<first bytes of stdout+stderr>"}.
A first line {"limits": {...}} sets the resource limits; the worker answers {"ready": true} once it has
checked that each can be set (or {"error": "..."}, and exits).

Each sample runs in a forked child: a new session, a fresh directory under $TMPDIR as cwd and HOME, stdin
from /dev/null, stdout and stderr to a capped file, resource limits (address space, CPU time, file size,
open files, processes). It passes only if it writes the parent's token to the result pipe after the program
returned, i.e. after the last test ran; an exit, a crash or a kill before that is a failure. After each
sample every other process in the sandbox's pid namespace is killed and the directory removed, so nothing a
sample started outlives it.
"""

import json
import linecache
import os
import resource
import secrets
import select
import shutil
import signal
import sys
import time

LIMITS = {}
NAMESPACE = False  # inside bubblewrap's pid namespace: every process but ours belongs to a sample
OUTPUT_BYTES = 2048


def _apply_limits():
    for name, value in LIMITS.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def _sweep(keep):
    """Kill every process of this namespace but ours (a sample's children, daemons, fork bombs)."""
    for _ in range(50):
        others = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in keep]
        if not others:
            return
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.002)


def _child(program, workdir, token, write_fd):
    os.setsid()
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update({"HOME": workdir, "TMPDIR": workdir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(os.path.join(workdir, ".output"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.closerange(3, write_fd)
    os.closerange(write_fd + 1, 65536)
    _apply_limits()
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    # The program's lines for the traceback, which otherwise names "<sample>", line 97 and shows no code; and the
    # traceback starts at the program, not at this function's frame (of no use to a reader of samples.jsonl).
    linecache.cache["<sample>"] = (len(program), None, program.splitlines(True), "<sample>")
    try:
        exec(compile(program, "<sample>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        os.write(write_fd, token)
    except BaseException:
        import traceback

        kind, error, tb = sys.exc_info()
        traceback.print_exception(kind, error, tb.tb_next)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _exits_within(pid, timeout):
    """Whether the child `pid` exits within `timeout` seconds (it is not reaped where pidfds exist)."""
    try:
        pidfd = os.pidfd_open(pid)  # Linux 5.3+: woken the moment it exits
    except (AttributeError, OSError):  # macOS has none; a kernel before 5.3 (Ubuntu 18.04's) answers ENOSYS
        pidfd = None
    if pidfd is not None:
        try:
            return bool(select.select([pidfd], [], [], timeout)[0])
        finally:
            os.close(pidfd)
    # Polled instead: every 1 ms at first, then every 10 ms (a sample takes tens of ms at least)
    deadline, pause = time.monotonic() + timeout, 0.001
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    return False


def _run(job, base, keep):
    token = secrets.token_bytes(16)
    workdir = os.path.join(base, "s" + secrets.token_hex(4))
    os.mkdir(workdir, 0o700)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(job["program"], workdir, token, write_fd)
    os.close(write_fd)
    status = "done" if _exits_within(pid, job["timeout"]) else "timeout"
    if NAMESPACE:
        _sweep(keep)
    else:  # no pid namespace to empty: kill the sample's session, which is all we can name
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # already reaped by the sweep
        pass
    if status == "done":
        os.set_blocking(read_fd, False)
        try:
            proof = os.read(read_fd, 64)
        except BlockingIOError:
            proof = b""
        status = "passed" if proof == token else "failed"
    os.close(read_fd)
    try:
        with open(os.path.join(workdir, ".output"), "rb") as f:
            output = f.read(OUTPUT_BYTES).decode("utf-8", "replace")
    except OSError:
        output = ""
    shutil.rmtree(workdir, ignore_errors=True)
    for leftover in os.listdir(base):  # whatever else the sample wrote to this worker's own temp folder
        path = os.path.join(base, leftover)
        try:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
        except OSError:
            pass
    return {"id": job["id"], "status": status, "output": output}


def main():
    global LIMITS, NAMESPACE
    base = os.environ.get("TMPDIR", "/tmp")
    keep = {os.getpid(), 1}
    out = sys.stdout
    setup = json.loads(sys.stdin.readline())
    LIMITS, NAMESPACE = setup["limits"], setup["namespace"]
    pid = os.fork()  # check that every limit can be set before any sample depends on it
    if pid == 0:
        try:
            _apply_limits()
        except (ValueError, OSError) as e:
            os.write(2, f"{e}".encode())
            os._exit(1)
        os._exit(0)
    _, code = os.waitpid(pid, 0)
    if code:
        out.write(json.dumps({"error": "a resource limit cannot be set in the sandbox"}) + "\n")
        out.flush()
        return
    out.write(json.dumps({"ready": True, "uid": os.getuid(), "pid": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        out.write(json.dumps(_run(json.loads(line), base, keep)) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
