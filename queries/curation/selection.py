"""`clipsql select`: curation recipes (SCIENCE.md §9) and the export of the chosen ids.

    select(st, recipe="kl-guided", fraction=0.25, output="subset.parquet")

* `kl-guided` (density-ratio revision): the top `fraction` (default 25%) of the pool
  by `text_info_gain`.
* `negclip-normsim` (Wang et al.): the top `first_fraction` (default 30%) of the pool
  by `neg_clip_loss` (the per-row stable form; `negclip_form="pool"` uses the stored
  `neg_clip_loss_pool` column of `clipsql score --neg-clip-loss-pool` instead), then
  among those the top rows by `norm_sim_inf(image, target)` up to `fraction`
  (default 20%) of the whole pool.
* `sql`: any query returning an `id` column; its row order decides.

The pool is every row of the model. A fraction F keeps `floor(F × pool)` rows, F read
as the decimal it is written as (so 0.29 × 100 is 29, not 28); `limit` keeps N rows.
Rows are ranked by score descending, ties broken by id ascending (byte order); rows
whose score is NULL are never chosen, so fewer rows than asked come back when the
pool has fewer scored rows (the sidecar says so). Scores go through the SQL functions,
so a selection is exactly what `clipsql query` would rank.

Output: `.parquet`, `.csv` (id, uri, caption, the scores used, in rank order) or
`.txt` (one id per line), plus `<output>.json`: recipe, model, statistics version (fit),
seeds, options and counts.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import math
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from store.errors import SelectionError
from store.faults import fault
from store.store import ModelRecord, Store
from ..sql.functions import blas_pinned

RECIPES = ("kl-guided", "negclip-normsim")
DEFAULT_FRACTION = {"kl-guided": 0.25, "negclip-normsim": 0.20}
DEFAULT_FIRST_FRACTION = 0.30
FORMATS = (".parquet", ".csv", ".txt")
TIE_RULE = "score descending, ties by id ascending; NULL scores never chosen"
ROUNDING = "count = floor(F x pool), F as written in decimal; --limit N keeps N"


def count_for(fraction: float, pool: int) -> int:
    """floor(F × pool) with F taken as the decimal it is written as (no binary rounding surprises)."""
    return int(math.floor(Decimal(str(fraction)) * pool))


def rank(ids: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Positions of the rows with a finite score, best first: score descending, then id ascending."""
    ok = np.flatnonzero(np.isfinite(score))
    order = np.lexsort((ids[ok], -score[ok]))
    return ok[order]


