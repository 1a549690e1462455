"""`clipsql plot`: PNG histograms and scatter plots of SQL results (matplotlib, Agg).

    plot_hist("store", "image_info_gain", output="hist.png")
    plot_scatter("store", "image_info_gain", "image_info_gain_approx", output="ig.png")

Without ``sql`` the columns are read from the ``scores`` view (``SELECT x[, y] FROM
scores``); with ``sql`` the result must contain the named columns. Rows where a
plotted column is NULL or non-finite are dropped (and counted). The scatter plot
draws the least-squares line ``y = slope·x + intercept`` and puts it and R² (the
squared Pearson correlation, what DuckDB's ``regr_r2`` returns) in the title.

matplotlib is imported lazily and only through ``Figure`` + the Agg canvas (no
pyplot, no global state), so importing this module — and ``clipsql --help`` — stays
instant and works without a display.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clipsql.errors import QueryError
from clipsql.lazy import duckdb, matplotlib, matplotlib_agg, matplotlib_figure
from clipsql.queries.sql.db import connect, open_store, quote_ident, quote_literal
from clipsql.queries.sql.functions import udf_error


def new_figure(width: float = 7.0, height: float = 4.5) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot)."""
    matplotlib.use("Agg")
    fig = matplotlib_figure.Figure(figsize=(width, height), dpi=100, layout="constrained")
    matplotlib_agg.FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, output: str | os.PathLike) -> str:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return str(out.resolve())


def fetch_columns(store: Any, columns: list[str], sql: str | None = None, con: Any = None) -> dict[str, np.ndarray]:
    """The named columns of ``sql`` (default: the ``scores`` view's rows of the default model, so
    two models' scores never mix in one plot) as float64 arrays (NULL → NaN)."""
    own = con is None
    if sql is None:
        st = open_store(store)
        where = f" WHERE model = {quote_literal(st.model().model_id)}" if st.list_models() else ""
    con = connect(store) if own else con
    try:
        query = sql.strip().rstrip(";") if sql else \
            f"SELECT {', '.join(quote_ident(c) for c in columns)} FROM scores{where}"
        try:
            rel = con.sql(query)
            if rel is None:
                raise QueryError("`sql` must be a query returning rows", param="sql")
            tbl = rel.arrow()
            if hasattr(tbl, "read_all"):
                tbl = tbl.read_all()
        except duckdb.Error as e:
            raise udf_error(e, con) or QueryError(str(e)) from None
    finally:
        if own:
            con.close()
    out = {}
    for c in columns:
        if c not in tbl.column_names:
            raise QueryError(f"column {c!r} is not in the result (columns: {', '.join(tbl.column_names)})")
        col = tbl.column(c)
        try:
            out[c] = col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        except Exception:  # noqa: BLE001 - arrow raises several types for a non-numeric cast
            raise QueryError(f"column {c!r} is not numeric ({col.type}); plot a numeric column") from None
    return out


def linear_fit(x: np.ndarray, y: np.ndarray) -> dict:
    """Least squares ``y = slope·x + intercept`` and ``R² = corr(x, y)²`` (float64, centred sums)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    if n < 2:
        return {"n": n, "slope": float("nan"), "intercept": float("nan"), "r2": float("nan")}
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy, sxy = dx @ dx, dy @ dy, dx @ dy
    slope = sxy / sxx if sxx > 0 else float("nan")
    r2 = sxy * sxy / (sxx * syy) if sxx > 0 and syy > 0 else float("nan")
    return {"n": n, "slope": float(slope), "intercept": float(y.mean() - slope * x.mean()), "r2": float(r2)}


@dataclass(frozen=True)
class HistResult:
    """A histogram written to `path`: `n` finite values (`dropped` NULL/NaN left out) and their
    mean, standard deviation, minimum and maximum."""
    path: str
    n: int
    dropped: int
    mean: float
    std: float
    min: float
    max: float


@dataclass(frozen=True)
class ScatterResult:
    """A scatter written to `path`: `n` rows with both values finite (`dropped` left out) and the
    least-squares line y = slope·x + intercept with its R²."""
    path: str
    dropped: int
    n: int
    slope: float
    intercept: float
    r2: float


def plot_hist(store: Any, column: str, *, sql: str | None = None, output: str | os.PathLike = "hist.png",
              bins: int = 50, con: Any = None) -> HistResult:
    """Histogram of one column; returns n, dropped, mean, std, min, max and the output path."""
    v = fetch_columns(store, [column], sql, con)[column]
    ok = np.isfinite(v)
    v = v[ok]
    if len(v) == 0:
        raise QueryError(f"no finite values of {column!r} to plot (NULL scores? run `clipsql stats fit`)")
    fig = new_figure()
    ax = fig.add_subplot()
    ax.hist(v, bins=max(1, int(bins)), color="#4477aa", edgecolor="white", linewidth=0.3)
    ax.axvline(v.mean(), color="#cc3311", lw=1, ls="--", label=f"mean {v.mean():.4g}")
    ax.set_xlabel(column)
    ax.set_ylabel("rows")
    ax.set_title(f"{column}: n={len(v)}, mean={v.mean():.4g}, std={v.std():.4g}"
                 + (f" ({int((~ok).sum())} NULL dropped)" if (~ok).any() else ""))
    ax.legend(loc="best", fontsize=8)
    path = save_figure(fig, output)
    return HistResult(path=path, n=int(len(v)), dropped=int((~ok).sum()), mean=float(v.mean()),
                      std=float(v.std()), min=float(v.min()), max=float(v.max()))


def plot_scatter(store: Any, x: str, y: str, *, sql: str | None = None, output: str | os.PathLike = "scatter.png",
                 con: Any = None) -> ScatterResult:
    """Scatter of y against x with the least-squares line; R² and the line in the title."""
    data = fetch_columns(store, [x, y], sql, con)
    xs, ys = data[x], data[y]
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    if len(xs) == 0:
        raise QueryError(f"no rows with finite {x!r} and {y!r} to plot")
    fit = linear_fit(xs, ys)
    fig = new_figure(6.5, 5.5)
    ax = fig.add_subplot()
    size = 6 if len(xs) < 5000 else 2
    ax.scatter(xs, ys, s=size, alpha=0.6 if len(xs) < 5000 else 0.3, color="#4477aa", linewidths=0,
               rasterized=len(xs) > 20000)
    if np.isfinite(fit["slope"]):
        lo, hi = float(xs.min()), float(xs.max())
        ax.plot([lo, hi], [fit["slope"] * lo + fit["intercept"], fit["slope"] * hi + fit["intercept"]],
                color="#cc3311", lw=1.2, label=f"y = {fit['slope']:.4g}·x {fit['intercept']:+.3g}")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{y} vs {x}: R² = {fit['r2']:.4f}, slope {fit['slope']:.4g}, n={fit['n']}"
                 + (f" ({int((~ok).sum())} NULL dropped)" if (~ok).any() else ""), fontsize=10)
    path = save_figure(fig, output)
    return ScatterResult(path=path, dropped=int((~ok).sum()), **fit)
