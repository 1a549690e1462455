"""`clipsql score`: materialize chosen scores as stored columns.

The values land in a Lance table `scores_<model table>` (store.tables; id + one column per
score) stamped with the fit (statistics version) they came from, and show up in SQL as the
view `stored_scores` (default model) with columns `fit_id` and `computed_at`.
Re-running replaces the table: a materialization is a snapshot of one fit.

Two scores are properties of the whole pool, not of a row, so they exist only as
stored columns (docs/science.md §5–6), computed in numpy over every row of the model:
* `neg_clip_loss_pool` (`--neg-clip-loss-pool`): negCLIPLoss in the paper's pool form,
  K random partitions of the pool into batches of exactly |B| (default
  min(32768, pool)); τ, K and the seed come from the fit's `neg_clip` options.
  A row that sat out every partition (possible when |B| does not divide the pool)
  is NULL; the count is reported. Cost O(K·n·|B|·d) products and K·n·|B| exponentials, on
  every core (`pool_threads()`), with a progress bar.
* `norm_sim_d` (`--norm-sim-d`): NormSim-D, the pool's own second moment refined
  by repeatedly keeping the top rows (keep fraction 0.2 over 5 steps). O(n·d²).
Their parameters are recorded in the Lance table's schema metadata (key `clipsql`).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from clipsql.errors import QueryError
from clipsql.kernels import scores
from clipsql.kernels.arrays import to_numpy
from clipsql.queries.sql.db import connect, quote_ident, quote_literal
from clipsql.lazy import tqdm
from clipsql.queries.sql.functions import one_blas_thread
from clipsql.queries.sql.specs import POOL_COLUMNS, SCORE_COLUMNS, score_expressions
from clipsql.store.faults import fault
from clipsql.store.fit_rows import latest_fit
from clipsql.store.reads import read_embeddings
from clipsql.store.store import Store
from clipsql.store.tables import stored_table_name


@dataclass(frozen=True)
class ScoreReport:
    """Scores stored for `rows` rows of `model`: the `columns`, stamped with fit `fit_id`, in
    `seconds`; `params` of the pool-form columns (batching, seed). A Ray job also says its `mode`
    (append: only rows added since; overwrite), its `tasks` and the rows an ingest committed
    meanwhile (`pending`)."""
    model: str
    rows: int
    columns: list[str]
    fit_id: int | None
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)
    mode: str | None = None
    tasks: int | None = None
    pending: int | None = None


def materialize_scores(st: Store, columns: list[str], model: str | None = None, *,
                       neg_clip_loss_pool: bool = False, norm_sim_d: bool = False,
                       pool_batch_size: int | None = None, seed: int | None = None,
                       progress: bool = False) -> ScoreReport:
    """Store `columns` (SQL score functions; BLAS pinned to one thread around that query, as DuckDB
    runs the UDF batches on its own threads) and the pool-form columns (numpy passes of this
    process: negCLIPLoss's chunks on `pool_threads()` threads of one BLAS thread each, NormSim-D
    with BLAS's own threads), with a progress bar (and ETA) on the long negCLIPLoss pass."""
    unknown = [c for c in columns if c not in SCORE_COLUMNS]
    if not (columns or neg_clip_loss_pool or norm_sim_d):
        raise QueryError("name the scores to store: `columns` image_info_gain,text_info_gain,… (from: "
                         f"{', '.join(SCORE_COLUMNS)}), or `neg_clip_loss_pool` / `norm_sim_d`", param="columns")
    if unknown:
        raise QueryError(f"unknown score column(s) {', '.join(unknown)}; choose from: {', '.join(SCORE_COLUMNS)} "
                         "(or `neg_clip_loss_pool` / `norm_sim_d`)", param="columns")
    rec = st.model(model)
    check_columns(rec, columns)
    fit = latest_fit(st, rec, with_arrays=False)
    t0 = time.perf_counter()
    with st.lock():
        con = connect(st)
        try:
            idx = [m.model_id for m in st.list_models()].index(rec.model_id)
            with one_blas_thread():
                tbl = score_relation(con, rec, quote_ident(f"embeddings_{idx}"), columns)
        except Exception as e:  # noqa: BLE001 - DuckDB wraps UDF errors
            raise QueryError(str(e)) from None
        finally:
            con.close()
        params: dict[str, Any] = {}
        if neg_clip_loss_pool or norm_sim_d:
            tbl, params = _pool_columns(st, rec, tbl, fit, neg_clip_loss_pool, norm_sim_d, pool_batch_size, seed,
                                        progress)
        n = tbl.num_rows
        tbl = tbl.append_column("fit_id", pa.array([fit.fit_id if fit else None] * n, pa.int64()))
        now = int(time.time() * 1e6)
        tbl = tbl.append_column("computed_at", pa.array([now] * n, pa.timestamp("us", tz="UTC")))
        if params:
            tbl = tbl.replace_schema_metadata({"clipsql": json.dumps(params, sort_keys=True)})
        fault("score:before-write")
        st.db.create_table(stored_table_name(rec.table_name), data=tbl, mode="overwrite")
    stored = list(columns) + [c for c, on in zip(POOL_COLUMNS, (neg_clip_loss_pool, norm_sim_d)) if on]
    return ScoreReport(model=rec.model_id, rows=n, columns=stored, fit_id=fit.fit_id if fit else None,
                       seconds=round(time.perf_counter() - t0, 3), params=params)


def check_columns(rec: Any, columns: list[str]) -> None:
    if "neg_siglip_loss" in columns and rec.kind != "siglip":
        raise QueryError(f"neg_siglip_loss needs a SigLIP model; {rec.model_id} is a CLIP model (use neg_clip_loss)")


def score_relation(con: Any, rec: Any, relation: str, columns: list[str]) -> pa.Table:
    """id + the score columns of every row of `relation` (its image_embedding / text_embedding),
    through the SQL score functions themselves: what `clipsql score` stores locally and what each
    Ray task computes for its fragment (engines.scores) are the same expressions."""
    exprs = score_expressions(quote_literal(rec.model_id), rec.kind)
    cols = "".join(f", {exprs[c]} AS {quote_ident(c)}" for c in columns)
    return _arrow(con.sql(f"SELECT e.id{cols} FROM {relation} e ORDER BY e.id"))


def pool_threads() -> int:
    """Threads of the negCLIPLoss pool pass: every core this process may run on (at most 8: each
    holds two chunk × |B| float64 blocks, 270 MB at |B| = 32768), each with one BLAS thread.
    Not BLAS's own threads under one Python thread: on 2 cores shared with other work those measured
    0.6–0.8× of one thread (their barriers stall when a core is busy), chunks on threads 0.84–1.29×."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _pool_columns(st: Store, rec: Any, tbl: pa.Table, fit: dict | None, pool: bool, normsim_d: bool,
                  batch_size: int | None, seed: int | None, progress: bool = False) -> tuple[pa.Table, dict]:
    """Append the pool-form columns, computed over every row of the model, aligned on id."""

    emb = read_embeddings(st, rec)
    pos = pa.compute.index_in(tbl.column("id"), value_set=emb.column("id")).to_numpy(zero_copy_only=False)
    X, Y = to_numpy(emb.column("image_embedding")), to_numpy(emb.column("text_embedding"))
    params: dict[str, Any] = {}
    if pool:
        opts = {"tau": 0.01, "k": 10, "seed": 0}
        if fit:
            opts.update({k: v for k, v in (fit.options.get("neg_clip") or {}).items() if k in opts})
        if seed is not None:
            opts["seed"] = int(seed)
        n_valid = int((scores.normalize(X)[1] & scores.normalize(Y)[1]).sum())
        B = int(batch_size) if batch_size else min(32768, n_valid)
        if B < 2 or B > n_valid:
            raise QueryError(f"`pool_batch_size` must be between 2 and the {n_valid} valid rows of the pool; "
                             f"got {B}", param="pool_batch_size")
        k = int(opts["k"])
        with tqdm.tqdm(total=k * (n_valid // B) * B, unit="rows", desc="neg_clip_loss_pool", dynamic_ncols=True,
                       unit_scale=True, disable=not progress) as bar, one_blas_thread():
            v = scores.neg_clip_loss_pool(X, Y, tau=float(opts["tau"]), batch_size=B, k=k, seed=int(opts["seed"]),
                                          chunk=512, workers=pool_threads(), progress=bar.update)
        params["neg_clip_loss_pool"] = {**opts, "batch_size": B, "pool": n_valid,
                                        "batches_per_partition": n_valid // B,
                                        "rows_never_batched": int(np.isnan(v).sum() - (len(X) - n_valid))}
        tbl = tbl.append_column("neg_clip_loss_pool", _col(v[pos]))
    if normsim_d:
        keep, steps = 0.2, 5
        tbl = tbl.append_column("norm_sim_d", _col(scores.norm_sim_d(X, keep_fraction=keep, steps=steps)[pos]))
        params["norm_sim_d"] = {"keep_fraction": keep, "steps": steps}
    return tbl, params


def _col(v: np.ndarray) -> pa.Array:
    return pa.array(v, type=pa.float64(), mask=~np.isfinite(v))


def _arrow(rel: Any) -> pa.Table:
    tbl = rel.arrow()
    return tbl.read_all() if hasattr(tbl, "read_all") else tbl
