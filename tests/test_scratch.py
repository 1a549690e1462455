"""kernels.scratch: rows spilled to an unlinked temporary file read back as numpy would index them."""
import os
from collections import namedtuple

import numpy as np
import pytest

from clipsql.kernels import scratch as S

MOUNT_TYPE = S.mount_type


@pytest.fixture(autouse=True)
def on_disk(monkeypatch):
    """The temporary folder counts as a disk whatever this machine mounts there (often tmpfs)."""
    monkeypatch.setattr(S, "mount_type", lambda folder: None)


def test_rows_and_takes_equal_numpy_indexing_and_leave_no_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((1000, 24)).astype(np.float32)
    X[17] = np.nan                                              # a NULL row read as NaN survives
    monkeypatch.setattr(S, "TAKE_ROWS", 13)                     # many memory maps, spans of any offset
    s = S.ScratchRows.create(len(X), X.shape[1], folder=str(tmp_path))
    assert s is not None and os.listdir(tmp_path) == []          # unlinked: nothing a kill can leave
    a = 0
    for m in (1, 7, 300, 0, 692):                               # uneven appends, float64 converted
        s.append(X[a:a + m].astype(np.float64) if m == 7 else X[a:a + m])
        a += m
    assert s.complete and s.written == len(X)
    assert np.array_equal(s.rows(0, len(X)), X, equal_nan=True)
    assert np.array_equal(s.rows(400, 401), X[400:401]) and s.rows(5, 5).shape == (0, 24)
    for size in (0, 1, 50, 999, 1000):
        pos = np.sort(rng.choice(len(X), size, replace=False))
        assert np.array_equal(s.take(pos), X[pos], equal_nan=True)
    with pytest.raises(IndexError):
        s.take(np.array([5, 3]))
    with pytest.raises(IndexError):
        s.take(np.array([1000]))
    with pytest.raises(IndexError):
        s.rows(990, 1001)
    with pytest.raises(ValueError):
        s.append(X[:1])                                         # past the declared rows
    s.close()
    s.close()                                                   # idempotent


def test_no_scratch_without_room(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(S.shutil, "disk_usage", lambda p: usage(10 << 30, 0, (1 << 30) + 4 * 1000 * 8 - 1))
    assert S.ScratchRows.create(1000, 8, folder=str(tmp_path)) is None      # keeps 1 GiB free beside it
    monkeypatch.setattr(S.shutil, "disk_usage", lambda p: usage(10 << 30, 0, (1 << 30) + 4 * 1000 * 8))
    with S.ScratchRows.create(1000, 8, folder=str(tmp_path)) as s:
        assert s is not None
    assert S.ScratchRows.create(1000, 8, folder=str(tmp_path / "missing")) is None


def test_appends_on_the_writer_thread_keep_their_order_and_report_errors(tmp_path, monkeypatch):
    X = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
    with S.ScratchRows.create(64, 4, folder=str(tmp_path)) as s:
        for a in range(0, 64, 5):
            s.append_soon(X[a:a + 5].copy())
        s.wait()
        assert s.complete and np.array_equal(s.rows(0, 64), X)
    calls = []
    real = S.ScratchRows.append

    def full_disk(self, Y):
        calls.append(len(Y))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(self, Y)
    monkeypatch.setattr(S.ScratchRows, "append", full_disk)
    s = S.ScratchRows.create(64, 4, folder=str(tmp_path))
    with pytest.raises(OSError, match="No space"):
        for a in range(0, 64, 8):
            s.append_soon(X[a:a + 8])
        s.wait()
    s.close()
    assert s._writer is None and s._fh is None


def test_a_temporary_folder_in_memory_is_not_used(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\n"
                      f"tmpfs {tmp_path / 'ram'} tmpfs rw 0 0\n"
                      f"/dev/vdb {tmp_path / 'ram' / 'disk'} ext4 rw 0 0\n")
    assert MOUNT_TYPE(str(tmp_path / "ram" / "x"), str(mounts)) == "tmpfs"
    assert MOUNT_TYPE(str(tmp_path / "ram"), str(mounts)) == "tmpfs"
    assert MOUNT_TYPE(str(tmp_path / "ram" / "disk" / "y"), str(mounts)) == "ext4"    # the deepest mount
    assert MOUNT_TYPE(str(tmp_path / "rammed"), str(mounts)) == "ext4"                 # not a path prefix
    assert MOUNT_TYPE(str(tmp_path), str(tmp_path / "no-table")) is None
    monkeypatch.setattr(S, "mount_type", lambda folder: MOUNT_TYPE(folder, str(mounts)))
    (tmp_path / "ram").mkdir()
    assert not S.has_room(10, str(tmp_path / "ram"))
    assert S.ScratchRows.create(10, 4, folder=str(tmp_path / "ram")) is None
    assert S.has_room(10, str(tmp_path))
