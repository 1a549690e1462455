"""The statistics fold (kernels.moments.fold_pair, the writer's background fold) against a float64
brute force that shares no code with it: moments of raw and normalized rows, folded across chunk
boundaries and merged from partials centred on different shifts, within 1e-9 relative."""
import threading

import numpy as np
import pyarrow as pa
import pytest

import clipsql.kernels.moments as km
from clipsql.store import writer as writer_mod
from clipsql.store.runs import start_run
from clipsql.store.stats import saved_stats
from clipsql.store.writer import Writer


def brute(X: np.ndarray) -> dict:
    """Population moments of the finite rows of X, in float64, straight from the definitions."""
    X = np.asarray(X, dtype=np.float64)
    X = X[~np.isnan(X).any(axis=1)]
    n = len(X)
    mean = X.sum(axis=0) / n
    D = X - mean
    cov = np.einsum("ki,kj->ij", D, D) / n
    U = X / np.sqrt((X * X).sum(axis=1, keepdims=True))
    return {"n": n, "mean": mean, "cov": cov, "nsum": U.sum(axis=0), "nmean": U.sum(axis=0) / n}


def clip_like_rows(rng: np.random.Generator, n: int, d: int, offset: float) -> np.ndarray:
    """float32 rows far from the origin (‖mean‖ ≫ spread, as raw CLIP vectors sit)."""
    centre = offset * rng.normal(size=d)
    return (centre + rng.normal(size=(n, d)) * np.linspace(0.05, 1.0, d)).astype(np.float32)


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    assert err <= 1e-9, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_fold_pair_matches_float64_brute_force_across_chunks(monkeypatch, offset):
    monkeypatch.setattr(km, "FOLD_CHUNK", 64)        # many chunks, a ragged last one
    rng = np.random.default_rng(3)
    X = clip_like_rows(rng, 1000, 24, offset)
    X[[5, 300, 999]] = np.nan                       # NULL vectors: not rows of the statistics
    raw, nrm = km.RunningMoments(24), km.RunningMoments(24, second=False)
    for part in np.array_split(X, 7):               # batches of any size
        km.fold_pair(raw, nrm, part)
    want = brute(X)
    assert raw.n == nrm.n == want["n"] == 997
    assert_close(raw.mean, want["mean"], "raw mean")
    assert_close(raw.cov, want["cov"], "raw covariance")
    assert_close(nrm.mean, want["nmean"], "normalized mean")
    assert_close(nrm.sum, want["nsum"], "normalized sum")


def test_partials_with_their_own_shifts_merge_and_subtract_to_the_brute_force():
    rng = np.random.default_rng(4)
    X = clip_like_rows(rng, 1500, 16, 20.0)
    parts = []
    for chunk in (X[:200], X[200:900], X[900:]):     # each centred on its own first rows' mean
        raw, nrm = km.RunningMoments(16), km.RunningMoments(16, second=False)
        km.fold_pair(raw, nrm, chunk)
        parts.append((raw, nrm))
    total_raw, total_nrm = km.RunningMoments(16), km.RunningMoments(16, second=False)
    for raw, nrm in parts:
        total_raw.merge(raw)
        total_nrm.merge(nrm)
    want = brute(X)
    assert_close(total_raw.mean, want["mean"], "merged mean")
    assert_close(total_raw.cov, want["cov"], "merged covariance")
    assert_close(total_nrm.sum, want["nsum"], "merged normalized sum")
    total_raw.subtract(parts[1][0])                  # rows 200..899 deleted
    total_nrm.subtract(parts[1][1])
    rest = np.vstack([X[:200], X[900:]])
    want = brute(rest)
    assert total_raw.n == len(rest)
    assert_close(total_raw.mean, want["mean"], "mean after subtract")
    assert_close(total_raw.cov, want["cov"], "covariance after subtract")
    assert_close(total_nrm.mean, want["nmean"], "normalized mean after subtract")


def test_writer_reports_the_folds_cpu_not_their_waits(store, monkeypatch):
    """`stats (background)` is the fold threads' CPU: a fold that waits for a core (here: blocked on
    an event) costs none. Summed wall time counted those waits (on 2 busy cores ~3× the fold's CPU)."""
    rec = store.register_model(model_id="m", kind="clip", dim=4, logit_scale=1.0, logit_bias=None,
                               context_length=None, spec={})
    never = threading.Event()

    def waiting_fold(raw, normalized, X):  # noqa: ANN001
        never.wait(0.3)                              # off-CPU, as a thread waiting for a core is
        km.fold_pair(raw, normalized, X)

    monkeypatch.setattr(writer_mod, "fold_pair", waiting_fold)
    w = Writer(store, rec, run_id=start_run(store.engine, "m", "src", "precomputed"), source="src")
    rng = np.random.default_rng(0)
    w.add(None, pa.array(["a", "b", "c"]), rng.normal(size=(3, 4)), rng.normal(size=(3, 4)))
    w.commit()
    w.close()
    assert saved_stats(store, rec).n == 3
    assert w.fold_seconds < 0.2                      # two folds waited 0.3 s each: 0.6 s of wall
