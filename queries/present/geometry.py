"""`clipsql geometry`: the raw-embedding geometry report (docs/science.md §8, double-ellipsoid paper).

    report = geometry_report("store", output="geometry-report")   # report.json + report.html + PNGs
    report.image.offset_ratio, report.separator.accuracy, report.paths.html

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
seeded random subset of rows. The math is kernels.geometry; its definitions match
kernels.scores.geometry (tested).
"""
from __future__ import annotations

import base64
import html
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from clipsql.errors import StatsError
from clipsql.kernels.arrays import to_numpy
from clipsql.kernels.geometry import MODS, Batches, compute_geometry
from clipsql.queries.present.gallery import GALLERY_SCRIPT
from clipsql.queries.present.plots import new_figure, save_figure
from clipsql.queries.sql.db import open_store
from clipsql.store.snapshot import Snapshot

PAPER = {"offset_ratio": {"image": 0.94, "text": 1.03}}


@dataclass
class ThinShell:
    """The distance to the mean ‖x − m‖: its mean μ, variance, std/μ and histogram, against sqrt(tr C)."""
    mu: float | None
    var: float | None
    sqrt_trace: float | None
    relative_std: float | None
    histogram: dict[str, Any]


@dataclass
class ModalityGeometry:
    """One modality's figures over its valid raw vectors (`invalid` rows left out)."""
    n: int
    invalid: int
    mean_norm: float | None
    sigma_norm: float | None
    offset_ratio: float | None
    thin_shell: ThinShell
    off_diagonal_dominance: dict[str, Any]     # values per feature, summary, histogram
    conformity: dict[str, Any]                 # summary, histogram

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModalityGeometry:
        return cls(**{**d, "thin_shell": ThinShell(**d["thin_shell"])})


@dataclass
class Separator:
    """The logistic separator on the two most separable `features` and its train accuracy."""
    features: list[int]
    method: str
    weights_standardized: list[float | None]
    coef: list[float | None]
    intercept: float | None
    accuracy: float | None
    separates: bool
    accuracy_image: float | None
    accuracy_text: float | None


@dataclass
class ReportPaths:
    """The files a report wrote (absolute paths)."""
    json: str
    html: str
    plots: list[str]


@dataclass
class GeometryReport:
    """The §8 report of one model (`sample`: the seeded sample's size, None for every row);
    `as_dict()` without `paths` is report.json."""
    model: str
    kind: str
    rows: int
    sample: int | None
    seed: int
    dim: int
    separability: dict[str, Any]               # values per feature, summary, top features
    image: ModalityGeometry
    text: ModalityGeometry
    separator: Separator
    paper: dict[str, Any]
    seconds: float
    paths: ReportPaths | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeometryReport:
        """From the JSON form (report.json's keys)."""
        return cls(**{**d, "image": ModalityGeometry.from_dict(d["image"]),
                      "text": ModalityGeometry.from_dict(d["text"]), "separator": Separator(**d["separator"]),
                      "paths": ReportPaths(**d["paths"]) if d.get("paths") else None})

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: report.json's keys in its order, then `paths` when the files were written."""
        out = asdict(self)
        if out["paths"] is None:
            del out["paths"]
        return out



# --------------------------------------------------------------------------- store
def _store_batches(snap: Snapshot, rec: Any, sample: int | None, seed: int,
                   batch_rows: int = 16384) -> tuple[Batches, int]:
    ds = snap.embeddings_table(rec)
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
                    sample: int | None = None, seed: int = 0, top: int = 10) -> GeometryReport:
    """Compute the §8 report for one model and write ``report.json``, ``report.html`` and
    the PNG plots into ``output``; returns the report (with the files' ``paths``)."""
    snap = Snapshot.read(open_store(store))
    rec = snap.model(model)
    t0 = time.perf_counter()
    gen, total = _store_batches(snap, rec, sample, seed)
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
    report = GeometryReport.from_dict(_finite(res))
    res = report.as_dict()
    (out / "report.json").write_text(json.dumps(res, indent=1, allow_nan=False))
    (out / "report.html").write_text(_html(res, pngs, out), encoding="utf-8")
    report.paths = ReportPaths(json=str((out / "report.json").resolve()), html=str((out / "report.html").resolve()),
                               plots=[str((out / p).resolve()) for p in pngs.values()])
    return report


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
