"""What a killed process leaves behind, and how the next one sweeps it.

A temporary file or folder that a process may leave when it is killed is named with the process's
owner tag (`owner_tag()`: this host and the PID, e.g. `.out.parquet.tmp-myhost-4242`). A later
process sweeps the entries of a folder whose tag names this host and a PID that no longer runs;
entries of live processes (also another user's: signalling it is refused, so it counts as alive),
of other hosts (a shared folder) and names it does not recognise are left alone. What a dead process
started and that outlived it (a local Ray's helper processes) is ended with `stop` before its folder goes.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Callable, Iterable

_NAME = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname().split(".")[0]) or "host"
# at most 16 characters, so that paths under a tagged folder stay short (unix socket paths, as a local
# Ray's, are limited to ~107 bytes): a longer name keeps its start and a hash of the whole name
_HOST = _NAME if len(_NAME) <= 16 else _NAME[:8] + hashlib.sha256(_NAME.encode()).hexdigest()[:8]
TAG = r"(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)"


def owner_tag(pid: int | None = None) -> str:
    """`host-pid` of this process (or of `pid` on this host)."""
    return f"{_HOST}-{os.getpid() if pid is None else pid}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this machine (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True             # another user's process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True             # no /proc (macOS): the signal said it exists


def dead_owner(match: re.Match | None) -> bool:
    """A match of a pattern with TAG's groups names a process of this host that has ended."""
    return (match is not None and match.group("host") == _HOST and int(match.group("pid")) != os.getpid()
            and not pid_alive(int(match.group("pid"))))


def sweep(folder: str | os.PathLike, pattern: re.Pattern,
          before: Callable[[Path], object] | None = None) -> list[str]:
    """Remove the entries of `folder` whose names match `pattern` (which has TAG's `host` and `pid`
    groups) and whose process has ended; returns the names removed. `before(path)` runs first for
    each (to stop what still uses it). Never raises: what cannot be listed or removed (another
    user's, already gone) stays."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not dead_owner(pattern.fullmatch(name)):
            continue
        path = Path(folder) / name
        if before is not None:
            before(path)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(name)
    return removed


def stop(pids: Iterable[int], grace: float = 10.0) -> list[int]:
    """End processes: SIGTERM, wait up to `grace` seconds for them to exit, then SIGKILL the rest and
    wait again. Returns the PIDs still running (another user's: signalling them is refused). This
    process is never signalled."""
    left = sorted({int(p) for p in pids} - {os.getpid()})
    for sig in (signal.SIGTERM, getattr(signal, "SIGKILL", signal.SIGTERM)):
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        left = wait_exit(left, grace)
        if not left:
            break
    return left


def wait_exit(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until the processes have exited or `timeout` seconds passed; returns those still running.
    Waits on each process's pidfd (Linux); where there is none, looks every 50 ms."""
    deadline = time.monotonic() + timeout
    fds: dict[int, int] = {}
    polled = []
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
        except (AttributeError, OSError):       # no pidfd (macOS, Linux before 5.3)
            polled.append(pid)
    try:
        while True:
            polled = [p for p in polled if pid_alive(p)]
            left = deadline - time.monotonic()
            if (not fds and not polled) or left <= 0:
                return sorted([*fds.values(), *polled])
            ready, _, _ = select.select(list(fds), [], [], min(left, 0.05) if polled else left)
            for fd in ready:                    # readable once the process has exited
                os.close(fd)
                del fds[fd]
    finally:
        for fd in fds:
            os.close(fd)
