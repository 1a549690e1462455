"""Fits: `clipsql stats fit` draws the reference sample and fits the score statistics; the SQL
score functions load them (`load_fit`), reports say when they are stale (`staleness`).

The reference sample is M rows drawn once, seeded, from the rows holding both
embeddings (all rows when fewer): seeded row positions of the committed table
version, read with one Lance `take` (no scan, seconds at millions of rows). The fit (priors, prior-weighted
means, covariances and their factors; docs/science.md §1–2) is stored in the catalog
stamped with the data version it came from, the seed and the options.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clipsql.errors import StatsError
from clipsql.kernels import scores
from clipsql.kernels.arrays import to_numpy
from clipsql.store.faults import fault
from clipsql.store.fit_rows import FitRow, latest_fit, save_fit, stale_fit_reason
from clipsql.store.reads import count_rows
from clipsql.store.records import ModelRecord
from clipsql.store.stats import sync_stats
from clipsql.store.store import Store

DEFAULT_REFERENCE_SIZE = 10_000
DEFAULT_STALE_SHARE = 0.10
# Fits made for a curation recipe: the settings that recipe is published with (docs/science.md §9).
RECIPE_FITS = {"kl-guided": {"scale": "model", "prior": "uniform"}}
ARRAY_KEYS = ("log_prior_text", "log_prior_image", "mean_image", "mean_text", "cov_image", "cov_text",
              "factor_image", "factor_text")


@dataclass(frozen=True)
class FitSummary:
    """What `fit_stats` made: the fit's id, the model, the reference sample's size M (of `rows`
    rows at table version `data_version`), the recipe it was made for (or None), the seconds it
    took and its seed, scale (a, b) and prior."""
    fit_id: int
    model: str
    reference_size: int
    rows: int
    recipe: str | None
    seconds: float
    seed: int
    a: float
    b: float
    prior: str
    data_version: int

    def to_json(self) -> dict[str, Any]:
        """The summary as a JSON object (the fields in order)."""
        return asdict(self)

    as_dict = to_json


def scale_for(rec: ModelRecord, scale: str) -> tuple[float, float]:
    """(a, b): `1` → (1, 0) as in the Information Gain paper; `model` → the model's logit scale and bias."""
    if scale in ("1", "one", 1):
        return 1.0, 0.0
    if scale == "model":
        return float(rec.logit_scale), float(rec.logit_bias or 0.0)
    try:
        return float(scale), 0.0
    except ValueError:
        raise StatsError(f"`scale` must be 1, model or a number; got {scale!r}", param="scale") from None


