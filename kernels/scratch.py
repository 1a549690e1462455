"""A float32 matrix spilled to local scratch disk, row by row, and read back by row range or by
position: the rows of a pass kept for the passes after it without holding them in memory.

    s = ScratchRows.create(n_rows, dim)   # None when the temporary folder has no room for them
    s.append(X)                           # float32 (m, dim), in order
    s.append_soon(X); s.wait()            # the same on a writer thread (≤ 2 pending), overlapping the reader
    s.rows(a, b)                          # rows a..b-1, one read
    s.take(pos)                           # rows at sorted positions, a memory map per chunk

The file is created unlinked (`tempfile.TemporaryFile`: on Linux O_TMPFILE, no name in any
folder), in $TMPDIR or the system's temporary folder: a process killed at any instant leaves
nothing behind, and the space is free again when the file is closed. A temporary folder on tmpfs
is not used (its files are RAM): `create` then returns None, as when the disk lacks room. Reads
go through the page cache: `take` maps one chunk's span at a time (at most TAKE_ROWS rows), so the
mapped pages the process holds stay bounded by a chunk instead of growing to the whole file. Any OSError (a full
disk while appending) is the caller's to handle: it can fall back to reading its source again.
"""
from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

TAKE_ROWS = 4096                 # positions gathered under one memory map
HEADROOM = 1 << 30               # bytes left free on the scratch disk beyond the file itself
MEMORY_FS = frozenset({"tmpfs", "ramfs"})      # file systems whose files live in RAM


def mount_type(folder: str, mounts: str = "/proc/self/mounts") -> str | None:
    """The file-system type of the mount holding `folder` (Linux's mount table; None elsewhere)."""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as fh:
            table = [line.split()[1:3] for line in fh if len(line.split()) >= 3]
    except OSError:
        return None
    path = os.path.realpath(folder)
    best, kind = "", None
    for point, fstype in table:
        point = point.replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def has_room(nbytes: int, folder: str | None = None) -> bool:
    """Whether `folder` (default: the temporary folder) is on a disk (not tmpfs: a file there
    would hold the rows in RAM after all) that can take `nbytes` and keep max(1 GiB, 5 % of the
    file) free beside it."""
    folder = folder or tempfile.gettempdir()
    if mount_type(folder) in MEMORY_FS:
        return False
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return False
    return free >= nbytes + max(HEADROOM, nbytes // 20)


class ScratchRows:
    def __init__(self, fh, n_rows: int, dim: int):
        self._fh = fh
        self.n_rows, self.dim = int(n_rows), int(dim)
        self.row_bytes = 4 * self.dim
        self.written = 0
        self._writer: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    @classmethod
    def create(cls, n_rows: int, dim: int, folder: str | None = None) -> "ScratchRows | None":
        """A scratch file for `n_rows` × `dim` float32 rows, or None when there is no room for it
        (or the temporary folder cannot be written)."""
        if n_rows <= 0 or dim <= 0 or not has_room(4 * n_rows * dim, folder):
            return None
        try:
            fh = tempfile.TemporaryFile(dir=folder or tempfile.gettempdir(), buffering=0)
        except OSError:
            return None
        return cls(fh, n_rows, dim)

    @property
    def complete(self) -> bool:
        return self._fh is not None and self.written == self.n_rows

    def append(self, X: np.ndarray) -> None:
        """The next rows, in order (float32 (m, dim); converted if not)."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.dim or self.written + len(X) > self.n_rows:
            raise ValueError(f"scratch rows: {X.shape} after {self.written} of {self.n_rows} × {self.dim}")
        if not X.size:
            return
        view = memoryview(X).cast("B")
        done = 0
        while done < len(view):                      # a raw write may be short
            done += self._fh.write(view[done:])
        self.written += len(X)

    def append_soon(self, X: np.ndarray) -> None:
        """`append(X)` on this file's writer thread (the write releases the GIL), in order; with two
        appends pending it first waits for the older one. An error of an earlier append is raised
        here or by `wait()`; X must not change until then."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="clipsql-scratch")
        while len(self._pending) >= 2:
            self._pending.popleft().result()
        self._pending.append(self._writer.submit(self.append, X))

    def wait(self) -> None:
        """Every pending `append_soon` done; raises the first one's error."""
        while self._pending:
            self._pending.popleft().result()

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows a..b-1 (written ones) as a new float32 array."""
        if not 0 <= a <= b <= self.written:
            raise IndexError(f"scratch rows {a}..{b} of {self.written}")
        out = np.empty((b - a, self.dim), dtype=np.float32)
        if not out.size:
            return out
        view = memoryview(out).cast("B")
        done, off = 0, a * self.row_bytes
        while done < len(view):
            got = os.preadv(self._fh.fileno(), [view[done:]], off + done)
            if got <= 0:
                raise OSError(f"scratch file ended at byte {off + done}")
            done += got
        return out

    def take(self, pos: np.ndarray) -> np.ndarray:
        """The rows at the sorted positions `pos` (written ones) as a new float32 array."""
        pos = np.asarray(pos, dtype=np.int64)
        out = np.empty((len(pos), self.dim), dtype=np.float32)
        if not len(pos):
            return out
        if pos[0] < 0 or pos[-1] >= self.written or (len(pos) > 1 and np.any(np.diff(pos) < 0)):
            raise IndexError(f"scratch positions must be sorted and below {self.written}")
        gran = mmap.ALLOCATIONGRANULARITY
        for a in range(0, len(pos), TAKE_ROWS):
            p = pos[a:a + TAKE_ROWS]
            lo, hi = int(p[0]) * self.row_bytes, (int(p[-1]) + 1) * self.row_bytes
            start = lo - lo % gran
            mm = mmap.mmap(self._fh.fileno(), hi - start, access=mmap.ACCESS_READ, offset=start)
            try:
                span = np.frombuffer(mm, dtype=np.float32, count=(hi - lo) // 4, offset=lo - start)
                out[a:a + len(p)] = span.reshape(-1, self.dim)[p - p[0]]
                del span                              # no view may outlive the map
            finally:
                mm.close()
        return out

    def close(self) -> None:
        if self._writer is not None:                  # no write may land after the file is closed
            self._writer.shutdown(wait=True, cancel_futures=True)
            self._writer = None
            self._pending.clear()
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "ScratchRows":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
