"""`clipsql plot`: the fitted line and R² against numpy/DuckDB, PNG output, errors, lazy matplotlib."""
from __future__ import annotations

import subprocess
import sys

import duckdb
import numpy as np
import pytest
from PIL import Image

from clipsql import queries
from clipsql.queries.present.plots import linear_fit, plot_hist, plot_scatter
from clipsql.errors import QueryError

from _small_demo import small_demo_store


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    return small_demo_store(tmp_path_factory)


def test_linear_fit_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200) * 3 + 10
    y = 0.7 * x - 2 + rng.normal(size=200) * 0.5
    f = linear_fit(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    assert f["slope"] == pytest.approx(slope, rel=1e-10) and f["intercept"] == pytest.approx(intercept, rel=1e-10)
    assert f["r2"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, rel=1e-12)
    assert np.isnan(linear_fit(np.ones(5), np.arange(5.0))["r2"])


def test_scatter_and_hist_on_demo_store(demo_store, tmp_path):
    res = plot_scatter(demo_store, "image_info_gain", "image_info_gain_approx", output=tmp_path / "s.png")
    con = queries.connect(demo_store)
    r2, slope, n = con.sql("SELECT regr_r2(image_info_gain_approx, image_info_gain), "
                           "regr_slope(image_info_gain_approx, image_info_gain), count(*) FROM scores").fetchall()[0]
    con.close()
    assert res.n == n == 300 and res.dropped == 0
    assert res.r2 == pytest.approx(r2, rel=1e-9) and res.slope == pytest.approx(slope, rel=1e-9)
    assert res.r2 > 0.95
    with Image.open(tmp_path / "s.png") as im:
        assert im.format == "PNG" and im.size == (650, 550)
    h = plot_hist(demo_store, "text_info_gain", output=tmp_path / "h.png", bins=20,
                  sql="SELECT text_info_gain FROM scores JOIN samples USING (id) WHERE kind = 'normal'")
    assert 0 < h.n < 300 and h.min <= h.mean <= h.max
    with Image.open(tmp_path / "h.png") as im:
        assert im.format == "PNG"


def test_nulls_dropped_and_errors(tmp_path):
    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT i::DOUBLE AS x, CASE WHEN i % 10 = 0 THEN NULL ELSE 2 * i + 1 END AS y, "
                "'s' || i AS s FROM range(50) r(i)")
    res = plot_scatter(None, "x", "y", sql="SELECT * FROM t", output=tmp_path / "a.png", con=con)
    assert res.dropped == 5 and res.n == 45
    assert (res.slope, res.intercept, res.r2) == pytest.approx((2.0, 1.0, 1.0))
    with pytest.raises(QueryError, match="not in the result"):
        plot_hist(None, "nope", sql="SELECT * FROM t", output=tmp_path / "b.png", con=con)
    with pytest.raises(QueryError, match="not numeric"):
        plot_hist(None, "s", sql="SELECT * FROM t", output=tmp_path / "b.png", con=con)
    with pytest.raises(QueryError, match="no finite values"):
        plot_hist(None, "y", sql="SELECT y FROM t WHERE y IS NULL", output=tmp_path / "b.png", con=con)
    with pytest.raises(QueryError):
        plot_hist(None, "x", sql="SELECT broken FROM", output=tmp_path / "b.png", con=con)


def test_matplotlib_is_imported_lazily():
    code = ("import sys, clipsql.cli, clipsql.queries.present.plots, clipsql.queries.present.gallery, clipsql.queries.present.geometry; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported at import time'")
    subprocess.run([sys.executable, "-c", code], check=True)
