"""Tags: a versioned `tags` table (id, tag, tagged_at), written through the ledger like any writer.

    add_tags(st, ids, "reject")       # one commit, under the writer lock
    remove_tags(st, ids, "reject")
    read(st)                          # the committed tags (or `version=`)

The table is a Lance dataset of the store (`lance/tags.lance`) whose committed version the
ledger names (`table_versions`), exactly like `samples` and the model tables, so SQL sees it as
the view `tags` at the same snapshot as everything else (`SELECT … FROM samples JOIN tags USING
(id) WHERE tag = 'reject'`). A change follows the write protocol of store.ledger: the Lance
operation first (an append, or a deletion: a new version no reader opens), then ONE catalog
transaction that inserts the `commits` row (kind `tag` / `untag`) and moves the table's
committed version. A kill between the two leaves a Lance version beyond the ledger, which the
next writer's `ledger.recover` restores away; nothing committed is ever lost.

One row per (id, tag): adding a tag an id already has, or removing one it lacks, changes
nothing. Tags are only given to ids that are samples of the store. Id sets of any size are
Arrow arrays throughout (a "select all matching the filter" of 10⁶ rows is one array).
"""
from __future__ import annotations

import time
import unicodedata
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from clipsql.errors import TagError
from clipsql.lazy import lance
from clipsql.store import catalog as cat
from clipsql.store.faults import fault
from clipsql.store.ledger import committed_versions, recover, set_committed_version
from clipsql.store.location import table_created
from clipsql.store.store import Store
from clipsql.store.tables import TAGS

TABLE = TAGS
MAX_TAG_CHARS = 200
LOOKUP_FILTER_MAX = 10_000    # id sets up to this size are looked up through a Lance filter; larger: one id scan


def tags_schema() -> pa.Schema:
    return pa.schema([("id", pa.string()), ("tag", pa.string()), ("tagged_at", pa.timestamp("us", tz="UTC"))])


def check_tag(tag: Any) -> str:
    """The tag name, stripped; refused when empty, longer than 200 characters or holding control characters."""
    if not isinstance(tag, str):
        raise TagError(f"a tag is a text name; got {type(tag).__name__}")
    name = tag.strip()
    if not name:
        raise TagError("a tag needs a name, e.g. reject or keep")
    if len(name) > MAX_TAG_CHARS:
        raise TagError(f"a tag name is at most {MAX_TAG_CHARS} characters; got {len(name)}")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise TagError(f"a tag name cannot hold control characters: {name!r}")
    return name


