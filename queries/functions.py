"""Every SQL function clipsql adds to DuckDB, registered in one place: `register`.

Score functions are vectorized Arrow UDFs: DuckDB hands a batch (≤ 2048 rows),
the batch becomes one (n, d) float64 matrix and one numpy call scores it.
Optional arguments (the model) come from overloaded SQL macros over fixed-arity
UDFs. NaN (zero, NULL or non-finite vectors) comes back as NULL. BLAS is pinned
to one thread inside UDF work; DuckDB's threads parallelize across batches.

| function | definition (SCIENCE.md) |
|---|---|
| image_info_gain(emb [, model]) / text_info_gain | §1 KL(π(x) ‖ p̄) |
| image_info_gain_reverse / text_info_gain_reverse | §1 KL(p̄ ‖ π(x)) |
| image_info_gain_approx / text_info_gain_approx | §2 ½a²(x̂−ū)ᵀG(x̂−ū) |
| centered_norm(emb, modality [, model]) | §2 a²‖x̂−ū‖² |
| raw_norm(emb) | §2 ‖x‖² |
| image_conformity / text_conformity (emb [, model]) | §3 exact, over every stored vector |
| conformity_estimate(emb, modality [, model]) | §3 cos(x, raw mean) |
| clip_score(img, txt) | §4 cos(x, y) (DuckDB's array_cosine_similarity) |
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from store.errors import DimensionMismatch, QueryError
from store.store import ModelRecord, Store

from . import scores


class ScoreContext:
    """Per-connection cache of models, fits and running statistics (loaded on first use)."""

    def __init__(self, st: Store):
        self.st = st
        self._models: dict[str | None, ModelRecord] = {}
        self._fits: dict[str, scores.Fit] = {}
        self._running: dict[str, Any] = {}

    def model(self, name: str | None) -> ModelRecord:
        if name not in self._models:
            self._models[name] = self.st.model(name)
        return self._models[name]

    def fit(self, rec: ModelRecord) -> scores.Fit:
        if rec.model_id not in self._fits:
            from .fit import load_fit
            self._fits[rec.model_id] = load_fit(self.st, rec)[0]
        return self._fits[rec.model_id]

    def running(self, rec: ModelRecord) -> Any:
        if rec.model_id not in self._running:
            self._running[rec.model_id] = self.st.stats(rec)
        return self._running[rec.model_id]


def _controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
        return ThreadpoolController()
    except Exception:  # noqa: BLE001 - pinning is an optimisation only
        return None


_CTL = None


def _one_blas_thread() -> Any:
    global _CTL
    if _CTL is None:
        _CTL = _controller() or False
    if _CTL:
        return _CTL.limit(limits=1, user_api="blas")
    import contextlib
    return contextlib.nullcontext()


def matrix(arr: Any, dim: int, what: str = "embedding") -> np.ndarray:
    """Arrow list array → (n, dim) float64; NULL rows become NaN rows; a wrong length raises."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.empty((0, dim))
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    valid = ~np.isnan(lengths.astype(np.float64)) if arr.null_count else np.ones(n, bool)
    bad = valid & (lengths != dim)
    if bad.any():
        got = int(lengths[np.flatnonzero(bad)[0]])
        raise DimensionMismatch(f"{what} has {got} dimensions but the model has {dim}")
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    if valid.all():
        return flat.reshape(n, dim)
    out = np.full((n, dim), np.nan)
    out[valid] = flat.reshape(-1, dim)
    return out


