"""The deletions record: the ids `clipsql delete` removed, so that no ingest brings them back.

`lance/deletions.lance` holds one row per deleted id: id (for content ids, the content hash
itself: the same image and caption get the same id from any path), uri, caption and source
(from the deleted sample), deleted_at (UTC) and deleted_where (the delete's --where text).

It is a Lance table versioned through the ledger like `samples`, and written in the delete's own
commit: its Append comes before the catalog transaction, which moves its version together with
the tables the rows were deleted from, so a kill leaves both or neither (the next writer's
`recover` rolls an uncommitted version back). A Lance table rather than a catalog table because
ingest checks every batch of ids against it the way it checks stored ids, an Arrow `isin`
through the table's `id` index (built by `optimize`), with no per-row Python object or SQL
parameter, and a delete of a million ids writes one Arrow data file.

Ingest (local and Ray, through `lookup`) skips recorded ids and counts them; `clipsql undelete
STORE --where SQL` removes records (in a commit of its own) and forgets the source units that
held them, so the next ingest of those sources restores the rows. doctor checks the record and
re-deletes recorded ids found stored (a repair that rolled a delete back); optimize compacts and
indexes it like the other tables.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from clipsql.lazy import lance
from clipsql.store import catalog as cat
from clipsql.store.ledger import committed_versions, set_committed_version
from clipsql.store.location import table_created
from clipsql.store.store import Store
from clipsql.store.tables import DELETIONS

TABLE = DELETIONS


def deletions_schema() -> pa.Schema:
    return pa.schema([("id", pa.string()), ("uri", pa.string()), ("caption", pa.string()), ("source", pa.string()),
                      ("deleted_at", pa.timestamp("us", tz="UTC")), ("deleted_where", pa.string())])


def table(st: Store, version: int | None = None) -> Any:
    """The record at its committed version (or `version`), or None when nothing was ever deleted."""
    if not table_created(st.table_uri(TABLE)):
        return None
    return st.dataset(TABLE, version)


def lookup(ds: Any, ids: pa.Array) -> tuple[np.ndarray, Any, Any]:
    """(which of `ids` are recorded as deleted, the earliest and latest deleted_at among them)."""
    import pyarrow.compute as pc
    n = len(ids)
    if ds is None or n == 0 or ds.count_rows() == 0:
        return np.zeros(n, dtype=bool), None, None
    found = ds.to_table(columns=["id", "deleted_at"], filter=pc.field("id").isin(ids))
    if found.num_rows == 0:
        return np.zeros(n, dtype=bool), None, None
    mask = pc.is_in(ids, value_set=found.column("id").combine_chunks()).to_numpy(zero_copy_only=False)
    at = found.column("deleted_at")
    return mask, pc.min(at).as_py(), pc.max(at).as_py()


def merge_days(days: list[str], *more: Any) -> list[str]:
    """[first day, last day] (UTC, ISO; one element when the same) of `days` and `more` (datetimes
    or ISO days; None ignored)."""
    out = set(days)
    for d in more:
        if isinstance(d, _dt.datetime):
            d = d.astimezone(_dt.timezone.utc).date().isoformat()
        if d:
            out.add(str(d))
    return sorted({min(out), max(out)}) if out else []


def deleted_phrase(n: int, days: list[str]) -> str:
    """"30 skipped: deleted on 2026-01-05" (or "deleted between … and …")."""
    when = f"on {days[0]}" if len(days) == 1 else f"between {days[0]} and {days[-1]}" if days else ""
    return f"{n} skipped: deleted {when}".rstrip()


def record_rows(st: Store, ids: pa.Array, where: str, now: float | None = None) -> pa.Table:
    """The record of deleting `ids` (uri, caption and source from their samples), ids already
    recorded left out."""
    import pyarrow.compute as pc
    have = table(st)
    if have is not None and have.count_rows():
        known = have.to_table(columns=["id"], filter=pc.field("id").isin(ids)).column("id").combine_chunks()
        if len(known):
            ids = ids.filter(pc.invert(pc.is_in(ids, value_set=known)))
    samples = st.samples_table()
    info = samples.to_table(columns=["id", "uri", "caption", "source"], filter=pc.field("id").isin(ids)) \
        if samples is not None and len(ids) else None
    n = len(ids)
    if info is not None and info.num_rows:
        idx = pc.index_in(ids, value_set=info.column("id").combine_chunks())
        uri, caption, source = (info.column(c).combine_chunks().take(idx) for c in ("uri", "caption", "source"))
    else:
        uri = caption = source = pa.nulls(n, pa.string())
    at = pa.array(np.full(n, int((now if now is not None else time.time()) * 1e6), dtype=np.int64)) \
        .cast(pa.timestamp("us", tz="UTC"))
    return pa.table({"id": ids, "uri": uri, "caption": caption, "source": source, "deleted_at": at,
                     "deleted_where": pa.array([where] * n, pa.string())}, schema=deletions_schema())


def append(st: Store, rows: pa.Table) -> int | None:
    """Append records as a new Lance version of the table (created on first use); the caller's
    catalog transaction makes it the committed one. Returns the version (None: nothing to add)."""
    if rows.num_rows == 0:
        return None
    uri = st.table_uri(TABLE)
    if not table_created(uri):
        st._create_table(TABLE, deletions_schema())
    recorded = committed_versions(st).get(TABLE)
    frags = lance.fragment.write_fragments(rows, uri, schema=deletions_schema(), max_rows_per_file=1 << 30,
                                           data_storage_version=lance.dataset(uri).data_storage_version)
    ds = lance.LanceDataset.commit(uri, lance.LanceOperation.Append(frags), read_version=recorded)
    return int(ds.version)


@dataclass
class RestoreResult:
    """What `restore_ids` / `undelete_where` let back in."""
    ids: int = 0                                         # ids removed from the deletions record
    units: int = 0                                       # source units forgotten (read again by the next ingest)
    sources: list[str] = field(default_factory=list)     # the sources to re-ingest to restore them
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def restore_ids(st: Store, ids: pa.Array) -> RestoreResult:
    """Remove `ids` from the record (the caller holds the writer lock and ran `recover`), in one
    commit that also forgets the source units that held them: the units of the sources they were
    deleted from, and of sources whose ingests skipped deleted ids (any model). The next ingest of
    those sources reads them again and restores exactly these rows."""
    import pyarrow.compute as pc
    ds = table(st)
    out = RestoreResult()
    if ds is None or len(ids) == 0:
        return out
    where = pc.field("id").isin(ids)
    gone = ds.to_table(columns=["id", "source", "deleted_at"], filter=where)
    if gone.num_rows == 0:
        return out
    sources = {s for s in pc.unique(gone.column("source")).to_pylist() if s is not None}
    since = pc.min(gone.column("deleted_at")).as_py().timestamp()
    st.dataset(TABLE, latest=True).delete(where)
    version = lance.dataset(st.table_uri(TABLE)).version
    u, r = cat.ingested_units, cat.ingest_runs
    with st.engine.begin() as conn:
        skipped_by = set()
        for source, model_id, summary in conn.execute(sa.select(r.c.source, r.c.model_id, r.c.summary).where(
                r.c.started_at >= since - 1.0)):
            try:
                if json.loads(summary or "{}").get("deleted"):
                    skipped_by.add((model_id, source))
            except ValueError:
                continue
        res = conn.execute(cat.commits.insert().values(
            model_id=None, run_id=None, kind="undelete", rows=0, sample_rows=0,
            versions=cat.to_json({TABLE: version}), created_at=time.time()))
        set_committed_version(conn, TABLE, version, int(res.inserted_primary_key[0]))
        units = 0
        if sources:
            units += conn.execute(sa.delete(u).where(u.c.source.in_(sorted(sources)))).rowcount or 0
        for model_id, source in sorted(skipped_by):
            units += conn.execute(sa.delete(u).where(u.c.model_id == model_id, u.c.source == source)).rowcount or 0
    return RestoreResult(ids=len(pc.unique(gone.column("id"))), units=units,
                         sources=sorted(sources | {s for _, s in skipped_by}))