@blas_pinned
def select(st: Store, *, recipe: str | None = None, sql: str | None = None, target: str | None = None,
           fraction: float | None = None, limit: int | None = None, output: str | Path,
           model: str | None = None, first_fraction: float = DEFAULT_FIRST_FRACTION,
           negclip_form: str = "row", engine: str = "local", ray_address: str | None = None) -> dict[str, Any]:
    """Run a recipe (or SQL), cut to the exact count, write `output` and `<output>.json`; returns the sidecar.

    `engine="ray"` computes the recipe's pool-wide score (text Information Gain, or negCLIPLoss)
    with one Ray task per fragment (cluster.scores.score_columns_ray); ranking and the cut are the same."""
    t0 = time.perf_counter()
    output = Path(output)
    fmt = output.suffix.lower()
    if fmt not in FORMATS:
        raise SelectionError(f"--output must end in {', '.join(FORMATS)}; got {output.name!r}")
    if (recipe is None) == (sql is None):
        raise SelectionError("give exactly one of --recipe (kl-guided | negclip-normsim) or --sql \"SELECT id …\"")
    if recipe is not None and recipe not in RECIPES:
        raise SelectionError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if fraction is not None and limit is not None:
        raise SelectionError("give --fraction or --limit, not both")
    for name, f in (("--fraction", fraction), ("--first-fraction", first_fraction)):
        if f is not None and not 0 < f <= 1:
            raise SelectionError(f"{name} must be in (0, 1]; got {f}")
    if limit is not None and limit < 0:
        raise SelectionError(f"--limit must be >= 0; got {limit}")
    if recipe == "negclip-normsim" and not target:
        raise SelectionError("the negclip-normsim recipe needs --target NAME (see `clipsql target list`)")
    if target and recipe != "negclip-normsim":
        raise SelectionError("--target is only used by --recipe negclip-normsim")
    if negclip_form not in ("row", "pool"):
        raise SelectionError(f"--negclip-form must be row or pool; got {negclip_form!r}")
    if engine not in ("local", "ray"):
        raise SelectionError(f"--engine must be local or ray; got {engine!r}")
    if engine == "ray" and sql is not None:
        raise SelectionError("--sql runs in DuckDB: use --engine local (`clipsql score --engine ray` stores "
                             "scores that --sql can read from stored_scores)")

    rec = st.model(model)
    pool = st.count_rows(rec)
    if recipe is not None and fraction is None and limit is None:
        fraction = DEFAULT_FRACTION[recipe]
    count = limit if limit is not None else (count_for(fraction, pool) if fraction is not None else None)
    side: dict[str, Any] = {
        "recipe": recipe or "sql", "sql": sql, "model": rec.model_id, "model_kind": rec.kind,
        "fraction": fraction, "limit": limit, "rounding": ROUNDING, "ties": TIE_RULE,
        "statistics": _fit_info(st, rec), "output": str(output), "format": fmt[1:],
    }
    from ..sql.db import connect
    con = connect(st)
    side["engine"] = engine

    def score_all(columns: list[str]) -> pa.Table:
        """id + `columns` for every row of the model: DuckDB here, or one Ray task per fragment."""
        if engine == "ray":
            from cluster.scores import score_columns_ray
            return score_columns_ray(st, rec, columns, address=ray_address)
        from ..sql.materialize import score_relation
        return score_relation(con, rec, _emb_view(st, rec), columns)
    try:
        if recipe == "kl-guided":
            tbl, counts = _kl_guided(score_all, count)
        elif recipe == "negclip-normsim":
            if count is not None and count > count_for(first_fraction, pool) and limit is None:
                raise SelectionError(f"--fraction {fraction} exceeds --first-fraction {first_fraction}: the "
                                     "NormSim stage can only keep rows the negCLIPLoss stage kept")
            tbl, counts, extra = _negclip_normsim(con, st, rec, target, count, count_for(first_fraction, pool),
                                                  negclip_form, score_all)
            side.update(first_fraction=first_fraction, negclip_form=negclip_form, **extra)
        else:
            tbl, counts = _from_sql(con, sql, count)
        counts = {"pool": pool, "requested": count, **counts, "selected": tbl.num_rows}
        tbl = _with_samples(con, tbl)
    except Exception as e:  # noqa: BLE001 - DuckDB wraps errors raised inside UDFs
        from store.errors import ClipsqlError
        if isinstance(e, ClipsqlError):
            raise
        raise SelectionError(f"selection failed: {e}") from None
    finally:
        con.close()
    side["seeds"] = {"reference": (side["statistics"] or {}).get("seed"),
                     "neg_clip": ((side["statistics"] or {}).get("neg_clip") or {}).get("seed")}
    side["score_columns"] = [c for c in tbl.column_names if c not in ("id", "uri", "caption")]
    side["counts"] = counts
    side["warnings"] = []
    if limit is not None and limit > tbl.num_rows:
        side["warnings"].append(f"--limit {limit} is more than the {tbl.num_rows} rows there are to select "
                                f"(pool {pool}): all of them were selected")
    side["sha256"] = _write(tbl, output, fmt)
    side["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    side["seconds"] = round(time.perf_counter() - t0, 3)
    sidecar = Path(str(output) + ".json")
    write_text_atomic(sidecar, json.dumps(side, indent=2, sort_keys=True, default=_json_default) + "\n")
    side["sidecar"] = str(sidecar)
    return side


# --------------------------------------------------------------------------- recipes
def _emb_view(st: Store, rec: ModelRecord) -> str:
    from ..sql.db import quote_ident
    return quote_ident(f"embeddings_{[m.model_id for m in st.list_models()].index(rec.model_id)}")


def _arrow(rel: Any) -> pa.Table:
    tbl = rel.arrow()
    return tbl.read_all() if hasattr(tbl, "read_all") else tbl


def _top(tbl: pa.Table, column: str, count: int | None) -> tuple[pa.Table, int]:
    """Rows of `tbl` ranked by `column` (desc, ties by id), cut to `count`; also the NULL count."""
    ids = np.array(tbl.column("id").to_pylist(), dtype=object).astype(str)
    score = tbl.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    order = rank(ids, score)
    if count is not None:
        order = order[:count]
    return tbl.take(pa.array(order, pa.int64())), int((~np.isfinite(score)).sum())


def _kl_guided(score_all: Any, count: int | None) -> tuple[pa.Table, dict]:
    tbl = score_all(["text_info_gain"])
    top, nulls = _top(tbl, "text_info_gain", count)
    return top, {"null_scores": nulls}


def _negclip_normsim(con: Any, st: Store, rec: ModelRecord, target: str, count: int | None, first: int,
                     form: str, score_all: Any) -> tuple[pa.Table, dict, dict]:
    from ..sql.db import quote_literal
    from .targets import get_target
    t = get_target(st, target)
    if t.model_id != rec.model_id:
        raise SelectionError(f"target {target!r} belongs to model {t.model_id}, not {rec.model_id}: pass "
                             f"--model {t.model_id} or add a target for this model")
    view = _emb_view(st, rec)
    if form == "row":
        s1 = score_all(["neg_clip_loss"])
        col = "neg_clip_loss"
    else:
        s1 = _stored_pool_column(st, rec)
        col = "neg_clip_loss_pool"
    stage1, nulls1 = _top(s1, col, first)
    con.register("_clipsql_stage1", stage1)
    s2 = _arrow(con.sql(f"SELECT s.id, s.{col}, norm_sim_inf(e.image_embedding, {quote_literal(target)}) "
                        f"AS norm_sim_inf FROM _clipsql_stage1 s JOIN {view} e USING (id)"))
    con.unregister("_clipsql_stage1")
    top, nulls2 = _top(s2, "norm_sim_inf", count)
    extra = {"target": t.summary()}
    return top, {"stage1": stage1.num_rows, "stage1_requested": first, "null_scores": nulls1,
                 "null_norm_sim": nulls2}, extra


def _stored_pool_column(st: Store, rec: ModelRecord) -> pa.Table:
    from ..sql.materialize import stored_table_name
    name = stored_table_name(rec.table_name)
    tbl = st.db.open_table(name).to_lance().to_table() if name in st.table_names() else None
    if tbl is None or "neg_clip_loss_pool" not in tbl.column_names:
        raise SelectionError(f"no stored neg_clip_loss_pool for {rec.model_id}: run "
                             "`clipsql score STORE --neg-clip-loss-pool` first, or use --negclip-form row")
    return tbl.select(["id", "neg_clip_loss_pool"])


def _from_sql(con: Any, sql: str, count: int | None) -> tuple[pa.Table, dict]:
    import duckdb
    try:
        rel = con.sql(sql)
    except duckdb.Error as e:
        raise SelectionError(f"--sql failed: {e}") from None
    if rel is None or "id" not in rel.columns:
        raise SelectionError("--sql must return a column named id (and decides the order), e.g. "
                             "\"SELECT id, clip_score FROM scores ORDER BY clip_score DESC, id\"")
    tbl = _arrow(rel)
    ids = tbl.column("id").to_pylist()
    seen: set = set()
    keep = []
    for i, v in enumerate(ids):
        if v is not None and v not in seen:
            seen.add(v)
            keep.append(i)
    dropped = len(ids) - len(keep)
    if count is not None:
        keep = keep[:count]
    tbl = tbl.take(pa.array(keep, pa.int64()))
    tbl = tbl.set_column(tbl.column_names.index("id"), "id", tbl.column("id").cast(pa.string()))
    return tbl, {"sql_rows": len(ids), "duplicate_or_null_ids_dropped": dropped}


def _with_samples(con: Any, tbl: pa.Table) -> pa.Table:
    """id, uri, caption (from `samples` unless the selection has them), then the score columns; rank order."""
    tbl = tbl.append_column("_rank", pa.array(np.arange(tbl.num_rows, dtype=np.int64)))
    con.register("_clipsql_selected", tbl)
    have = set(tbl.column_names)
    extra = [c for c in ("uri", "caption") if c not in have]
    sel = ", ".join(f"sm.{c}" for c in extra)
    out = _arrow(con.sql(f"SELECT s.*{', ' + sel if sel else ''} FROM _clipsql_selected s "
                         f"LEFT JOIN samples sm ON sm.id = s.id ORDER BY s._rank"))
    con.unregister("_clipsql_selected")
    front = ["id", "uri", "caption"]
    rest = [c for c in out.column_names if c not in front and c != "_rank"]
    return out.select(front + rest)


# --------------------------------------------------------------------------- output
def _write(tbl: pa.Table, output: Path, fmt: str) -> str:
    """Write the selection atomically (temporary file in the same directory, fsync, rename: a kill
    leaves the previous output or the new one, never a truncated file); returns its sha256."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    try:
        if fmt == ".txt":
            ids = tbl.column("id").to_pylist()
            tmp.write_text("".join(f"{i}\n" for i in ids))
        elif fmt == ".csv":
            import pyarrow.csv as pcsv
            flat = [c for c, f in zip(tbl.column_names, tbl.schema) if not pa.types.is_nested(f.type)]
            pcsv.write_csv(tbl.select(flat), tmp)
        else:
            import pyarrow.parquet as pq
            pq.write_table(tbl, tmp)
        digest = _fsync_sha256(tmp)
        fault("select:before-rename")
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(output.parent)
    return digest


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text)
        _fsync_sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb+") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(fh.fileno())
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fit_info(st: Store, rec: ModelRecord) -> dict | None:
    fit = st.latest_fit(rec, with_arrays=False)
    if fit is None:
        return None
    o = fit["options"]
    return {"fit_id": fit["fit_id"], "created_at": fit["created_at"], "n_rows": fit["n_rows"],
            "reference_size": fit["reference_size"], "data_version": o.get("data_version"), "seed": o.get("seed"),
            "a": o.get("a"), "b": o.get("b"), "prior": o.get("prior"), "scale": o.get("scale"),
            "neg_clip": o.get("neg_clip")}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
