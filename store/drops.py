"""Lance tables to delete, recorded in the catalog before any file is removed.

A change that lets a table go (`models rm`, a replaced or removed target, a table being
built that a kill may leave half-made) records `drop:<table>` in the `settings` table inside
its own catalog transaction; writers then delete the recorded tables (`sweep_dropped_tables`,
run by every writer when it takes the writer lock, and by `clipsql optimize`). Only tables so
recorded are ever deleted, so a lost or foreign catalog can never make a writer delete data.

A table a reader may still hold (the tables of a model `models rm` removed: a notebook or a
server session opened before keeps querying them) is recorded with the time it was let go and
stays on disk for the retention `optimize` prunes Lance versions with (default 24 h), together
with the catalog rows of the model's fits, which such a session loads by id: the next writer
after that deletes both. A table recorded without a time (nobody reads it: a half-built or
replaced target) goes at once.
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterable

import sqlalchemy as sa

from clipsql.store import catalog as cat
from clipsql.store.location import rmtree

DROP_PREFIX = "drop:"
DEFAULT_RETENTION_HOURS = 24.0     # what `clipsql optimize` keeps: old Lance versions, dropped tables


def mark_for_drop(conn: sa.Connection, table: str, owner: str, *, keep_for_readers: bool = False,
                  fits: Iterable[int] = ()) -> None:
    """Record (in the caller's transaction) that Lance table `table` is to be deleted: a table being
    built (until the transaction that adopts it unmarks it) or one a committed change let go.
    `keep_for_readers`: keep it for the retention (sessions opened before still read it); `fits`:
    catalog fits (of a removed model) to delete with it."""
    value = {"owner": owner, "dropped_at": time.time() if keep_for_readers else None, "fits": sorted(map(int, fits))}
    conn.execute(sa.delete(cat.settings).where(cat.settings.c.key == DROP_PREFIX + table))
    conn.execute(cat.settings.insert().values(key=DROP_PREFIX + table, value=json.dumps(value)))


def unmark_drop(conn: sa.Connection, table: str) -> None:
    conn.execute(sa.delete(cat.settings).where(cat.settings.c.key == DROP_PREFIX + table))


def _record(value: str) -> dict:
    """A drop record; a plain owner string (written before records carried a time) goes at once."""
    try:
        rec = json.loads(value)
    except ValueError:
        rec = None
    if not isinstance(rec, dict):
        return {"owner": value, "dropped_at": None, "fits": []}
    return {"owner": rec.get("owner"), "dropped_at": rec.get("dropped_at"), "fits": list(rec.get("fits") or [])}


def pending_drops(conn: sa.Connection) -> dict[str, dict]:
    """{table: its drop record ({owner, dropped_at, fits})} of every table recorded for deletion."""
    rows = conn.execute(sa.select(cat.settings.c.key, cat.settings.c.value).where(
        cat.settings.c.key.like(DROP_PREFIX + "%"))).all()
    return {key[len(DROP_PREFIX):]: _record(value) for key, value in rows}


def dropped_fit_ids(conn: sa.Connection) -> set[int]:
    """Fits kept only for the readers of a removed model (deleted with its table)."""
    return {f for rec in pending_drops(conn).values() for f in rec["fits"]}


def due(rec: dict, retention_hours: float, now: float | None = None) -> bool:
    """Whether a drop record's table may be deleted now."""
    at = rec["dropped_at"]
    return at is None or (time.time() if now is None else now) - float(at) >= max(0.0, retention_hours) * 3600.0


def sweep_dropped_tables(st: Any, retention_hours: float = DEFAULT_RETENTION_HOURS, *,
                         only: Iterable[str] | None = None) -> list[str]:
    """Writers only: delete the recorded tables that are due (recorded without a time, or longer ago
    than `retention_hours`), with the fits their records name. `only`: these tables if recorded,
    whatever their age (a model registered again under its old table name)."""
    with st.engine.connect() as conn:
        drops = pending_drops(conn)
    forced = set(only or ())
    gone = []
    for table, rec in sorted(drops.items()):
        if only is not None and table not in forced:
            continue
        if only is None and not due(rec, retention_hours):
            continue
        rmtree(st.table_uri(table))
        with st.engine.begin() as conn:
            fits = rec["fits"]
            if fits:
                for t in (cat.fits, cat.fit_references, cat.stale_fits, cat.recipe_fits):
                    conn.execute(sa.delete(t).where(t.c.fit_id.in_(fits)))
            conn.execute(sa.delete(cat.settings).where(cat.settings.c.key == DROP_PREFIX + table))
        gone.append(table)
    return gone
