"""The geometry report (docs/science.md §8) against plain numpy written here from the definitions
(sharing no code with queries.kernels.scores), on synthetic raw vectors and on a small demo store;
the linear separator; the vslerp SQL function; the report in a headless browser."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipsql import queries
from clipsql.kernels.geometry import compute_geometry, logistic_separator
from clipsql.queries.present.geometry import geometry_report
from clipsql.kernels.arrays import to_numpy
from clipsql.store.reads import read_embeddings
from clipsql.store.stats import saved_stats
from clipsql.store.store import Store

from _small_demo import small_demo_store
from browser import image_check, screenshot


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    return small_demo_store(tmp_path_factory)


def synthetic(n=500, d=12, seed=3):
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, d)) * np.linspace(2.0, 0.3, d)
    img = 4.0 * np.eye(d)[0] + shared + 0.4 * rng.normal(size=(n, d))
    txt = -3.0 * np.eye(d)[1] + 0.5 * shared + 0.3 * rng.normal(size=(n, d))
    img[7] = 0.0            # invalid rows are left out (and counted)
    txt[11, 3] = np.nan
    return img * 2.5, txt


def chunks(I, T, size):
    return lambda: ((I[i:i + size], T[i:i + size]) for i in range(0, len(I), size))


def numpy_geometry(V):
    """§8 of one modality from the definitions: over the valid rows (finite, non-zero) the offset
    ratio ‖m‖/‖σ‖, the thin shell (mean and variance of ‖x − m‖, sqrt tr C), ODD(l) =
    Σ_{k≠l} |C_lk| / C_ll and each row's conformity (mean cosine to the other rows); C, σ ddof=0."""
    V = np.asarray(V, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        sq = (V * V).sum(axis=1)
    valid = np.isfinite(V).all(axis=1) & (sq > 0)
    X = V[valid]
    m = X.mean(axis=0)
    Z = X - m
    C = Z.T @ Z / len(X)
    radii = np.sqrt((Z * Z).sum(axis=1))
    U = X / np.sqrt((X * X).sum(axis=1))[:, None]
    cos = U @ U.T
    return {"valid": valid, "mean": m, "var": (Z * Z).mean(axis=0),
            "offset_ratio": np.sqrt(m @ m) / np.sqrt((Z * Z).mean(axis=0).sum()),
            "mu": radii.mean(), "shell_var": ((radii - radii.mean()) ** 2).mean(), "sqrt_trace": np.sqrt(np.trace(C)),
            "odd": (np.abs(C).sum(axis=1) - np.abs(np.diag(C))) / np.diag(C),
            "conformity": (cos.sum(axis=1) - np.diag(cos)) / (len(X) - 1)}


def numpy_separability(I, T):
    """Sep(l) = |m_I(l) − m_T(l)| / sqrt(var_I(l) + var_T(l)), each modality over its valid rows."""
    gi, gt = numpy_geometry(I), numpy_geometry(T)
    return np.abs(gi["mean"] - gt["mean"]) / np.sqrt(gi["var"] + gt["var"])


def check_against_numpy(res, I, T, rtol=1e-9):
    np.testing.assert_allclose(np.array(res["separability"]["values"], float), numpy_separability(I, T), rtol=rtol)
    for mod, V in (("image", I), ("text", T)):
        r, g = res[mod], numpy_geometry(V)
        valid = g["valid"]
        assert r["n"] == valid.sum() and r["invalid"] == (~valid).sum()
        np.testing.assert_allclose(r["offset_ratio"], g["offset_ratio"], rtol=rtol)
        for k, want in (("mu", g["mu"]), ("var", g["shell_var"]), ("sqrt_trace", g["sqrt_trace"])):
            np.testing.assert_allclose(r["thin_shell"][k], want, rtol=1e-7)
        np.testing.assert_allclose(np.array(r["off_diagonal_dominance"]["values"], float), g["odd"], rtol=1e-7)
        c = g["conformity"]
        s = r["conformity"]["summary"]
        np.testing.assert_allclose([s["mean"], s["std"], s["min"], s["median"], s["max"]],
                                   [c.mean(), c.std(), c.min(), np.median(c), c.max()], rtol=1e-9, atol=1e-12)
        assert sum(r["conformity"]["histogram"]["counts"]) == len(c)
        # the thin-shell identity μ² + var = tr C
        ts = r["thin_shell"]
        np.testing.assert_allclose(ts["mu"] ** 2 + ts["var"], ts["sqrt_trace"] ** 2, rtol=1e-9)


@pytest.mark.parametrize("size", [500, 64])
def test_streamed_geometry_equals_numpy(size):
    I, T = synthetic()
    res = compute_geometry(chunks(I, T, size))
    check_against_numpy(res, I, T)
    sep = numpy_separability(I, T)
    top = [t["feature"] for t in res["separability"]["top"]]
    assert top == list(np.argsort(-sep, kind="stable")[:10])
    assert res["separator"]["features"] == top[:2]
    assert res["separator"]["accuracy"] > 0.95


def test_logistic_separator():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(300, 2)) + [4.0, 0.0]
    B = rng.normal(size=(200, 2)) - [4.0, 0.0]
    s = logistic_separator(A, B)
    assert s["separates"] and s["accuracy"] == 1.0 and s == logistic_separator(A, B)  # deterministic
    # the reported line in raw units gives the reported accuracy
    pred = lambda X: X @ np.array(s["coef"]) + s["intercept"] > 0  # noqa: E731
    assert pred(A).all() and not pred(B).any()
    A2, B2 = rng.normal(size=(400, 2)) + [0.5, 0.0], rng.normal(size=(400, 2)) - [0.5, 0.0]
    s2 = logistic_separator(A2, B2)
    acc = (pred2 := (lambda X: X @ np.array(s2["coef"]) + s2["intercept"] > 0))(A2).sum() + (~pred2(B2)).sum()
    assert not s2["separates"] and 0.6 < s2["accuracy"] < 0.85
    assert s2["accuracy"] == pytest.approx(acc / 800)
    # the Bayes boundary of two unit Gaussians at ±0.5 is x = 0: logistic regression finds about it
    assert abs(s2["intercept"] / s2["coef"][0]) < 0.2 and abs(s2["coef"][1]) < 0.3 * abs(s2["coef"][0])


