"""`clipsql geometry`: the raw-embedding geometry report (SCIENCE.md §8, double-ellipsoid paper).

    report = geometry_report("store", output="geometry-report")   # report.json + report.html + PNGs

Per modality, on the RAW vectors of one model (invalid — zero or non-finite — rows
left out and counted), with m the mean, C the covariance (ddof=0) and σ = sqrt(diag C):

* offset ratio ‖m‖/‖σ‖ (paper: 0.94 image, 1.03 text on MS-COCO ViT-B/32);
* thin shell: μ = E‖x − m‖, var(‖x − m‖) and sqrt(tr C) (= sqrt(μ² + var));
* off-diagonal dominance ODD(l) = Σ_{k≠l} |C_lk| / C_ll;
* exact conformity of every vector within all valid vectors of its modality (§3);
* per feature Sep(l) = |m_I(l) − m_T(l)| / sqrt(var_I(l) + var_T(l)), and the top features;
* a linear separator on the two most separable features: logistic regression (intercept
  + the two features standardized, a tiny L2 penalty 1e-6 so separable data converge),
  fitted by Newton's method (IRLS) in numpy; its TRAIN accuracy over all valid vectors
  (image = 1, text = 0) is reported, and ``separates`` is ``accuracy == 1``.

The data are streamed twice in batches (pass 1: float64 shifted moments, exact over all
rows; pass 2: per-row ‖x − m‖, conformity and the two separator features), so memory is
O(d² + rows) scalars, never the (rows × d) matrix. ``sample`` limits the report to a
seeded random subset of rows. Definitions match queries.kernels.scores.geometry (tested).
"""
from __future__ import annotations

import base64
import html
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from clipsql.errors import StatsError
from clipsql.store.stats import RunningMoments
from clipsql.store.store import Store, to_numpy

from clipsql.kernels import scores

MODS = ("image", "text")
PAPER = {"offset_ratio": {"image": 0.94, "text": 1.03}}
Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


