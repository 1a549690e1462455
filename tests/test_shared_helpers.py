"""The helpers every caller shares: one row normaliser (kernels.unit), one atomic file write and
one file hash (clipsql.files). References here use only the standard library."""
import hashlib
import math

import numpy as np
import pytest

from clipsql.files import AtomicFile, sha256_file, write_atomic
from clipsql.kernels import semdedup, topk
from clipsql.kernels.scores import normalize as scores_normalize
from clipsql.kernels.unit import normalize

ROWS = [[3.0, 4.0, 0.0],            # ordinary
        [0.0, 0.0, 0.0],            # zero: no direction
        [1.0, float("nan"), 0.0],   # non-finite
        [float("inf"), 1.0, 0.0],
        [1e300, -2e300, 1e299],     # ‖x‖² overflows a double, x does not
        [1e-310, 2e-310, 0.0],      # subnormal: ‖x‖² underflows
        [-1e-160, 0.0, 1e-160]]
VALID = [True, False, False, False, True, True, True]


def _unit(row):
    if not all(math.isfinite(v) for v in row) or not any(row):
        return None
    scale = max(abs(v) for v in row)
    s = [v / scale for v in row]
    n = math.sqrt(math.fsum(v * v for v in s))
    return [v / n for v in s]


@pytest.mark.parametrize("invalid", [np.nan, 0.0])
def test_normalize_edge_rows(invalid):
    Xh, valid = normalize(np.array(ROWS), invalid=invalid)
    assert valid.tolist() == VALID and Xh.dtype == np.float64
    for row, got in zip(ROWS, Xh):
        want = _unit(row)
        if want is None:
            assert (np.isnan(got).all() if np.isnan(invalid) else (got == 0.0).all())
        else:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
    assert normalize(np.zeros((0, 3)))[0].shape == (0, 3)
    with pytest.raises(ValueError, match="2-D"):
        normalize(np.ones(3))


def test_every_caller_shares_the_normaliser():
    X = np.array(ROWS)
    assert scores_normalize is normalize
    # search queries: invalid rows are zero (they score nothing), a huge finite row has a direction
    Q, ok = topk.unit_queries(X)
    assert ok.tolist() == VALID and (Q[~ok] == 0).all()
    np.testing.assert_allclose(Q[4], _unit(ROWS[4]), rtol=1e-12)
    q1, ok1 = topk.unit_queries(np.array(ROWS[0]))
    assert q1.shape == (1, 3) and ok1.tolist() == [True]
    # SemDeDup centroids: float32 in, unit float64 out, an invalid one stays a zero vector
    C = semdedup.unit_centroids(np.array([[3, 4, 0], [0, 0, 0], [np.nan, 1, 0]], np.float32))
    np.testing.assert_allclose(C[0], [0.6, 0.8, 0.0], rtol=1e-12)
    assert (C[1:] == 0).all()
    # a spherical k-means update keeps the old centroid of an empty cluster
    U = np.array([[1.0, 0.0], [0.0, 1.0]])
    old = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    new = semdedup._update(U, np.array([0, 0]), old)
    np.testing.assert_allclose(new[0], [math.sqrt(0.5)] * 2, rtol=1e-12)
    assert (new[1:] == old[1:]).all()


def test_sha256_file(tmp_path):
    data = bytes(range(256)) * (3 * 4096 + 7)        # > 3 chunks of 1 MiB
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert sha256_file(p) == sha256_file(p, fsync=True) == hashlib.sha256(data).hexdigest()


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    p = tmp_path / "out.json"
    assert write_atomic(p, "first\n") == hashlib.sha256(b"first\n").hexdigest()
    assert p.read_text() == "first\n"

    with pytest.raises(RuntimeError):
        with AtomicFile(p) as f:
            f.tmp.write_text("half")
            raise RuntimeError("killed while writing")
    assert p.read_text() == "first\n" and sorted(x.name for x in tmp_path.iterdir()) == ["out.json"]

    def refuse():
        raise RuntimeError("killed before the rename")
    with pytest.raises(RuntimeError):
        with AtomicFile(p, before_rename=refuse) as f:
            f.tmp.write_bytes(b"second")
    assert p.read_text() == "first\n" and sorted(x.name for x in tmp_path.iterdir()) == ["out.json"]

    with AtomicFile(p) as f:
        f.tmp.write_bytes(b"second")
    assert p.read_bytes() == b"second" and f.sha256 == hashlib.sha256(b"second").hexdigest()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.json"]
