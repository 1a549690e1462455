"""`clipsql delete STORE --where SQL`: delete the samples a WHERE clause on `samples` selects;
`clipsql undelete STORE --where SQL`: let ingest restore ids the deletions record holds.

The clause is evaluated by the same read-only DuckDB connection `clipsql query` uses (so
metadata columns work: `--where "nsfw = 'UNLIKELY'"`), under the writer lock, on the
committed snapshot; then store.manage deletes those samples from `samples` and every
model's table in one commit, downdating the running statistics exactly, and records their
ids in the deletions record (store.deletions) in that commit, so no ingest adds them again.
`undelete`'s clause is on the `deletions` view (id, uri, caption, source, deleted_at,
deleted_where); the matching records are removed and the source units that held them are
forgotten, so the next ingest of their source restores them.
"""
from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from clipsql.queries.sql.cli_query import fetch_table
from clipsql.queries.sql.condition import ConditionError, check_condition
from clipsql.queries.sql.db import connect
from clipsql.store.deletions import RestoreResult, restore_ids
from clipsql.store.ledger import recover
from clipsql.store.manage import DeleteResult, delete_ids
from clipsql.store.store import Store


def ids_where(st: Store, where: str, view: str = "samples", con: Any = None) -> Any:
    """The distinct ids of `view` rows (`samples`, or the `deletions` record) matching `where`,
    on `con` when given (a caller's connection pinned to its snapshot), else on a new connection."""
    if not where.strip():
        example = "caption IS NULL" if view == "samples" else "deleted_at > '2026-01-01'"
        raise ConditionError(f"`where` is empty: give a condition on {view}, e.g. \"{example}\" "
                             f"(for every row, say `where` true)", param="where")
    own = con is None
    con = connect(st, samples_only=True) if own else con     # ids only: no model, statistics or fit is read
    try:
        where = check_condition(con, where, example="caption IS NULL" if view == "samples" else "id = 'k17'")
        tbl = fetch_table(con, f"SELECT DISTINCT id FROM {view} WHERE ({where})")
    finally:
        if own:
            con.close()
    return tbl.column("id").combine_chunks()


def delete_where(st: Store, where: str, *, dry_run: bool = False) -> DeleteResult:
    """Delete matching samples and their embeddings; returns what was (or would be) deleted."""
    with st.lock():
        recover(st)
        ids = ids_where(st, where)
        if dry_run:
            rows = {}
            for rec in st.list_models():
                rows[rec.model_id] = st.embeddings_table(rec).count_rows(filter=pc.field("id").isin(ids))
            return DeleteResult(samples=len(ids), rows=rows, dry_run=True)
        return delete_ids(st, ids, record=where)


def undelete_where(st: Store, where: str, *, dry_run: bool = False) -> RestoreResult:
    """Remove the deletions records matching `where` (SQL on the `deletions` view), so that the
    next ingest of their source restores those ids; returns how many and the sources to re-ingest."""
    with st.lock():
        recover(st)
        ids = ids_where(st, where, view="deletions")
        if dry_run:
            return RestoreResult(ids=len(ids), dry_run=True)
        return restore_ids(st, ids)
