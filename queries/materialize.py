"""`clipsql score`: materialize chosen scores as stored columns.

The values land in a Lance table `scores_<model table>` (id + one column per score)
stamped with the fit (statistics version) they came from, and show up in SQL as the
view `stored_scores` (default model) with columns `fit_id` and `computed_at`.
Re-running replaces the table: a materialization is a snapshot of one fit.
"""
from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from store.errors import QueryError
from store.store import Store

from .functions import SCORE_COLUMNS, score_expressions


def stored_table_name(model_table: str) -> str:
    return "scores_" + model_table


def materialize_scores(st: Store, columns: list[str], model: str | None = None) -> dict[str, Any]:
    unknown = [c for c in columns if c not in SCORE_COLUMNS]
    if unknown or not columns:
        raise QueryError(f"unknown score column(s) {unknown}; choose from: {', '.join(SCORE_COLUMNS)}")
    from .db import connect, quote_ident, quote_literal
    rec = st.model(model)
    fit = st.latest_fit(rec, with_arrays=False)
    t0 = time.perf_counter()
    with st.lock():
        con = connect(st)
        try:
            idx = [m.model_id for m in st.list_models()].index(rec.model_id)
            exprs = score_expressions(quote_literal(rec.model_id))
            cols = ", ".join(f"{exprs[c]} AS {quote_ident(c)}" for c in columns)
            tbl = _arrow(con.sql(f"SELECT e.id, {cols} FROM {quote_ident(f'embeddings_{idx}')} e ORDER BY e.id"))
        except Exception as e:  # noqa: BLE001 - DuckDB wraps UDF errors
            raise QueryError(str(e)) from None
        finally:
            con.close()
        n = tbl.num_rows
        tbl = tbl.append_column("fit_id", pa.array([fit["fit_id"] if fit else None] * n, pa.int64()))
        now = int(time.time() * 1e6)
        tbl = tbl.append_column("computed_at", pa.array([now] * n, pa.timestamp("us", tz="UTC")))
        st.db.create_table(stored_table_name(rec.table_name), data=tbl, mode="overwrite")
    return {"model": rec.model_id, "rows": n, "columns": columns, "fit_id": fit["fit_id"] if fit else None,
            "seconds": round(time.perf_counter() - t0, 3)}


def _arrow(rel: Any) -> pa.Table:
    tbl = rel.arrow()
    return tbl.read_all() if hasattr(tbl, "read_all") else tbl
