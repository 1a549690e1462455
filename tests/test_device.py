"""The torch device path of the exact kernels (models/device.py), run here with device="cpu": the
same code a GPU runs (only the torch device differs), checked against float64 brute forces of
docs/science.md §1 (Information Gain, 1e-9 relative) and §10 (SemDeDup max_sim), and against the
numpy kernels (SemDeDup: bit for bit)."""
import numpy as np
import pytest

pytest.importorskip("torch")

from clipsql.kernels import scores as S  # noqa: E402
from clipsql.kernels import semdedup as K  # noqa: E402
from clipsql.kernels import semdedup_blocks as B  # noqa: E402
from clipsql.models import device as DV  # noqa: E402
from conftest import np_info_gain, np_prior, np_unit, wide_pairs  # noqa: E402


# --------------------------------------------------------------------------- brute forces (no project code)
def bf_max_sim(X_rank_order):
    """max over earlier rows of the float64 cosine (0 for the first)."""
    Z = np_unit(X_rank_order)
    out = np.zeros(len(Z))
    for j in range(1, len(Z)):
        out[j] = max(float(Z[k] @ Z[j]) for k in range(j))
    return out


# --------------------------------------------------------------------------- Information Gain
@pytest.fixture(scope="module")
def wide():
    return wide_pairs(600, 40)


@pytest.mark.parametrize("kind,a,b", [("clip", 1.0, 0.0), ("clip", 100.0, 0.0), ("siglip", 10.0, -2.0),
                                      ("siglip", 112.0, -16.5)])
def test_device_info_gain_within_1e9_of_float64_brute_force(wide, kind, a, b):
    Xr, Yr, Xq, Yq = wide
    f = S.fit(Xr, Yr, a=a, b=b, kind=kind)
    own = np.r_[np.arange(0, 600, 75), np.full(len(Xq), -1)]
    for modality, Q, R, prior_of in (("image", np.vstack([Xr[own[:8]], Xq]), Yr, (Xr, Yr)),
                                     ("text", np.vstack([Yr[own[:8]], Yq]), Xr, (Yr, Xr))):
        p = np_prior(*prior_of, a, b, kind)
        for reverse in (False, True):
            want = np_info_gain(Q, R, p, a, b, kind, reverse, own)
            # small tiles: several row chunks and column blocks, the own column in various blocks
            got = S.info_gain(Q, f, modality, reverse=reverse, ref_index=own,
                              kernel=DV.info_gain_kernel("cpu", chunk=16, block=128))
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=0, err_msg=f"{modality} reverse={reverse}")
            whole = DV.info_gain(Q, f, modality, reverse=reverse, ref_index=own, device="cpu")
            np.testing.assert_allclose(whole, want, rtol=1e-9, atol=0)


def test_device_info_gain_nulls_and_no_reference_row_left():
    rng = np.random.default_rng(1)
    Xr, Yr = rng.normal(size=(1, 8)), rng.normal(size=(1, 8))
    f = S.fit(Xr, Yr)
    Q = np.vstack([Xr, np.zeros((1, 8)), rng.normal(size=(1, 8))])
    got = DV.info_gain(Q, f, "image", ref_index=np.array([0, -1, -1]), device="cpu")
    want = S.info_gain(Q, f, "image", ref_index=np.array([0, -1, -1]))
    assert np.isnan(got[0]) and np.isnan(got[1]) and got[2] == pytest.approx(want[2], abs=1e-12)


# --------------------------------------------------------------------------- SemDeDup Gram blocks
def clustered_with_duplicates(n=700, d=48, seed=0):
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(3, d))
    X = C[rng.integers(3, size=n)] + 0.7 * rng.normal(size=(n, d))
    src = rng.choice(n, 120, replace=False)
    X[src[:60]] = X[src[60:]] + 1e-4 * rng.normal(size=(60, d))       # near-duplicates
    X[src[:10]] = X[src[10:20]]                                        # exact duplicates
    return (X * rng.uniform(0.5, 20, size=(n, 1))).astype(np.float32)