def draw_reference(st: Store, rec: ModelRecord, size: int, seed: int,
                   version: int | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """M rows drawn without a scan: seeded positions (`default_rng(seed).choice(n, M)`) in the
    committed table version, read with one `take`, then ordered by id."""
    ds = st.embeddings_table(rec, version)
    n = ds.count_rows()
    if n == 0:
        raise StatsError(f"model {rec.model_id} has no rows yet: ingest data before `clipsql stats fit`")
    cols = ["id", "image_embedding", "text_embedding"]
    if n > size:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
        tbl = ds.take(rows.tolist(), columns=cols)
    else:
        tbl = ds.to_table(columns=cols)
    tbl = tbl.take(pa.array(np.argsort(tbl.column("id").to_numpy(zero_copy_only=False).astype(str),
                                       kind="stable")))
    X = to_numpy(tbl.column("image_embedding")).astype(np.float64)
    Y = to_numpy(tbl.column("text_embedding")).astype(np.float64)
    ok = (np.isfinite(X).all(1) & np.isfinite(Y).all(1) & (np.abs(X).sum(1) > 0) & (np.abs(Y).sum(1) > 0))
    ref_ids = [i for i, keep in zip(tbl.column("id").to_pylist(), ok) if keep]
    return ref_ids, X[ok].astype(np.float32), Y[ok].astype(np.float32)


def fit_stats(st: Store, model: str | None = None, *, reference_size: int = DEFAULT_REFERENCE_SIZE,
              seed: int = 0, scale: str = "1", prior: str = "posterior-mean",
              neg_clip: dict[str, Any] | None = None, recipe: str | None = None,
              own_pair: str = "exclude") -> FitSummary:
    """Fit and store the reference statistics of one model; returns a summary.

    `neg_clip` overrides the recorded negCLIPLoss batch options {tau, batch_size, k, seed}
    (defaults τ = 0.01, |B| = min(32768, M+1), K = 10, the fit's seed). `recipe`: a fit made
    for that curation recipe (e.g. kl-guided), kept apart: the default fit the `scores` view
    uses is not replaced. `own_pair`: how the exact Information Gain of a row drawn into the reference
    treats its own pair, "exclude" (docs/science.md §1) or "include" (the authors' behaviour),
    recorded in the options for the `scores` view and stored scores."""
    if own_pair not in scores.OWN_PAIR:
        raise StatsError(f"`own_pair` must be one of {', '.join(scores.OWN_PAIR)}; got {own_pair!r}", param="own_pair")
    if recipe is not None:
        if recipe not in RECIPE_FITS:
            raise StatsError(f"`recipe` must be one of {', '.join(RECIPE_FITS)}; got {recipe!r}", param="recipe")
        scale, prior = RECIPE_FITS[recipe]["scale"], RECIPE_FITS[recipe]["prior"]
    if prior not in scores.PRIORS:
        raise StatsError(f"`prior` must be one of {', '.join(scores.PRIORS)}; got {prior!r}", param="prior")
    if reference_size < 2:
        raise StatsError("`reference_size` must be at least 2", param="reference_size")
    rec = st.model(model)
    t0 = time.perf_counter()
    with st.lock():
        state = sync_stats(st, rec)
        ds = st.embeddings_table(rec)
        n_rows, version = ds.count_rows(), ds.version
        ref_ids, X, Y = draw_reference(st, rec, reference_size, seed, version)
        if len(ref_ids) < 2:
            raise StatsError(f"model {rec.model_id}: {len(ref_ids)} of the drawn rows hold both a valid image and "
                             "a text embedding; the reference sample needs image-text pairs (rows without "
                             "text, e.g. an image-only source, still get raw_norm, conformity and NormSim)")
        a, b = scale_for(rec, scale)
        f = scores.fit(X, Y, a=a, b=b, kind=rec.kind, prior=prior)
        options = {"seed": seed, "scale": str(scale), "a": a, "b": b, "prior": prior, "kind": rec.kind,
                   "approx_metric": "fisher-1-minus-sigma" if rec.kind == "siglip" else "covariance",
                   "own_pair": own_pair,
                   **({"recipe": recipe} if recipe else {}),
                   "requested_reference_size": reference_size, "data_version": version,
                   "neg_clip": {"tau": 0.01, "batch_size": min(32768, len(ref_ids) + 1), "k": 10, "seed": seed,
                                **_neg_clip_overrides(neg_clip, len(ref_ids))}}
        reference = {"ref_ids": np.array(ref_ids), "X_ref_raw": X, "Y_ref_raw": Y}
        arrays = {k: getattr(f, k) for k in ARRAY_KEYS}
        fault("fit:before-save")
        fit_id = save_fit(st, rec, n_rows=n_rows, covered_seq=state.covered_seq, reference_size=len(ref_ids),
                          options=options, arrays=arrays, reference=reference, recipe=recipe)
    return FitSummary(fit_id=fit_id, model=rec.model_id, reference_size=len(ref_ids), rows=n_rows, recipe=recipe,
                      seconds=round(time.perf_counter() - t0, 3), seed=options["seed"], a=options["a"], b=options["b"],
                      prior=options["prior"], data_version=version)


def _neg_clip_overrides(given: dict[str, Any] | None, m: int) -> dict[str, Any]:
    out = dict(given or {})
    unknown = set(out) - {"tau", "batch_size", "k", "seed"}
    if unknown:
        raise StatsError(f"unknown negCLIPLoss option(s) {sorted(unknown)}; use tau, batch_size, k, seed")
    if "tau" in out and not float(out["tau"]) > 0:
        raise StatsError("negCLIPLoss tau must be > 0")
    if "batch_size" in out:
        if int(out["batch_size"]) < 2:
            raise StatsError("negCLIPLoss batch_size must be >= 2")
        out["batch_size"] = min(int(out["batch_size"]), m + 1)
    if "k" in out and int(out["k"]) < 1:
        raise StatsError("negCLIPLoss k must be >= 1")
    return out


def load_fit(st: Store, rec: ModelRecord, reference: bool = True, row: FitRow | None = None) -> tuple[scores.Fit, FitRow]:
    """The latest fit of a model (or the fit of `row`, a `latest_fit` row with arrays and reference)
    as a `scores.Fit` (+ its catalog row); StatsError naming the fix if none.

    `reference=False` skips the M × d reference sample (X_ref/Y_ref come back empty): enough
    for the approximation and centered norms, whose memory then does not grow with M.
    """
    row = row if row is not None else latest_fit(st, rec, with_reference=reference)
    if row is None:
        raise no_fit_error(rec)
    arr, opts = row.arrays, row.options
    if reference:
        Xh, _ = scores.normalize(arr["X_ref_raw"])
        Yh, _ = scores.normalize(arr["Y_ref_raw"])
    else:
        Xh = Yh = np.empty((0, rec.dim))
    f = scores.Fit(a=float(opts["a"]), b=float(opts["b"]), kind=opts["kind"], prior=opts["prior"],
                   X_ref=Xh, Y_ref=Yh, **{k: arr[k] for k in ARRAY_KEYS})
    return f, row


def no_fit_error(rec: ModelRecord) -> StatsError:
    return StatsError(f"no fitted statistics for model {rec.model_id}: run "
                      f"`clipsql stats fit STORE --model {rec.model_id}` first")


def stale_share(st: Store) -> float:
    v = st.get_setting("stale_share")
    return float(v) if v is not None else DEFAULT_STALE_SHARE


def staleness(st: Store, rec: ModelRecord, fit: FitRow | None = None) -> str | None:
    """A sentence when the latest fit (or the fit row `fit`) is stale or predates more than the
    stated share of the rows, else None."""
    fit = fit if fit is not None else latest_fit(st, rec, with_arrays=False)
    if fit is None:
        return None
    return stale_message(rec, fit, stale_fit_reason(st, int(fit.fit_id)), count_rows(st, rec), stale_share(st))


def stale_message(rec: ModelRecord, fit: FitRow, reason: str | None, rows: int, share: float) -> str | None:
    """`staleness` from what it reads: the fit row, why it was marked stale (or None), the model's
    rows and the stated share."""
    if reason is None and rec.kind == "siglip" and "approx_metric" not in fit.options:
        reason = "the SigLIP approximation's metric was corrected (the (1 − σ)-scaled Fisher metric)"
    if reason is not None:
        return (f"the fit of {rec.model_id} (#{fit.fit_id}) is stale: {reason} since it was computed; "
                "re-run `clipsql stats fit`")
    added = rows - int(fit.n_rows)
    if rows and added > 0 and added / rows > share:
        return (f"the fit of {rec.model_id} (#{fit.fit_id}) predates {added} of {rows} rows "
                f"({100 * added / rows:.0f}% > {100 * share:.0f}%): new rows still score against the "
                f"fixed reference, but re-run `clipsql stats fit` to refresh priors and covariances")
    return None
