"""Lance tables to delete, recorded in the catalog before any file is removed.

A change that lets a table go (`models rm`, a replaced or removed target, a table being
built that a kill may leave half-made) records `drop:<table>` in the `settings` table inside
its own catalog transaction; writers then delete the recorded tables (`sweep_dropped_tables`,
run by `Store.recover`). Only tables so recorded are ever deleted, so a lost or foreign
catalog can never make a writer delete data.
"""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from clipsql.store import catalog as cat
from clipsql.store.location import rmtree

DROP_PREFIX = "drop:"


def mark_for_drop(conn: sa.Connection, table: str, owner: str) -> None:
    """Record (in the caller's transaction) that Lance table `table` is to be deleted: a table being
    built (until the transaction that adopts it unmarks it) or one a committed change let go."""
    conn.execute(sa.delete(cat.settings).where(cat.settings.c.key == DROP_PREFIX + table))
    conn.execute(cat.settings.insert().values(key=DROP_PREFIX + table, value=owner))


def unmark_drop(conn: sa.Connection, table: str) -> None:
    conn.execute(sa.delete(cat.settings).where(cat.settings.c.key == DROP_PREFIX + table))


def sweep_dropped_tables(st: Any) -> list[str]:
    """Writers only: delete the Lance tables a committed `models rm` dropped (each recorded as a
    `drop:<table>` setting in its transaction). Only tables so recorded are ever deleted, so a
    lost or foreign catalog can never make a writer delete data."""
    with st.engine.connect() as conn:
        keys = [r[0] for r in conn.execute(sa.select(cat.settings.c.key).where(
            cat.settings.c.key.like(DROP_PREFIX + "%")))]
    gone = []
    for key in keys:
        table = key[len(DROP_PREFIX):]
        rmtree(st.table_uri(table))
        with st.engine.begin() as conn:
            conn.execute(sa.delete(cat.settings).where(cat.settings.c.key == key))
        gone.append(table)
    return gone