@pytest.mark.browser
def test_report_on_demo_store(demo_store, tmp_path):
    out = tmp_path / "geo"
    res = geometry_report(demo_store, output=out)
    data = json.loads((out / "report.json").read_text())
    st = Store.open(demo_store)
    tbl = read_embeddings(st, st.model())
    I = to_numpy(tbl.column("image_embedding")).astype(np.float64)
    T = to_numpy(tbl.column("text_embedding")).astype(np.float64)
    assert data["rows"] == len(I) == 300 and data["dim"] == I.shape[1]
    check_against_numpy(data, I, T, rtol=1e-8)
    assert data["separator"]["features"] == res.separator.features
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 4
    assert {p.split("/")[-1] for p in res.paths.plots} == {
        "thin_shell.png", "separability.png", "odd_conformity.png", "separator.png"}
    for p in res.paths.plots:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert f"{data['image']['offset_ratio']:.4g}" in page
    # a seeded sample
    small = geometry_report(demo_store, output=tmp_path / "geo-sample", sample=100, seed=1)
    assert small.sample == 100 and small.image.n + small.image.invalid == 100
    # in the browser: the four plots decode; a screenshot is saved
    assert image_check(out / "report.html") == {"decoded": 4, "total": 4, "pending": 0}
    screenshot(out / "report.html", tmp_path / "report.png", size="1100,2400")


def test_vslerp_sql(demo_store):
    con = queries.connect(demo_store)
    rows = con.sql("""
        WITH e AS (SELECT *, row_number() OVER (ORDER BY id) AS rn FROM embeddings)
        SELECT a.image_embedding, b.image_embedding, a.text_embedding, b.text_embedding, a.rn / 40.0 AS th,
               vslerp(a.image_embedding, b.image_embedding, a.rn / 40.0, 0.7) AS vi,
               vslerp(a.text_embedding, b.text_embedding, 0.25, 1.0) AS vt,
               vslerp(a.image_embedding, b.image_embedding, 0.5, 1.0, NULL, 'text') AS vx,
               typeof(vslerp(a.image_embedding, b.image_embedding, 0.5, 1.0)) AS ty,
               vslerp(a.image_embedding, NULL, 0.5, 1.0) AS vnull,
               vslerp(a.image_embedding, b.image_embedding, 0.0, 1.0) AS v0,
               vslerp(a.image_embedding, b.image_embedding, 1.0, 1.0, NULL) AS v1
        FROM e a JOIN e b ON b.rn = a.rn + 1 WHERE a.rn <= 40 ORDER BY a.rn""").fetchall()
    st = Store.open(demo_store)
    state = saved_stats(st, st.model())
    m_i, m_t = state.moments[("image", "raw")].mean, state.moments[("text", "raw")].mean
    d = st.model().dim

    def vslerp(a, b, theta, alpha, m):
        """SLERP(a − αm, b − αm, θ) + αm (the rows here are far from parallel: the plain formula)."""
        p, q = a - alpha * m, b - alpha * m
        omega = np.arccos(p @ q / np.sqrt((p @ p) * (q @ q)))
        return (np.sin((1 - theta) * omega) * p + np.sin(theta * omega) * q) / np.sin(omega) + alpha * m
    for ai, bi, at, bt, th, vi, vt, vx, ty, vnull, v0, v1 in rows:
        ai, bi, at, bt = (np.array(v, dtype=np.float64) for v in (ai, bi, at, bt))
        assert ty == f"FLOAT[{d}]" and vnull is None
        np.testing.assert_allclose(vi, vslerp(ai, bi, th, 0.7, m_i), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(vt, vslerp(at, bt, 0.25, 1.0, m_t), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(vx, vslerp(ai, bi, 0.5, 1.0, m_t), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v0, ai, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v1, bi, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="modality must be"):
        con.sql("SELECT vslerp(image_embedding, image_embedding, 0.5, 1.0, NULL, 'audio') FROM embeddings "
                "LIMIT 1").fetchall()
    con.close()


def test_geometry_without_valid_rows():
    from clipsql.errors import StatsError
    Z = np.zeros((5, 4))
    with pytest.raises(StatsError):
        compute_geometry(lambda: [(Z, Z)])


def test_degenerate_single_row_is_json_safe():
    from clipsql.queries.present.geometry import _finite
    rng = np.random.default_rng(0)
    res = compute_geometry(lambda: [(rng.normal(size=(1, 5)), rng.normal(size=(1, 5)))])
    res.pop("_arrays")
    text = json.dumps(_finite(res), allow_nan=False)
    assert json.loads(text)["image"]["offset_ratio"] is None  # σ = 0
