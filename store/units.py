"""What the ledger knows about the files of ingested units, so that a re-run plans without opening them.

Each ingested unit of a source that lists its file groups (a DataComp shard, a precomputed
metadata file with its vectors) gets a `unit_stamps` row, written in the commit transaction that
marks the unit ingested (or, for units ingested before these rows existed, when a later run finds
them done): its group's `location`, the files' total `size` and modification times, a hash of
their content and how many units (`parts`) the group has. Rows count only while their unit is
still in `ingested_units`: forgetting units (undelete, repair, `models rm`) needs no change here.
"""
from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from clipsql.store import catalog as cat


@dataclass(frozen=True)
class UnitStamp:
    variant: str        # the source kind and options, hashed: another variant is another unit
    location: str       # the group of files the unit reads
    size: int           # their total bytes
    mtime: str          # their modification times (ns), comma-separated (or etags)
    content: str        # a hash of their content
    parts: int          # units in the group


@dataclass(frozen=True)
class KnownUnit:
    unit_key: str
    stamp: UnitStamp
    rows: int
    rejected: int


def record_in(conn: sa.Connection, model_id: str, stamps: dict[str, UnitStamp]) -> None:
    """Write the stamps of units {unit_key: stamp} (in the caller's transaction)."""
    t = cat.unit_stamps
    keys = list(stamps)
    for i in range(0, len(keys), 500):
        conn.execute(sa.delete(t).where(t.c.model_id == model_id, t.c.unit_key.in_(keys[i:i + 500])))
    if keys:
        conn.execute(t.insert(), [{"model_id": model_id, "unit_key": k, "variant": s.variant,
                                   "location": s.location, "size": int(s.size), "mtime": s.mtime,
                                   "content": s.content, "parts": int(s.parts)} for k, s in stamps.items()])


def record(engine: sa.Engine, model_id: str, stamps: dict[str, UnitStamp]) -> None:
    if stamps:
        with engine.begin() as conn:
            record_in(conn, model_id, stamps)


def known(engine: sa.Engine, model_id: str, variant: str) -> dict[str, list[KnownUnit]]:
    """{location: its units the model holds}, for one source variant (one query)."""
    s, u = cat.unit_stamps, cat.ingested_units
    q = sa.select(s.c.unit_key, s.c.location, s.c.size, s.c.mtime, s.c.content, s.c.parts, u.c.rows,
                  u.c.rejected).join(u, sa.and_(u.c.model_id == s.c.model_id, u.c.unit_key == s.c.unit_key)).where(
        s.c.model_id == model_id, s.c.variant == variant)
    out: dict[str, list[KnownUnit]] = {}
    with engine.connect() as conn:
        held = conn.execute(q).all()              # one fetch, not a row at a time
    for key, loc, size, mtime, content, parts, rows, rej in held:
        out.setdefault(loc, []).append(KnownUnit(key, UnitStamp(variant, loc, int(size), mtime, content,
                                                                int(parts)), int(rows), int(rej)))
    return out
