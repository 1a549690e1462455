"""`clipsql delete STORE --where SQL`: delete the samples a WHERE clause on `samples` selects.

The clause is evaluated by the same read-only DuckDB connection `clipsql query` uses (so
metadata columns work: `--where "nsfw = 'UNLIKELY'"`), under the writer lock, on the
committed snapshot; then store.manage deletes those samples from `samples` and every
model's table in one commit, downdating the running statistics exactly.
"""
from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from clipsql.errors import QueryError
from clipsql.queries.sql.cli_query import fetch_table
from clipsql.queries.sql.db import connect
from clipsql.store.manage import delete_ids
from clipsql.store.store import Store


def ids_where(st: Store, where: str) -> Any:
    """The distinct ids of `samples` rows matching `where` (an Arrow array)."""
    if not where.strip():
        raise QueryError("--where is empty: give a condition on samples, e.g. --where \"caption IS NULL\" "
                         "(to delete everything, say --where true)")
    con = connect(st)
    try:
        tbl = fetch_table(con, f"SELECT DISTINCT id FROM samples WHERE ({where})")
    finally:
        con.close()
    return tbl.column("id").combine_chunks()


def delete_where(st: Store, where: str, *, dry_run: bool = False) -> dict[str, Any]:
    """Delete matching samples and their embeddings; returns what was (or would be) deleted."""
    with st.lock():
        st.recover()
        ids = ids_where(st, where)
        if dry_run:
            rows = {}
            for rec in st.list_models():
                rows[rec.model_id] = st.embeddings_table(rec).count_rows(filter=pc.field("id").isin(ids))
            return {"samples": len(ids), "rows": rows, "stale_fits": [], "dry_run": True}
        out = delete_ids(st, ids)
        out["dry_run"] = False
        return out