def _groups(arr: Any, n: int) -> list[tuple[Any, np.ndarray]]:
    """Split row indices by the value of a (usually constant) argument column."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    values = arr.to_pylist()
    first = values[0] if values else None
    if all(v == first for v in values):
        return [(first, np.arange(n))]
    out: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        out.setdefault(v, []).append(i)
    return [(k, np.array(v)) for k, v in out.items()]


def _result(values: np.ndarray) -> pa.Array:
    values = np.asarray(values, dtype=np.float64)
    return pa.array(values, type=pa.float64(), mask=~np.isfinite(values))


def _scored(ctx: ScoreContext, fn: Callable[[np.ndarray, ModelRecord, Any], np.ndarray]) -> Callable:
    """Wrap `fn(X, model, modality)` into an Arrow UDF (emb, modality, model)."""
    def udf(emb: Any, modality: Any, model: Any) -> pa.Array:
        n = len(emb)
        out = np.full(n, np.nan)
        with _one_blas_thread():
            for (mod, mname), idx in _pair_groups(modality, model, n):
                if mod not in (None, "image", "text"):
                    raise QueryError(f"modality must be 'image' or 'text', got {mod!r}")
                rec = ctx.model(mname)
                col = emb if len(idx) == n else _take(emb, idx)
                out[idx] = fn(matrix(col, rec.dim, f"{mod or ''} embedding".strip()), rec, mod)
        return _result(out)
    return udf


def _take(arr: Any, idx: np.ndarray) -> Any:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.take(pa.array(idx))


def _pair_groups(a: Any, b: Any, n: int) -> list[tuple[tuple[Any, Any], np.ndarray]]:
    ga = _groups(a, n)
    gb = _groups(b, n)
    if len(ga) == 1 and len(gb) == 1:
        return [((ga[0][0], gb[0][0]), np.arange(n))]
    va = a.to_pylist() if not isinstance(a, pa.ChunkedArray) else a.combine_chunks().to_pylist()
    vb = b.to_pylist() if not isinstance(b, pa.ChunkedArray) else b.combine_chunks().to_pylist()
    out: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(va, vb)):
        out.setdefault(key, []).append(i)
    return [(k, np.array(v)) for k, v in out.items()]


def register(con: Any, st: Store) -> ScoreContext:
    """Register every clipsql SQL function on `con` (one place, one call)."""
    ctx = ScoreContext(st)
    F, V, B = "FLOAT[]", "VARCHAR", "BOOLEAN"

    def ig(reverse: bool) -> Callable:
        return lambda X, rec, mod: scores.info_gain(X, ctx.fit(rec), mod, reverse=reverse)

    udfs: dict[str, tuple[Callable, list[str]]] = {
        "_clipsql_info_gain": (_scored(ctx, ig(False)), [F, V, V]),
        "_clipsql_info_gain_reverse": (_scored(ctx, ig(True)), [F, V, V]),
        "_clipsql_info_gain_approx": (_scored(ctx, lambda X, rec, mod: scores.info_gain_approx(
            X, ctx.fit(rec), mod)), [F, V, V]),
        "_clipsql_centered_norm": (_scored(ctx, lambda X, rec, mod: scores.centered_norm(
            X, ctx.fit(rec), mod)), [F, V, V]),
        "_clipsql_conformity": (_scored(ctx, lambda X, rec, mod: _conformity(ctx, X, rec, mod)), [F, V, V]),
        "_clipsql_conformity_estimate": (_scored(ctx, lambda X, rec, mod: scores.conformity_estimate(
            X, ctx.running(rec).moments[(mod, "raw")].mean)), [F, V, V]),
    }
    for name, (fn, params) in udfs.items():
        con.create_function(name, fn, params, "DOUBLE", type="arrow", null_handling="special",
                            side_effects=False)
    del B

    macros = {
        "image_info_gain": ("_clipsql_info_gain", "'image'"),
        "text_info_gain": ("_clipsql_info_gain", "'text'"),
        "image_info_gain_reverse": ("_clipsql_info_gain_reverse", "'image'"),
        "text_info_gain_reverse": ("_clipsql_info_gain_reverse", "'text'"),
        "image_info_gain_approx": ("_clipsql_info_gain_approx", "'image'"),
        "text_info_gain_approx": ("_clipsql_info_gain_approx", "'text'"),
        "image_conformity": ("_clipsql_conformity", "'image'"),
        "text_conformity": ("_clipsql_conformity", "'text'"),
    }
    for name, (udf, modality) in macros.items():
        con.execute(f"CREATE OR REPLACE MACRO {name}(emb) AS {udf}(emb, {modality}, NULL), "
                    f"(emb, model) AS {udf}(emb, {modality}, model)")
    for name, udf in (("centered_norm", "_clipsql_centered_norm"),
                      ("conformity_estimate", "_clipsql_conformity_estimate")):
        con.execute(f"CREATE OR REPLACE MACRO {name}(emb, modality) AS {udf}(emb, modality, NULL), "
                    f"(emb, modality, model) AS {udf}(emb, modality, model)")
    # native DuckDB array functions where they already compute the thing; non-finite → NULL
    con.execute("CREATE OR REPLACE MACRO _clipsql_finite(x) AS CASE WHEN isfinite(x) THEN x END")
    con.execute("CREATE OR REPLACE MACRO clip_score(img, txt) AS "
                "_clipsql_finite(list_cosine_similarity(img::FLOAT[], txt::FLOAT[]))")
    con.execute("CREATE OR REPLACE MACRO raw_norm(emb) AS "
                "CASE WHEN list_dot_product(emb::FLOAT[], emb::FLOAT[]) > 0 THEN "
                "_clipsql_finite(list_dot_product(emb::FLOAT[], emb::FLOAT[])::DOUBLE) END")
    return ctx


def _conformity(ctx: ScoreContext, X: np.ndarray, rec: ModelRecord, modality: str) -> np.ndarray:
    m = ctx.running(rec).moments[(modality, "normalized")]
    return scores.conformity(X, m.sum, m.n, member=True)


SCORE_COLUMNS = ("image_info_gain", "text_info_gain", "image_info_gain_reverse", "text_info_gain_reverse",
                 "image_info_gain_approx", "text_info_gain_approx", "image_centered_norm", "text_centered_norm",
                 "image_raw_norm", "text_raw_norm", "image_conformity", "text_conformity",
                 "image_conformity_estimate", "text_conformity_estimate", "clip_score")


def score_expressions(model_literal: str) -> dict[str, str]:
    """SQL expression of each `scores` column for one model (over e.image_embedding/e.text_embedding)."""
    i, t, m = "e.image_embedding", "e.text_embedding", model_literal
    return {
        "image_info_gain": f"image_info_gain({i}, {m})", "text_info_gain": f"text_info_gain({t}, {m})",
        "image_info_gain_reverse": f"image_info_gain_reverse({i}, {m})",
        "text_info_gain_reverse": f"text_info_gain_reverse({t}, {m})",
        "image_info_gain_approx": f"image_info_gain_approx({i}, {m})",
        "text_info_gain_approx": f"text_info_gain_approx({t}, {m})",
        "image_centered_norm": f"centered_norm({i}, 'image', {m})",
        "text_centered_norm": f"centered_norm({t}, 'text', {m})",
        "image_raw_norm": f"raw_norm({i})", "text_raw_norm": f"raw_norm({t})",
        "image_conformity": f"image_conformity({i}, {m})", "text_conformity": f"text_conformity({t}, {m})",
        "image_conformity_estimate": f"conformity_estimate({i}, 'image', {m})",
        "text_conformity_estimate": f"conformity_estimate({t}, 'text', {m})",
        "clip_score": f"clip_score({i}, {t})",
    }