def id_array(ids: Iterable[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """The distinct non-NULL ids as one string array."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    arr = ids if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string())
    arr = arr.cast(pa.string())
    return pc.unique(arr.filter(pc.is_valid(arr)))


def read(st: Store, version: int | None = None) -> pa.Table:
    """Every (id, tag, tagged_at) at the committed version (or `version`)."""
    if version is None:
        version = committed_versions(st).get(TABLE)
    if version is None or not table_created(st.table_uri(TABLE)):
        return tags_schema().empty_table()
    return st.dataset(TABLE, version).to_table()


def add_tags(st: Store, ids: Iterable[str] | pa.Array, tag: str) -> dict[str, Any]:
    """Give `tag` to each of `ids` (samples of the store) in one commit; {tag, added, already, commit_id}."""
    tag = check_tag(tag)
    ids = id_array(ids)
    with st.lock():
        recover(st)
        _ensure_table(st)
        return _add_locked(st, ids, tag)


def remove_tags(st: Store, ids: Iterable[str] | pa.Array, tag: str) -> dict[str, Any]:
    """Take `tag` from each of `ids` in one commit; {tag, removed, commit_id}."""
    tag = check_tag(tag)
    ids = id_array(ids)
    with st.lock():
        recover(st)
        if not table_created(st.table_uri(TABLE)) or TABLE not in committed_versions(st) or not len(ids):
            return {"tag": tag, "removed": 0, "commit_id": None}
        ds = st.dataset(TABLE)
        have = _having(ds, ids, tag)
        if not len(have):
            return {"tag": tag, "removed": 0, "commit_id": None}
        ds.delete((pc.field("tag") == tag) & pc.field("id").isin(have))
        version = lance.dataset(st.table_uri(TABLE)).version
        fault("tags:after-lance")
        commit_id = _record(st, "untag", version, -len(have))
        return {"tag": tag, "removed": len(have), "commit_id": commit_id}


def _ensure_table(st: Store) -> None:
    if not table_created(st.table_uri(TABLE)):
        st._create_table(TABLE, tags_schema())        # recorded at its first version (empty)


def _having(ds: Any, ids: pa.Array, tag: str) -> pa.Array:
    """Those of `ids` that already carry `tag` in `ds`."""
    if len(ids) <= LOOKUP_FILTER_MAX:
        found = ds.to_table(columns=["id"], filter=(pc.field("tag") == tag) & pc.field("id").isin(ids))
    else:
        found = ds.to_table(columns=["id"], filter=pc.field("tag") == tag)
    col = found.column("id").combine_chunks()
    return ids.filter(pc.is_in(ids, value_set=col))


def _unknown(st: Store, ids: pa.Array) -> pa.Array:
    """Those of `ids` that are not samples of the store (at its committed version)."""
    samples = st.samples_table()
    if samples is None:
        return ids
    if len(ids) <= LOOKUP_FILTER_MAX:
        found = samples.to_table(columns=["id"], filter=pc.field("id").isin(ids)).column("id")
    else:
        found = samples.to_table(columns=["id"]).column("id")
    return ids.filter(pc.invert(pc.is_in(ids, value_set=found.combine_chunks())))


def _add_locked(st: Store, ids: pa.Array, tag: str) -> dict[str, Any]:
    out = {"tag": tag, "added": 0, "already": 0, "commit_id": None}
    if not len(ids):
        return out
    recorded = committed_versions(st)[TABLE]
    ds = st.dataset(TABLE, recorded)
    have = _having(ds, ids, tag)
    new = ids.filter(pc.invert(pc.is_in(ids, value_set=have))) if len(have) else ids
    out["already"] = len(have)
    if not len(new):
        return out
    unknown = _unknown(st, new)
    if len(unknown):
        shown = ", ".join(repr(x) for x in unknown.slice(0, 3).to_pylist())
        raise TagError(f"{len(unknown)} of the ids to tag are not samples of this store (e.g. {shown}); "
                       "nothing was tagged")
    n = len(new)
    now = pa.scalar(int(time.time() * 1e6), pa.timestamp("us", tz="UTC"))
    tbl = pa.table({"id": new, "tag": pa.repeat(pa.scalar(tag, pa.string()), n), "tagged_at": pa.repeat(now, n)},
                   schema=tags_schema())
    frags = lance.fragment.write_fragments(tbl, st.table_uri(TABLE), schema=tags_schema(),
                                           data_storage_version=ds.data_storage_version)
    version = lance.LanceDataset.commit(st.table_uri(TABLE), lance.LanceOperation.Append(frags), read_version=recorded).version
    fault("tags:after-lance")
    out["commit_id"] = _record(st, "tag", version, len(new))
    out["added"] = len(new)
    return out


def _record(st: Store, kind: str, version: int, rows: int) -> int:
    """The commit point: the ledger row and the table's committed version, in one transaction."""
    with st.engine.begin() as conn:
        res = conn.execute(cat.commits.insert().values(
            model_id=None, run_id=None, kind=kind, rows=0, sample_rows=0,
            versions=cat.to_json({TABLE: int(version)}), created_at=time.time()))
        commit_id = int(res.inserted_primary_key[0])
        set_committed_version(conn, TABLE, version, commit_id)
    return commit_id
