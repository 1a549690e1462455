"""Files written whole or not at all, and the sha256 of a file.

    with AtomicFile(path) as f:     # write f.tmp (a file beside `path`) in the block
        f.tmp.write_bytes(data)
    f.sha256                        # the hash of what now stands at `path`

A kill at any instant leaves the previous file or the new one, never a truncated one: the
temporary file is fsynced before it is renamed over `path`, and the folder after. The temporary
file is named `.<name>.tmp-<host>-<pid>` (one writer of a path per process at a time): one left by
a killed process is removed by the next AtomicFile of the same path (`clipsql.leftovers`).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable

from clipsql import leftovers


def sha256_file(path: str | os.PathLike, fsync: bool = False) -> str:
    """The sha256 (hex) of a file's bytes, read in 1 MiB chunks; `fsync`: also flush it to disk."""
    h = hashlib.sha256()
    with open(path, "rb+" if fsync else "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a folder (making a rename in it durable), where the file system lets it be
    opened and fsynced; never raises."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass        # some file systems cannot fsync a folder; the rename itself is done
    finally:
        os.close(fd)


class AtomicFile:
    """Context manager: write `self.tmp` in the block; on leaving it without an exception the
    temporary file is fsynced (its sha256 kept in `self.sha256`), `before_rename()` runs, it is
    renamed over `path` and the folder fsynced; on an exception it is removed."""

    def __init__(self, path: str | os.PathLike, before_rename: Callable[[], Any] | None = None):
        self.path = Path(path)
        prefix = f".{self.path.name}.tmp-"
        leftovers.sweep(self.path.parent, re.compile(re.escape(prefix) + leftovers.TAG))
        self.tmp = self.path.parent / f"{prefix}{leftovers.owner_tag()}"
        self.before_rename = before_rename
        self.sha256: str | None = None

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.sha256 = sha256_file(self.tmp, fsync=True)
                if self.before_rename is not None:
                    self.before_rename()
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)
        if exc_type is None:
            fsync_path(self.path.parent)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> str:
    """Write `data` (str: UTF-8) to `path` atomically; returns its sha256."""
    with AtomicFile(path) as f:
        f.tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return f.sha256 or ""
