"""The catalog rows of fits: a fit's O(M + d²) arrays in `fits`, its M × d reference sample in
`fit_references`, the recipe it was made for in `recipe_fits` and why it went stale in
`stale_fits`. store.fits makes fits and loads them for scoring; store.snapshot reads them by id."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import sqlalchemy as sa

from clipsql.errors import CatalogDamaged
from clipsql.store import catalog as cat
from clipsql.store.records import ModelRecord
from clipsql.store.store import Store


@dataclass(frozen=True)
class FitRow:
    """One fit's catalog row (`fits`): what it was fitted on and with, and, when asked for, its
    arrays (means, covariances, factors, priors; with the reference sample's `X_ref_raw`,
    `Y_ref_raw`, `ref_ids` merged in when that was asked for too)."""
    fit_id: int
    model_id: str
    created_at: float
    n_rows: int                  # rows of the model when fitted
    covered_seq: int             # the write batch its statistics covered
    reference_size: int          # M, the reference sample's rows
    options: dict                # seed, scale, a, b, prior, own pair, negCLIPLoss batches, …
    arrays: dict | None = None   # name → numpy array (None: not read)

    @classmethod
    def from_row(cls, m: Mapping[str, Any], options: dict, arrays: dict | None = None) -> "FitRow":
        return cls(fit_id=int(m["fit_id"]), model_id=m["model_id"], created_at=float(m["created_at"]),
                   n_rows=int(m["n_rows"]), covered_seq=int(m["covered_seq"]),
                   reference_size=int(m["reference_size"]), options=options, arrays=arrays)


def save_fit(st: Store, model: ModelRecord, *, n_rows: int, covered_seq: int, reference_size: int,
             options: dict, arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray],
             recipe: str | None = None) -> int:
    """Store a fit: its O(M + d²) arrays in `fits`, the M × d reference sample in `fit_references`
    (so scores that need only means and factors never load the reference). `recipe`: a fit made
    for that curation recipe, which never becomes the default fit (`latest_fit`)."""
    with st.engine.begin() as conn:
        res = conn.execute(cat.fits.insert().values(
            model_id=model.model_id, created_at=time.time(), n_rows=n_rows, covered_seq=covered_seq,
            reference_size=reference_size, options=cat.to_json(options), arrays=cat.pack_many(arrays)))
        fit_id = int(res.inserted_primary_key[0])
        conn.execute(cat.fit_references.insert().values(fit_id=fit_id, arrays=cat.pack_many(reference)))
        if recipe is not None:
            conn.execute(cat.recipe_fits.insert().values(fit_id=fit_id, recipe=recipe))
        return fit_id


def stale_fit_reason(st: Store, fit_id: int) -> str | None:
    """Why a fit no longer describes its rows (rows it covered were deleted or rewritten), or None."""
    with st.engine.connect() as conn:
        return conn.execute(sa.select(cat.stale_fits.c.reason).where(cat.stale_fits.c.fit_id == fit_id)).scalar()


def latest_fit(st: Store, model: ModelRecord, with_arrays: bool = True, with_reference: bool = False,
               recipe: str | None = None, where: Callable[[dict], bool] | None = None) -> FitRow | None:
    """The newest default fit's catalog row (fits made for a recipe excluded) or, with `recipe`,
    the newest fit made for that recipe whose options satisfy `where`; `arrays` (and the
    reference sample merged into them) on request."""
    made_for = sa.select(cat.recipe_fits.c.fit_id)
    if recipe is not None:
        made_for = made_for.where(cat.recipe_fits.c.recipe == recipe)
    chosen = cat.fits.c.fit_id.in_(made_for) if recipe is not None else cat.fits.c.fit_id.not_in(made_for)
    with st.engine.connect() as conn:
        query = sa.select(cat.fits.c.fit_id, cat.fits.c.options).where(
            cat.fits.c.model_id == model.model_id, chosen).order_by(cat.fits.c.fit_id.desc())
        if where is None:
            query = query.limit(1)
        fit_id = next((r[0] for r in conn.execute(query) if where is None or where(json.loads(r[1]))), None)
    return None if fit_id is None else get_fit(st, fit_id, with_arrays, with_reference)


def get_fit(st: Store, fit_id: int, with_arrays: bool = True, with_reference: bool = False) -> FitRow | None:
    """One fit's catalog row by id (None if there is none); arrays and reference as in `latest_fit`."""
    cols = [c for c in cat.fits.c if with_arrays or c.name != "arrays"]
    with st.engine.connect() as conn:
        row = conn.execute(sa.select(*cols).where(cat.fits.c.fit_id == fit_id)).first()
        if row is None:
            return None
        out = dict(row._mapping)
        what = f"fit #{fit_id} of model {out['model_id']}"
        arrays = None
        try:
            if with_arrays:
                arrays = cat.unpack_many(out["arrays"], what)
                if with_reference:
                    blob = conn.execute(sa.select(cat.fit_references.c.arrays).where(
                        cat.fit_references.c.fit_id == out["fit_id"])).scalar()
                    if blob is None:
                        raise CatalogDamaged(f"{what} has lost its reference sample")
                    arrays.update(cat.unpack_many(blob, f"the reference sample of {what}"))
            options = parse_options(out["options"], what)
        except CatalogDamaged as e:
            raise CatalogDamaged(f"{e}: run `clipsql doctor {st.path} --repair` (drops it), then refit with "
                                 f"`clipsql stats fit {st.path} --model {out['model_id']}`") from None
    return FitRow.from_row(out, options, arrays)


def parse_options(text: Any, what: str) -> dict:
    """A fit's `options` JSON, or CatalogDamaged saying whose."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, UnicodeDecodeError) as e:
        raise cat.damaged_value(f"the options of {what}", e) from None