def test_device_gram_gives_the_numpy_max_sim_bit_for_bit_and_the_brute_force():
    X = clustered_with_duplicates()
    inv, valid = K.inverse_norms(X)
    members = np.random.default_rng(2).permutation(len(X))
    gram = DV.semdedup_gram("cpu")
    for rows, cols in ((512, 8192), (64, 100), (7, 13)):
        want = K.cluster_max_sim(X, inv, members, rows=rows, cols=cols)
        got = K.cluster_max_sim(X, inv, members, rows=rows, cols=cols, gram=gram)
        assert np.array_equal(got, want)
    np.testing.assert_allclose(got, bf_max_sim(X[members]), rtol=0, atol=1e-12)
    assert (got > 1 - 1e-6).sum() >= 60


def test_device_gram_through_the_grouped_pass():
    X = clustered_with_duplicates(n=900, seed=3)
    inv, valid = K.inverse_norms(X)
    C32, _ = K.fit_units(K.unit32(X, inv, np.arange(len(X))), 6, np.random.default_rng(0), 5)
    labels, cos = K.assign(X, inv, valid, C32)
    rank = np.argsort(np.random.default_rng(4).permutation(len(X)))
    fetch = lambda pos: X[pos]            # noqa: E731
    want, _ = B.within_clusters(fetch, inv, labels, cos.copy(), rank, C32, np.arange(6), 200)
    got, _ = B.within_clusters(fetch, inv, labels, cos.copy(), rank, C32, np.arange(6), 200,
                               gram=DV.semdedup_gram("cpu"))
    assert np.array_equal(got, want, equal_nan=True)


def test_device_names(monkeypatch):
    monkeypatch.delenv(DV.DEVICE_ENV, raising=False)
    assert DV.resolve(None) is None and DV.resolve("numpy") is None and DV.resolve("cpu") == "cpu"
    assert DV.semdedup_gram("numpy") is None
    monkeypatch.setenv(DV.DEVICE_ENV, "cpu")
    assert DV.resolve(None) == "cpu"
    with pytest.raises(DV.DeviceError, match="device must be one of"):
        DV.resolve("tpu")
    import torch
    if not torch.cuda.is_available():
        assert DV.resolve("auto") is None                       # auto: numpy where there is no GPU
        with pytest.raises(DV.DeviceError, match="no CUDA GPU"):
            DV.resolve("cuda")
    else:
        assert DV.resolve("auto") == "cuda"


def test_device_assignment_and_kmeans_steps_give_the_flat_labels():
    X = clustered_with_duplicates(n=3000, seed=5)
    X[4] = 0.0
    inv, valid = K.inverse_norms(X)
    U = K.unit32(X, inv, np.flatnonzero(valid))
    C32, info = K.fit_units(U, 40, np.random.default_rng(0), 5)
    C_dev, info_dev = K.fit_units(U, 40, np.random.default_rng(0), 5, label=DV.semdedup_fit_label("cpu"))
    assert np.array_equal(C32, C_dev) and info == info_dev
    # planted exact ties between two centroids: the lowest index, as the flat kernel decides
    Cn = C32.astype(np.float64) / np.linalg.norm(C32.astype(np.float64), axis=1, keepdims=True)
    X = np.concatenate([X, (Cn[[3, 7, 20]] + Cn[[9, 2, 31]]).astype(np.float32)])
    inv, valid = K.inverse_norms(X)
    want = K.assign(X, inv, valid, C32)
    got = K.assign(X, inv, valid, C32, chunk=1000, nearest=DV.semdedup_nearest(C32, "cpu"))
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1], equal_nan=True)
    assert DV.semdedup_nearest(C32, "numpy") is None and DV.semdedup_fit_label("numpy") is None
