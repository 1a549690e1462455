"""What a killed process leaves behind, and how the next one sweeps it.

A temporary file or folder that a process may leave when it is killed is named with the process's
owner tag (`owner_tag()`: this host and the PID, e.g. `.out.parquet.tmp-myhost-4242`). A later
process sweeps the entries of a folder whose tag names this host and a PID that no longer runs;
entries of live processes (also another user's: signalling it is refused, so it counts as alive),
of other hosts (a shared folder) and names it does not recognise are left alone.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname().split(".")[0])[:32] or "host"
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


def sweep(folder: str | os.PathLike, pattern: re.Pattern) -> list[str]:
    """Remove the entries of `folder` whose names match `pattern` (which has TAG's `host` and `pid`
    groups) and whose process has ended; returns the names removed. Never raises: what cannot be
    listed or removed (another user's, already gone) stays."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not dead_owner(pattern.fullmatch(name)):
            continue
        path = Path(folder) / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(name)
    return removed