# --------------------------------------------------------------------------- math
def _valid(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(valid raw rows as float64, their normalized rows)."""
    X = np.asarray(X, dtype=np.float64)
    Xh, ok = scores.normalize(X)
    return X[ok], Xh[ok]


def logistic_separator(A: np.ndarray, B: np.ndarray, l2: float = 1e-6, iters: int = 100) -> dict:
    """Logistic regression of label 1 (rows of A) vs 0 (rows of B) on standardized features
    plus an intercept, by Newton steps; returns weights, the decision line in raw feature
    units (w·f + c = 0) and the train accuracy (``A·w + c > 0`` predicts 1)."""
    F = np.vstack([A, B]).astype(np.float64)
    y = np.concatenate([np.ones(len(A)), np.zeros(len(B))])
    mu, sd = F.mean(axis=0), F.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    Z = np.hstack([np.ones((len(F), 1)), (F - mu) / sd])
    w = np.zeros(Z.shape[1])
    reg = l2 * np.eye(len(w))
    reg[0, 0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(Z @ w, -500, 500)))
        g = Z.T @ (p - y) + reg @ w
        H = (Z * (p * (1 - p))[:, None]).T @ Z + reg + 1e-12 * np.eye(len(w))
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-9 * max(1.0, np.abs(w).max()):
            break
    pred = Z @ w > 0
    acc = float((pred == (y > 0.5)).mean())
    coef = w[1:] / sd
    return {"method": "logistic regression (Newton/IRLS, standardized features + intercept, L2 1e-6), "
                      "train accuracy",
            "weights_standardized": w.tolist(), "coef": coef.tolist(),
            "intercept": float(w[0] - coef @ mu), "accuracy": acc, "separates": acc == 1.0,
            "accuracy_image": float(pred[: len(A)].mean()) if len(A) else None,
            "accuracy_text": float(1 - pred[len(A):].mean()) if len(B) else None}


def _summary(v: np.ndarray) -> dict:
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"n": 0}
    q = np.quantile(v, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std()),
            **{k: float(x) for k, x in zip(("min", "p05", "p25", "median", "p75", "p95", "max"), q)}}


def _hist(v: np.ndarray, bins: int = 50) -> dict:
    v = v[np.isfinite(v)]
    counts, edges = np.histogram(v, bins=bins) if len(v) else (np.zeros(0), np.zeros(0))
    return {"counts": counts.astype(int).tolist(), "edges": edges.tolist()}


def compute_geometry(batches: Batches, top: int = 10) -> dict:
    """All §8 figures from ``batches()`` — an iterable of (image rows, text rows) raw arrays,
    called twice. Returns a dict with JSON-able scalars/lists and, under ``"_arrays"``,
    the per-row arrays the plots need."""
    mom: dict[str, RunningMoments] = {}
    nsum: dict[str, np.ndarray] = {}
    invalid = {m: 0 for m in MODS}
    for pair in batches():
        for mod, X in zip(MODS, pair):
            X = np.asarray(X)
            if mod not in mom:
                mom[mod], nsum[mod] = RunningMoments(X.shape[1]), np.zeros(X.shape[1])
            V, Vh = _valid(X)
            invalid[mod] += len(X) - len(V)
            mom[mod].update(V)
            nsum[mod] += Vh.sum(axis=0)
    if not mom or any(mom[m].n == 0 for m in MODS):
        raise StatsError("no valid image and text vectors to describe: ingest data first")
    out: dict[str, Any] = {"dim": int(mom["image"].dim)}
    mean = {m: mom[m].mean for m in MODS}
    cov = {m: mom[m].cov for m in MODS}
    var = {m: np.clip(np.diag(cov[m]), 0.0, None) for m in MODS}
    with np.errstate(invalid="ignore", divide="ignore"):
        sep = np.abs(mean["image"] - mean["text"]) / np.sqrt(var["image"] + var["text"])
    order = np.argsort(-np.where(np.isfinite(sep), sep, -np.inf), kind="stable")
    top_idx = order[: max(2, int(top))]
    f1, f2 = int(order[0]), int(order[1])
    out["separability"] = {
        "values": [None if not np.isfinite(s) else float(s) for s in sep], "summary": _summary(sep),
        "top": [{"feature": int(l), "sep": float(sep[l]), "mean_image": float(mean["image"][l]),
                 "mean_text": float(mean["text"][l]), "std_image": float(np.sqrt(var["image"][l])),
                 "std_text": float(np.sqrt(var["text"][l]))} for l in top_idx]}
    # pass 2: per-row distances to the mean, conformity, the two separator features
    r = {m: [] for m in MODS}
    conf = {m: [] for m in MODS}
    feat = {m: [] for m in MODS}
    for pair in batches():
        for mod, X in zip(MODS, pair):
            V, Vh = _valid(X)
            D = V - mean[mod]
            r[mod].append(np.sqrt(np.einsum("ij,ij->i", D, D)))
            n = mom[mod].n
            conf[mod].append((n * (Vh @ (nsum[mod] / n)) - 1.0) / (n - 1.0) if n >= 2 else np.full(len(V), np.nan))
            feat[mod].append(V[:, [f1, f2]])
    arrays: dict[str, Any] = {"separability": sep, "features": (f1, f2)}
    for mod in MODS:
        rr, cc = np.concatenate(r[mod]), np.concatenate(conf[mod])
        C = np.abs(cov[mod])
        diag = np.diag(C)
        with np.errstate(invalid="ignore", divide="ignore"):
            odd = (C.sum(axis=1) - diag) / diag
        sigma = np.sqrt(var[mod])
        out[mod] = {
            "n": int(mom[mod].n), "invalid": int(invalid[mod]),
            "mean_norm": float(np.linalg.norm(mean[mod])), "sigma_norm": float(np.linalg.norm(sigma)),
            "offset_ratio": float(np.linalg.norm(mean[mod]) / np.linalg.norm(sigma)) if sigma.any() else None,
            "thin_shell": {"mu": float(rr.mean()), "var": float(rr.var()),
                           "sqrt_trace": float(np.sqrt(max(np.trace(cov[mod]), 0.0))),
                           "relative_std": float(rr.std() / rr.mean()) if rr.mean() > 0 else None,
                           "histogram": _hist(rr)},
            "off_diagonal_dominance": {"values": [None if not np.isfinite(v) else float(v) for v in odd],
                                       "summary": _summary(odd), "histogram": _hist(odd)},
            "conformity": {"summary": _summary(cc), "histogram": _hist(cc)},
        }
        arrays[mod] = {"r": rr, "conformity": cc, "odd": odd, "features": np.concatenate(feat[mod])}
    sep_fit = logistic_separator(arrays["image"]["features"], arrays["text"]["features"])
    out["separator"] = {"features": [f1, f2], **sep_fit}
    out["_arrays"] = arrays
    return out


# --------------------------------------------------------------------------- vslerp (SQL)
def vslerp_udf(ctx: Any) -> Callable:
    """Arrow UDF behind ``vslerp(a, b, theta, alpha [, model [, modality]])`` (registered in
    queries.sql.functions.register): ``SLERP(a − αm, b − αm, θ) + αm`` by ``scores.vslerp``.

    ``m`` is the modality centre: the RAW mean of that modality's stored vectors of the model
    (its running statistics, so it tracks the store). The 6th argument names the modality
    ('image' or 'text'). When it is NULL (the 4- and 5-argument forms) each row uses the
    modality in whose ellipsoid the midpoint (a + b)/2 is more likely: the larger Gaussian
    log-likelihood under N(m, C) of the running raw mean and covariance (ridge 1e-6·tr C/d) —
    the double-ellipsoid picture. Nearest mean alone is not enough: the modality gap can be
    small next to the spread (the demo model classifies ~80% of vectors right by nearest mean,
    100% by likelihood). Two images thus pick the image centre and two captions the text
    centre; pass the modality to be explicit, e.g. across modalities. NULL or non-finite
    a, b, θ or α give NULL. θ outside [0, 1] extrapolates along the arc.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from clipsql.errors import QueryError

    from clipsql.queries.sql.functions import pair_groups, take_rows, matrix

    def col(arr: Any) -> np.ndarray:
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        return pc.fill_null(arr.cast(pa.float64()), float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)

    cache: dict = {}

    def udf(a: Any, b: Any, theta: Any, alpha: Any, model: Any, modality: Any) -> Any:
        n = len(a)
        th, al = col(theta), col(alpha)
        rows: list[Any] = [None] * n
        for (mod, mname), idx in pair_groups(modality, model, n):
            if mod not in (None, "image", "text"):
                raise QueryError(f"vslerp modality must be 'image', 'text' or NULL, got {mod!r}")
            rec = ctx.model(mname)
            A = matrix(a if len(idx) == n else take_rows(a, idx), rec.dim, "vslerp a")
            B = matrix(b if len(idx) == n else take_rows(b, idx), rec.dim, "vslerp b")
            state = ctx.running(rec)
            centre = {m: state.moments[(m, "raw")].mean for m in MODS}
            if mod is None:
                ll = {m: _gaussian_loglik((A + B) / 2, *_ellipsoid(cache, rec, state, m)) for m in MODS}
                which = np.where(ll["image"] >= ll["text"], "image", "text")
            else:
                which = np.full(len(idx), mod)
            t, al_g = th[idx], al[idx]
            ok = np.isfinite(A).all(1) & np.isfinite(B).all(1) & np.isfinite(t) & np.isfinite(al_g)
            for m in MODS:
                if not np.isfinite(centre[m]).all():
                    continue
                for alpha_v in np.unique(al_g[ok & (which == m)]):
                    sel = np.flatnonzero(ok & (which == m) & (al_g == alpha_v))
                    res = scores.vslerp(A[sel], B[sel], t[sel, None], float(alpha_v), centre[m])
                    for j, row in zip(sel, res):
                        if np.isfinite(row).all():
                            rows[idx[j]] = row.astype(np.float32)
        return pa.array(rows, type=pa.list_(pa.float32()))
    return udf


def _ellipsoid(cache: dict, rec: Any, state: Any, modality: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, W = L⁻¹ with L Lᵀ = C + ridge, log det L) of one modality's running raw moments."""
    key = (rec.model_id, modality, state.covered_seq, state.n)
    if key not in cache:
        mom = state.moments[(modality, "raw")]
        C = mom.cov
        C = C + (1e-6 * max(float(np.trace(C)), 1e-300) / len(C)) * np.eye(len(C))
        L = np.linalg.cholesky(C)
        cache[key] = (mom.mean, np.linalg.inv(L), float(np.log(np.diag(L)).sum()))
    return cache[key]


def _gaussian_loglik(X: np.ndarray, mean: np.ndarray, W: np.ndarray, logdet_l: float) -> np.ndarray:
    """log N(x; mean, C) up to the constant shared by both modalities: −½‖W(x − m)‖² − log det L."""
    Z = (X - mean) @ W.T
    return -0.5 * np.einsum("ij,ij->i", Z, Z) - logdet_l


# --------------------------------------------------------------------------- store
def _store_batches(st: Store, rec: Any, sample: int | None, seed: int, batch_rows: int = 16384) -> tuple[Batches, int]:
    ds = st.embeddings_table(rec)
    total = ds.count_rows()
    cols = ["image_embedding", "text_embedding"]
    rows = None
    if sample is not None and sample < total:
        rows = np.sort(np.random.default_rng(seed).choice(total, size=int(sample), replace=False))

    def gen() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        if rows is None:
            for b in ds.to_batches(columns=cols, batch_size=batch_rows):
                if b.num_rows:
                    yield to_numpy(b.column(0)), to_numpy(b.column(1))
        else:
            for i in range(0, len(rows), batch_rows):
                t = ds.take(rows[i:i + batch_rows].tolist(), columns=cols)
                yield to_numpy(t.column(0)), to_numpy(t.column(1))
    return gen, total


def geometry_report(store: Any, model: str | None = None, output: str | os.PathLike = "geometry-report", *,
                    sample: int | None = None, seed: int = 0, top: int = 10) -> dict:
    """Compute the §8 report for one model and write ``report.json``, ``report.html`` and
    the PNG plots into ``output``; returns the JSON dict (plus ``paths``)."""
    from clipsql.queries.sql.db import open_store
    st = open_store(store)
    rec = st.model(model)
    t0 = time.perf_counter()
    gen, total = _store_batches(st, rec, sample, seed)
    if total == 0:
        raise StatsError(f"model {rec.model_id} has no rows yet: ingest data first")
    res = compute_geometry(gen, top=top)
    arrays = res.pop("_arrays")
    res = {"model": rec.model_id, "kind": rec.kind, "rows": total,
           "sample": None if sample is None or sample >= total else int(sample),
           "seed": seed, **res, "paper": PAPER, "seconds": round(time.perf_counter() - t0, 3)}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    pngs = _plots(res, arrays, out)
    res = _finite(res)
    (out / "report.json").write_text(json.dumps(res, indent=1, allow_nan=False))
    (out / "report.html").write_text(_html(res, pngs, out), encoding="utf-8")
    res["paths"] = {"json": str((out / "report.json").resolve()), "html": str((out / "report.html").resolve()),
                    "plots": [str((out / p).resolve()) for p in pngs.values()]}
    return res


def _finite(v: Any) -> Any:
    """JSON-safe: NaN/inf floats (e.g. σ = 0 with one row) become None."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    return v


# --------------------------------------------------------------------------- plots + html
COLORS = {"image": "#4477aa", "text": "#ee7733"}


def _plots(res: dict, arrays: dict, out: Path) -> dict[str, str]:
    from clipsql.queries.present.plots import new_figure, save_figure
    files: dict[str, str] = {}

    fig = new_figure(9, 3.6)
    for i, mod in enumerate(MODS):
        ax = fig.add_subplot(1, 2, i + 1)
        ts = res[mod]["thin_shell"]
        ax.hist(arrays[mod]["r"], bins=50, color=COLORS[mod], alpha=0.85)
        ax.axvline(ts["mu"], color="k", lw=1, label=f"μ = E‖x−m‖ = {ts['mu']:.4g}")
        ax.axvline(ts["sqrt_trace"], color="#cc3311", lw=1, ls="--", label=f"sqrt(tr C) = {ts['sqrt_trace']:.4g}")
        ax.set_title(f"{mod}: ‖x − m‖, var = {ts['var']:.3g}", fontsize=10)
        ax.set_xlabel("‖x − m‖")
        ax.legend(fontsize=7)
    files["thin_shell"] = "thin_shell.png"
    save_figure(fig, out / files["thin_shell"])

    sep = arrays["separability"]
    fig = new_figure(9, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    ax.bar(np.arange(len(sep)), np.nan_to_num(sep), width=1.0, color="#777777")
    for t in [t for t in res["separability"]["top"][:5] if t["sep"] is not None]:
        ax.annotate(str(t["feature"]), (t["feature"], t["sep"]), fontsize=7, color="#cc3311")
    ax.set_title("Sep(l) by feature", fontsize=10)
    ax.set_xlabel("feature l")
    ax = fig.add_subplot(1, 2, 2)
    ax.plot(np.sort(np.nan_to_num(sep))[::-1], color="k")
    ax.set_title("Sep(l), sorted (the separability curve)", fontsize=10)
    ax.set_xlabel("rank")
    files["separability"] = "separability.png"
    save_figure(fig, out / files["separability"])

    fig = new_figure(9, 3.6)
    for i, (key, label) in enumerate((("odd", "ODD(l) = Σ |C_lk| (k ≠ l) / C_ll"), ("conformity", "conformity"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for mod in MODS:
            v = arrays[mod][key]
            ax.hist(v[np.isfinite(v)], bins=50, alpha=0.6, color=COLORS[mod], label=mod)
        ax.set_title(label + (" per feature" if key == "odd" else " per vector"), fontsize=10)
        ax.legend(fontsize=8)
    files["odd_conformity"] = "odd_conformity.png"
    save_figure(fig, out / files["odd_conformity"])

    f1, f2 = arrays["features"]
    s = res["separator"]
    fig = new_figure(5.5, 4.8)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    for mod in MODS:
        F = arrays[mod]["features"]
        if len(F) > 3000:
            F = F[np.sort(rng.choice(len(F), 3000, replace=False))]
        ax.scatter(F[:, 0], F[:, 1], s=4, alpha=0.5, color=COLORS[mod], label=mod, linewidths=0)
    (c1, c2), c0 = s["coef"], s["intercept"]
    xs = np.array(ax.get_xlim())
    if None not in (c0, c1, c2) and abs(c2) > 1e-300:
        ylim = ax.get_ylim()
        ax.plot(xs, -(c0 + c1 * xs) / c2, color="k", lw=1, label="logistic boundary")
        ax.set_ylim(ylim)
    ax.set_xlim(xs)
    ax.set_xlabel(f"feature {f1}")
    ax.set_ylabel(f"feature {f2}")
    ax.set_title(f"top-2 separable features: train accuracy {s['accuracy']:.4f}", fontsize=10)
    ax.legend(fontsize=8)
    files["separator"] = "separator.png"
    save_figure(fig, out / files["separator"])
    return files


def _html(res: dict, pngs: dict[str, str], out: Path) -> str:
    e = html.escape

    def g(v: Any) -> str:
        return "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    rows = [("rows used (invalid left out)", lambda m: f"{res[m]['n']} ({res[m]['invalid']})"),
            ("‖m‖", lambda m: g(res[m]["mean_norm"])), ("‖σ‖", lambda m: g(res[m]["sigma_norm"])),
            ("offset ratio ‖m‖/‖σ‖", lambda m: f"{g(res[m]['offset_ratio'])} (paper {PAPER['offset_ratio'][m]})"),
            ("μ = E‖x − m‖", lambda m: g(res[m]["thin_shell"]["mu"])),
            ("var(‖x − m‖)", lambda m: g(res[m]["thin_shell"]["var"])),
            ("sqrt(tr C)", lambda m: g(res[m]["thin_shell"]["sqrt_trace"])),
            ("std/μ of ‖x − m‖", lambda m: g(res[m]["thin_shell"]["relative_std"])),
            ("ODD median / mean", lambda m: f"{g(res[m]['off_diagonal_dominance']['summary'].get('median'))} / "
                                            f"{g(res[m]['off_diagonal_dominance']['summary'].get('mean'))}"),
            ("conformity mean ± std", lambda m: f"{g(res[m]['conformity']['summary'].get('mean'))} ± "
                                                f"{g(res[m]['conformity']['summary'].get('std'))}")]
    table = "".join(f"<tr><th>{e(k)}</th>" + "".join(f"<td>{e(f(m))}</td>" for m in MODS) + "</tr>"
                    for k, f in rows)
    top = "".join(f"<tr><td>{t['feature']}</td><td>{g(t['sep'])}</td><td>{g(t['mean_image'])} ± "
                  f"{g(t['std_image'])}</td><td>{g(t['mean_text'])} ± {g(t['std_text'])}</td></tr>"
                  for t in res["separability"]["top"])
    s = res["separator"]
    verdict = "splits the modalities perfectly" if s["separates"] else "does not split them perfectly"

    def img(key: str, alt: str) -> str:
        data = base64.b64encode((out / pngs[key]).read_bytes()).decode("ascii")
        return f'<figure><img src="data:image/png;base64,{data}" alt="{e(alt)}"><figcaption>{e(pngs[key])}' \
               f'</figcaption></figure>'

    from clipsql.queries.present.gallery import GALLERY_SCRIPT
    sample = f", a seeded sample of {res['sample']}" if res["sample"] else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>clipsql geometry report</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:20px;max-width:1000px;color:#222}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{text-align:left;background:#f4f4f4}img{max-width:100%}figure{margin:10px 0}"
        "figcaption{color:#777;font-size:12px}</style></head><body>"
        f"<h1>Geometry of raw embeddings</h1><p>model <b>{e(res['model'])}</b> ({e(res['kind'])}, d = {res['dim']}), "
        f"{res['rows']} rows{e(sample)}. m is the mean, C the covariance (1/n), σ = sqrt(diag C); "
        "offset ratio ‖m‖/‖σ‖; thin shell: the distance to the mean ‖x − m‖ against sqrt(tr C); "
        "Sep(l) = |m_I(l) − m_T(l)| / sqrt(var_I(l) + var_T(l)); "
        "ODD(l) = Σ_{k≠l} |C_lk| / C_ll.</p>"
        f"<h2>Per modality</h2><table id=\"summary\"><tr><th></th><th>image</th><th>text</th></tr>{table}</table>"
        f"<h2>Thin shell</h2>{img('thin_shell', 'histograms of distance to the mean')}"
        f"<h2>Feature separability</h2>{img('separability', 'separability per feature')}"
        f"<table id=\"top-features\"><tr><th>feature</th><th>Sep</th><th>image mean ± std</th>"
        f"<th>text mean ± std</th></tr>{top}</table>"
        f"<h2>Linear separator on the top two features</h2><p id=\"separator\">features {s['features'][0]} and "
        f"{s['features'][1]}: {e(s['method'])} = <b>{s['accuracy']:.4f}</b> (image {g(s['accuracy_image'])}, "
        f"text {g(s['accuracy_text'])}); the line {e(verdict)}.</p>{img('separator', 'top-2 feature scatter')}"
        f"<h2>Off-diagonal dominance and conformity</h2>{img('odd_conformity', 'ODD and conformity histograms')}"
        '<div id="image-check" data-decoded="-1" data-total="-1" data-pending="-1"></div>'
        f"<script>{GALLERY_SCRIPT}</script></body></html>\n")
