"""SemDeDup's two-level assignment (kernels/semdedup_assign.py) against a float64 brute force of
the definition (docs/science.md §10: the centroid of largest cosine, ties to the lowest index)."""
import numpy as np
import pytest

from clipsql.kernels import semdedup as K
from clipsql.kernels import semdedup_assign as A


def brute_labels(X, C32):
    """Written from the definition only: float64 unit rows and centroids, argmax of the cosines."""
    Z = X.astype(np.float64)
    Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    C = C32.astype(np.float64)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    S = Z @ C.T
    return np.argmax(S, axis=1), S[np.arange(len(Z)), np.argmax(S, axis=1)]


def clustered(n, d=32, groups=32, sub=64, seed=0):
    """Three-level structure: groups → sub-clusters → rows (as image embeddings have)."""
    rng = np.random.default_rng(seed)
    top = rng.normal(size=(groups, d))
    top /= np.linalg.norm(top, axis=1, keepdims=True)
    mid = top[rng.integers(groups, size=groups * sub)] + 0.35 * rng.normal(size=(groups * sub, d)) / np.sqrt(d)
    mid /= np.linalg.norm(mid, axis=1, keepdims=True)
    X = mid[rng.integers(len(mid), size=n)] + 0.12 * rng.normal(size=(n, d)) / np.sqrt(d)
    return (X * rng.uniform(0.5, 20, size=(n, 1))).astype(np.float32)


def centroids(X, k, seed=0):
    inv, _ = K.inverse_norms(X)
    C32, _ = K.fit_units(K.unit32(X, inv, np.arange(min(len(X), 64 * k))), k, np.random.default_rng(seed), 4)
    return C32


@pytest.mark.parametrize("kind", ["clustered", "uniform"])
def test_two_level_equals_flat_and_the_brute_force(kind):
    rng = np.random.default_rng(3)
    if kind == "clustered":
        X = clustered(12000)
    else:       # no structure: the bound rarely prunes, rows open many cells — still exact
        X = rng.normal(size=(3000, 16)).astype(np.float32)
    C32 = centroids(X, 300)
    # planted exact ties: rows halfway between two centroids (the lowest index must win)
    pairs = rng.choice(300, size=(40, 2))
    Cn = C32.astype(np.float64) / np.linalg.norm(C32.astype(np.float64), axis=1, keepdims=True)
    X = np.concatenate([X, (Cn[pairs[:, 0]] + Cn[pairs[:, 1]]).astype(np.float32), C32[:20]])
    X[5] = 0.0
    X[7, 3] = np.nan
    inv, valid = K.inverse_norms(X)
    work = A.Work()
    lab, cos = A.Assigner(C32, threshold=0, work=work).assign(X, inv, valid)
    flat_lab, flat_cos = K.assign(X, inv, valid, C32)
    assert np.array_equal(lab, flat_lab)
    assert np.array_equal(cos, flat_cos, equal_nan=True)
    assert lab[5] == -1 and lab[7] == -1 and np.isnan(cos[5]) and np.isnan(cos[7])
    ok = valid
    bl, bc = brute_labels(X[ok], C32)
    top = np.sort(Cn @ (X[ok] / np.linalg.norm(X[ok], axis=1, keepdims=True)).T.astype(np.float64), axis=0)
    clear = top[-1] - top[-2] > 1e-12          # the brute force's own rounding cannot decide exact ties
    assert np.array_equal(lab[ok][clear], bl[clear])
    assert np.allclose(cos[ok], bc, rtol=0, atol=1e-12)
    assert work.rows == ok.sum() and work.flat_rows > 0          # the ties went to the flat kernel
    # a batch of rows, or a row alone, gets the same values
    sub = np.array([0, 9, 100, len(X) - 1])
    l2, c2 = A.Assigner(C32, threshold=0).assign(X, inv, valid, rows=sub)
    assert np.array_equal(l2, lab[sub]) and np.array_equal(c2, cos[sub])


def test_two_level_work_per_row_grows_like_the_square_root_of_k():
    X = clustered(16000)
    inv, valid = K.inverse_norms(X)
    per_row = {}
    for k in (256, 1024):
        work = A.Work()
        C32 = centroids(X, k)
        lab, _ = A.Assigner(C32, threshold=0, work=work).assign(X, inv, valid)
        assert np.array_equal(lab, K.assign(X, inv, valid, C32)[0])
        per_row[k] = work.per_row()
    # flat: K dot products a row (×4 from 256 to 1024); two-level: ≈ K1 + a few cells of K/K1
    assert per_row[1024] < 1024 / 6
    assert per_row[1024] / per_row[256] < 2.5


def test_assigner_below_threshold_is_the_flat_kernel():
    X = clustered(2000)
    inv, valid = K.inverse_norms(X)
    C32 = centroids(X, 40)
    a = A.Assigner(C32)                       # default threshold: flat at K = 40
    assert not a.two_level
    lab, cos = a.assign(X, inv, valid)
    fl, fc = K.assign(X, inv, valid, C32)
    assert np.array_equal(lab, fl) and np.array_equal(cos, fc)
    assert a.work.per_row() == 40


def test_two_level_kmeans_fit_equals_the_flat_fit():
    X = clustered(8000)
    inv, _ = K.inverse_norms(X)
    U = K.unit32(X, inv, np.arange(len(X)))
    work = A.Work()
    C_flat, info_flat = K.fit_units(U, 400, np.random.default_rng(5), 6)
    C_two, info_two = A.fit_units(U, 400, np.random.default_rng(5), 6, threshold=0, work=work)
    assert np.array_equal(C_flat, C_two) and info_flat == info_two
    assert work.rows == len(U) * info_two["iterations_run"] and work.per_row() < 400


def test_where_the_bound_does_not_prune_rows_go_flat_and_the_assigner_stops_paying():
    """Wide isotropic clusters in d = 64 (cos ≈ 0.5 inside): the triangle bound prunes nothing; the
    rows go to the flat kernel after one cell, then the whole assigner does: same labels, work ≈ flat."""
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(200, 64))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    X = (centres[rng.integers(200, size=30000)] + rng.normal(size=(30000, 64)) / 8.0).astype(np.float32)
    inv, valid = K.inverse_norms(X)
    C32 = centroids(X[:6000], 300)
    work = A.Work()
    a = A.Assigner(C32, threshold=0, work=work)
    lab, cos = a.assign(X, inv, valid)
    fl, fc = K.assign(X, inv, valid, C32)
    assert np.array_equal(lab, fl) and np.array_equal(cos, fc)
    assert not a.two_level                       # switched after the first chunk
    assert work.per_row() < 1.15 * 300           # K1 + one cell + K for the first chunk, K after
    C_flat, _ = K.fit_units(K.unit32(X, inv, np.arange(6000)), 300, np.random.default_rng(2), 3)
    C_two, _ = A.fit_units(K.unit32(X, inv, np.arange(6000)), 300, np.random.default_rng(2), 3, threshold=0)
    assert np.array_equal(C_flat, C_two)
