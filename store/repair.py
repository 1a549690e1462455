"""Repairing a Lance table whose committed version cannot be read, keeping every row that still reads.

Two kinds of damage (`clipsql doctor --repair` calls `repair_table` for each table it cannot read):

* a lost (or unreadable) data file: the manifest still opens, and every fragment that references
  other files still reads. A new Lance version without the lost fragments (a `Delete` of those
  fragment ids, committed on the committed version) keeps them: the lost file costs its own rows,
  never the rows of later commits. Rows of a lost file that an older version still holds in files
  that read (a compaction's inputs, kept until `optimize` prunes them) are read back from there
  and appended, when they have not changed since (`salvage`);
* a damaged manifest: the table goes back to the newest version whose manifest opens (the newer
  manifests are moved to STORE/quarantine/<table>/, never deleted), and that version's own lost
  fragments, if any, are dropped as above. For a damaged newest manifest this costs the rows of
  the last commit.

What was lost is then told from the ledger, never guessed from row counts: each row of a fragment
records the Lance version that created it (`_row_created_at_version`, kept through compaction),
and the ledger names the commit that made each version; rolled-back versions are the commits that
moved the table past the version kept. `forget_lost` then, in the catalog transaction that moves
the table's committed version (a `repair` commit):

* forgets the source units of those commits (units of the commit's model and source recorded by
  that commit or later, or with no commit), so re-running the ingest reads them again and adds
  exactly the missing rows (ids already stored are skipped);
* marks stale the fits computed on a version that held lost rows;
* records the loss in `lost_rows` (rows, sources to re-ingest), which later checks report.
Statistics are recomputed from what remains by the caller (doctor's statistics check).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from clipsql.store import catalog as cat
from clipsql.store.ledger import set_committed_version
from clipsql.store.location import exists, move, store_path, versions_desc
from clipsql.lazy import lance
from clipsql.store.store import Store
from clipsql.store.tables import DELETIONS, SAMPLES


@dataclass
class TableRepair:
    name: str
    version: int                                  # the version now committed
    lost_rows: int = 0
    lost_fragments: int = 0
    rolled_back_from: int | None = None           # the unreadable committed version, when rolled back
    lost_commits: list = field(default_factory=list)     # ledger commits whose rows were (partly) lost
    unknown_origin: bool = False                  # lost rows the ledger cannot attribute to a commit
    lost_versions: set = field(default_factory=set)      # Lance versions that created lost rows
    rewound: list = field(default_factory=list)   # rolled-back commits that changed rows (delete, update)
    salvaged: int = 0                             # rows of lost files read back from an older version
    rolled_back: int = 0                          # ledger commits rolled back (a damaged manifest)


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or ['?'])[0][:200]}"


# --------------------------------------------------------------------------- manifests
def manifest_path(uri: str, version: int) -> str:
    v2 = f"{uri}/_versions/{(1 << 64) - 1 - version:020d}.manifest"
    return v2 if exists(v2) else f"{uri}/_versions/{version}.manifest"


def quarantine_after(st: Store, name: str, version: int) -> list[int]:
    """Move the manifests of every version newer than `version` to STORE/quarantine/<table>/ (never
    deleted): Lance then sees `version` as the latest, and the next commit follows it."""
    uri = st.table_uri(name)
    newer = [x for x in versions_desc(uri) if x > version]
    if newer:
        q = st.path / "quarantine" / name
        q.mkdir(parents=True, exist_ok=True)
        for x in newer:
            src = manifest_path(uri, x)
            if exists(src):
                move(src, q / src.rsplit("/", 1)[-1])
        hint = store_path(f"{uri}/_versions/latest_version_hint.json")
        if hint.exists():
            hint.unlink()
    return newer


def opens(uri: str, version: int) -> Any:
    """The dataset at `version` if its manifest opens, else None."""
    try:
        return lance.dataset(uri, version=version)
    except Exception:  # noqa: BLE001 - any failure to open is what the caller handles
        return None


# --------------------------------------------------------------------------- fragments
def _full(ds: Any, path: str, sub: str = "data") -> str:
    return path if os.path.isabs(path) or "://" in path else f"{ds.uri}/{sub}/{path}"


def fragment_problem(ds: Any, frag: Any) -> str | None:
    """Why one fragment cannot be read (a data or deletion file missing, or a scan of its ids
    failing), or None."""
    for f in frag.data_files():
        p = f.path if hasattr(f, "path") else str(f)
        if not exists(_full(ds, p)):
            return f"data file {p.rsplit('/', 1)[-1]} is missing"
    dfile = frag.metadata.deletion_file
    if dfile is not None:
        try:
            dpath = dfile.path(frag.fragment_id, base_uri=ds.uri)
        except Exception:  # noqa: BLE001 - an older Lance: the scan below finds it
            dpath = None
        if dpath and not exists(dpath):
            return f"deletion file {dpath.rsplit('/', 1)[-1]} is missing"
    try:
        for _ in frag.to_batches(columns=["id"], batch_size=1 << 16):
            pass
    except Exception as e:  # noqa: BLE001 - any read failure makes the fragment lost
        return first_line(e)
    return None


def bad_fragments(ds: Any) -> list[tuple[Any, str]]:
    out = []
    for frag in ds.get_fragments():
        why = fragment_problem(ds, frag)
        if why is not None:
            out.append((frag, why))
    return out


def fragment_rows(frag: Any) -> int:
    md = frag.metadata
    return int(md.physical_rows or 0) - int(md.num_deletions or 0)


def drop_fragments(uri: str, version: int, frag_ids: list[int]) -> int:
    """A new version: `version` without the fragments `frag_ids`. Returns its number."""
    ds = lance.LanceDataset.commit(uri, lance.LanceOperation.Delete([], sorted(frag_ids), "clipsql repair: lost data files"),
                             read_version=version)
    return int(ds.version)


# --------------------------------------------------------------------------- the repair
def repair_table(st: Store, name: str, committed: int | None, ledger: list[dict]) -> TableRepair | None:
    """Make table `name` readable again, keeping every row that reads (see the module docstring).
    Returns what was done (None: no version of the table opens). The caller records it in the
    catalog with `forget_lost`; until then readers keep the committed version."""
    uri = st.table_uri(name)
    versions = versions_desc(uri)
    base = committed if committed is not None else (versions[0] if versions else None)
    out = None
    ds = opens(uri, base) if base is not None else None
    if ds is not None:
        out = TableRepair(name, base)
    else:
        for v in versions:
            if base is not None and v >= base:
                continue
            ds = opens(uri, v)
            if ds is not None:
                out = TableRepair(name, v, rolled_back_from=base)
                break
        if out is None:
            return None
        gone = rolled_back_commits(ledger, name, out.version)
        out.rolled_back = len(gone)
        out.lost_commits += [c for c in gone if c["kind"] == "append"]
        out.rewound = [c for c in gone if c["kind"] in ("delete", "update", "undelete")]
        out.lost_versions |= {int(c["versions"][name]) for c in out.lost_commits}
        if name == DELETIONS:     # the records a rolled-back delete wrote (one per deleted sample)
            out.lost_rows += sum(-int(c["sample_rows"]) for c in gone if c["kind"] == "delete")
        else:
            out.lost_rows += sum(int(c["sample_rows"] if name == SAMPLES else c["rows"]) for c in out.lost_commits)
    quarantine_after(st, name, out.version)
    bad = bad_fragments(ds)
    if not bad:
        return out
    metas, unknown = [], 0
    for frag, _ in bad:
        meta = row_versions(frag)
        if meta is None:                       # no row metadata: the rows cannot be traced or salvaged
            unknown += fragment_rows(frag)
        else:
            metas.append(meta)
    lost = pa.concat_tables(metas) if metas else None
    saved = salvage(uri, out.version, lost) if lost is not None and lost.num_rows else None
    if saved is not None and saved.num_rows:
        lost = lost.filter(pc.invert(pc.is_in(lost.column("_rowid"), value_set=saved.column("_rowid"))))
        out.salvaged = saved.num_rows
    out.lost_rows += unknown + (lost.num_rows if lost is not None else 0)
    out.unknown_origin |= bool(unknown)
    if lost is not None and lost.num_rows:
        for v in pc.unique(lost.column("_row_created_at_version")).to_pylist():
            c = commit_of_version(ledger, name, int(v))
            if c is None or c["kind"] != "append":
                out.unknown_origin = True
            elif c not in out.lost_commits:
                out.lost_commits.append(c)
            out.lost_versions.add(int(v))
    out.lost_fragments = len(bad)
    out.version = drop_fragments(uri, out.version, [f.fragment_id for f, _ in bad])
    if saved is not None and saved.num_rows:
        out.version = append_rows(uri, out.version, saved.drop_columns(["_rowid"]))
    return out


def row_versions(frag: Any) -> pa.Table | None:
    """Per row of a fragment: its stable row id and the versions that created and last changed it
    (row metadata kept in the manifest: it answers without the fragment's data file), or None
    when the table does not track them."""
    try:
        return frag.to_table(columns=["_rowid", "_row_created_at_version", "_row_last_updated_at_version"])
    except Exception:  # noqa: BLE001 - tables without stable row ids / version tracking
        return None


def salvage(uri: str, version: int, lost: pa.Table) -> pa.Table | None:
    """The lost rows that an older version still holds in files that read: a compaction rewrites
    rows into new files and keeps the old ones until `optimize` prunes them (retention), and stable
    row ids name the same row in both. A row is taken from version v only if it has not changed
    since (its last update ≤ v), so what comes back is exactly the lost row. Returns the rows
    (with `_rowid`), or None."""
    want = lost.select(["_rowid", "_row_last_updated_at_version"])
    found: list[pa.Table] = []
    for v in versions_desc(uri):
        if v >= version or want.num_rows == 0:
            continue
        want = want.filter(pc.less_equal(want.column("_row_last_updated_at_version"), v))   # older: changed since
        ds = opens(uri, v)
        if ds is None or want.num_rows == 0:
            continue
        ids = want.column("_rowid").combine_chunks()
        for frag in ds.get_fragments():
            meta = row_versions(frag)
            if meta is None or not pc.any(pc.is_in(meta.column("_rowid"), value_set=ids)).as_py():
                continue
            if fragment_problem(ds, frag) is not None:
                continue
            try:
                rows = frag.to_table(with_row_id=True)
            except Exception:  # noqa: BLE001 - unreadable here: maybe an older version has it
                continue
            rows = rows.filter(pc.is_in(rows.column("_rowid"), value_set=ids))
            if rows.num_rows:
                found.append(rows)
                want = want.filter(pc.invert(pc.is_in(want.column("_rowid"), value_set=rows.column("_rowid"))))
                ids = want.column("_rowid").combine_chunks()
            if want.num_rows == 0:
                break
    return pa.concat_tables(found) if found else None


def append_rows(uri: str, version: int, rows: pa.Table) -> int:
    """A new version: `version` plus `rows` in new data files. Returns its number."""
    ds = lance.dataset(uri, version=version)
    frags = lance.fragment.write_fragments(rows.cast(ds.schema), uri, schema=ds.schema, max_rows_per_file=1 << 30,
                                           data_storage_version=ds.data_storage_version)
    return int(lance.LanceDataset.commit(uri, lance.LanceOperation.Append(frags), read_version=version).version)


def load_ledger(st: Store) -> list[dict]:
    """Every ledger commit (oldest first), its versions parsed."""
    with st.engine.connect() as conn:
        rows = conn.execute(sa.select(cat.commits).order_by(cat.commits.c.commit_id)).all()
    out = []
    for r in rows:
        m = dict(r._mapping)
        try:
            m["versions"] = {k: int(v) for k, v in json.loads(m["versions"] or "{}").items()}
        except (ValueError, TypeError, AttributeError):
            m["versions"] = {}
        out.append(m)
    return out


def commit_of_version(ledger: list[dict], name: str, version: int) -> dict | None:
    """The commit that made `version` of table `name`: the newest naming it (a repair that rolled a
    table back reuses the version numbers of the commits it lost)."""
    for c in reversed(ledger):
        if c["versions"].get(name) == version:
            return c
    return None


def rolled_back_commits(ledger: list[dict], name: str, kept: int) -> list[dict]:
    """Commits that moved table `name` past version `kept` after the commit that made a version ≤ kept."""
    start = 0
    for i, c in enumerate(ledger):
        if name in c["versions"] and c["versions"][name] <= kept:
            start = i + 1
    return [c for c in ledger[start:] if c["versions"].get(name, -1) > kept]


def forget_lost(conn: sa.Connection, st: Store, rep: TableRepair, model_of_table: dict[str, str]) -> dict:
    """In the caller's transaction: commit the repaired version, forget the source units of the
    lost rows, mark the fits that covered them stale and record the loss. Returns
    {"units": n, "sources": [...], "models": [...], "stale_fits": [...], "commit_id": id}."""
    model = model_of_table.get(rep.name)           # None for samples
    res = conn.execute(cat.commits.insert().values(
        model_id=model, run_id=None, kind="repair",
        rows=-rep.lost_rows if model else 0, sample_rows=-rep.lost_rows if rep.name == SAMPLES else 0,
        versions=cat.to_json({rep.name: rep.version}), created_at=time.time()))
    commit_id = int(res.inserted_primary_key[0])
    set_committed_version(conn, rep.name, rep.version, commit_id)
    out = {"units": 0, "sources": [], "models": [], "stale_fits": [], "commit_id": commit_id}
    if not rep.lost_rows:
        return out
    if rep.name == DELETIONS:    # lost records: no source unit holds them
        conn.execute(cat.lost_rows.insert().values(
            table_name=rep.name, model_id=None, rows=rep.lost_rows, sources="[]", units=0, detail=describe(rep),
            created_at=time.time()))
        return out
    u = cat.ingested_units
    forgotten: dict[str, set] = {}                 # model → sources
    units = 0
    for c in rep.lost_commits:
        m = c["model_id"]
        if m is None:
            continue
        sources = set(conn.execute(sa.select(u.c.source).where(u.c.commit_id == c["commit_id"])).scalars())
        if c["run_id"] is not None:
            run_src = conn.execute(sa.select(cat.ingest_runs.c.source).where(
                cat.ingest_runs.c.run_id == c["run_id"])).scalar()
            if run_src is not None:
                sources.add(run_src)
        if not sources:
            continue
        cond = sa.and_(u.c.model_id == m, u.c.source.in_(sorted(sources)),
                       sa.or_(u.c.commit_id >= c["commit_id"], u.c.commit_id.is_(None)))
        units += conn.execute(sa.delete(u).where(cond)).rowcount or 0
        forgotten.setdefault(m, set()).update(sources)
    if rep.unknown_origin or not forgotten:
        # rows the ledger cannot attribute: forget every unit of the models that may have held them
        models = [model] if model else [r[0] for r in conn.execute(sa.select(cat.models.c.model_id))]
        for m in models:
            sources = set(conn.execute(sa.select(u.c.source).where(u.c.model_id == m).distinct()).scalars())
            units += conn.execute(sa.delete(u).where(u.c.model_id == m)).rowcount or 0
            forgotten.setdefault(m, set()).update(sources)
    if model is not None:
        lowest = None if rep.unknown_origin else min(rep.lost_versions, default=None)
        out["stale_fits"] = _stale_fits(conn, model, lowest,
                                        f"{rep.lost_rows} of its rows were lost (a damaged Lance file, repaired)")
    how = describe(rep)
    now = time.time()
    for m, sources in (forgotten.items() or [(model, set())]):
        conn.execute(cat.lost_rows.insert().values(
            table_name=rep.name, model_id=m, rows=rep.lost_rows, sources=cat.to_json(sorted(sources)),
            units=units, detail=how, created_at=now))
    out.update(units=units, sources=sorted({s for v in forgotten.values() for s in v}), models=sorted(forgotten))
    return out


def describe(rep: TableRepair) -> str:
    parts = []
    if rep.rolled_back_from is not None:
        parts.append(f"version {rep.rolled_back_from} unreadable: rolled back past {rep.rolled_back} commit(s)")
    if rep.lost_fragments:
        parts.append(f"{rep.lost_fragments} fragment(s) whose data could not be read dropped"
                     + (f", {rep.salvaged} of their rows read back from an older version" if rep.salvaged else ""))
    return "; ".join(parts) or "nothing lost"


def _stale_fits(conn: sa.Connection, model_id: str, lowest_version: int | None, why: str) -> list[int]:
    """Mark stale every fit of `model_id` computed on a version holding a lost row (one made at a
    version ≥ `lowest_version`; None: every fit)."""
    fits = conn.execute(sa.select(cat.fits.c.fit_id, cat.fits.c.options).where(cat.fits.c.model_id == model_id)).all()
    known = {r[0] for r in conn.execute(sa.select(cat.stale_fits.c.fit_id))}
    out = []
    for fit_id, options in fits:
        try:
            v = json.loads(options).get("data_version")
        except ValueError:
            v = None
        if fit_id in known or (lowest_version is not None and v is not None and int(v) < lowest_version):
            continue
        conn.execute(cat.stale_fits.insert().values(fit_id=fit_id, reason=why, created_at=time.time()))
        out.append(fit_id)
    return out


def open_losses(conn: sa.Connection) -> list[dict]:
    """Recorded losses not yet followed by an ingest of their model that finished (a re-run of the
    ingest restores the rows; until then doctor reports them)."""
    r = cat.ingest_runs
    out = []
    for row in conn.execute(sa.select(cat.lost_rows).order_by(cat.lost_rows.c.loss_id)).all():
        m = dict(row._mapping)
        m["sources"] = json.loads(m["sources"] or "[]")
        q = sa.select(sa.func.count()).select_from(r).where(
            r.c.status == "done", r.c.started_at > m["created_at"])
        if m["model_id"] is not None:
            q = q.where(r.c.model_id == m["model_id"])
        if m["sources"]:
            q = q.where(r.c.source.in_(m["sources"]))
        done = conn.execute(q).scalar()
        if not done:
            out.append(m)
    return out


def loss_hint(losses: list[dict]) -> str:
    """What restores the rows of `losses`: the ingest(s) to re-run."""
    sources = sorted({s for m in losses for s in m["sources"]})
    when = time.strftime("%Y-%m-%d", time.localtime(min(m["created_at"] for m in losses)))
    what = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
    return (f"lost by the repair of {when}; re-run `clipsql ingest STORE {what}` (with the model and options used "
            "before) to restore them" if sources else
            f"lost by the repair of {when}; re-run the ingest of their source to restore them")
