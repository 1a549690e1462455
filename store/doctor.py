"""`clipsql doctor STORE [--repair]`: check a store the way a database checks itself after a crash.

Checks (each a `Finding`, level ok / warn / error):

* formats: clipsql.json and the catalog's schema version;
* the catalog: SQLite's `PRAGMA integrity_check` (other databases: that it answers);
* the ledger against Lance: every table the ledger names exists and its committed version
  opens and scans; versions beyond it (a writer killed before its catalog transaction) are
  a warning, rolled back by the next writer or by --repair;
* rows: per table the row count and distinct ids; embeddings without a sample and samples a
  model does not hold, reported as lost (warn) while a repair's recorded loss explains them,
  else as an error (embeddings without a sample) or ok (samples `models rm` left);
* statistics: recomputed from the stored vectors (streamed, float64) and compared with the
  catalog's; fits (their model exists) and targets (their table holds their rows);
* runs left `running` by a killed process; tables a committed `models rm` dropped.

`--repair` (under the writer lock): rolls tables back to the ledger; a table whose committed
version cannot be read keeps every row that still reads (store.repair: fragments whose data
file is lost are dropped, a damaged manifest goes back to the newest that opens, quarantined in
STORE/quarantine/, never deleted), the source units of the lost rows are forgotten so that
re-running the ingest restores them, fits that covered them are marked stale and the loss is
recorded and reported (`lost_rows`); intact embeddings are never deleted. It then recomputes
the statistics, marks dead runs aborted, sweeps dropped tables, and rebuilds a lost or damaged
catalog from the Lance data (models from each table's recorded model record, committed
versions, statistics; fits, targets and the ingested-unit ledger are reported lost: re-run
`stats fit`, `target add`; a re-ingest re-reads its sources and adds nothing twice). Each step
is reported.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from clipsql.errors import CatalogDamaged, CatalogError, ClipsqlError, MarkerDamaged
from clipsql.lazy import duckdb, lance
from clipsql.store import catalog as cat
from clipsql.store import deletions
from clipsql.store.drops import DEFAULT_RETENTION_HOURS, dropped_fit_ids, due, pending_drops, sweep_dropped_tables
from clipsql.store.fit_rows import get_fit, latest_fit
from clipsql.store.ledger import committed_versions, recover, set_committed_version
from clipsql.store.location import exists, is_remote, move, store_path, table_created
from clipsql.store.locks import lease_holder
from clipsql.store.manage import delete_ids
from clipsql.store.marker import FORMAT_VERSION, read_marker, write_marker
from clipsql.store.repair import (describe, first_line, forget_lost, load_ledger, loss_hint, manifest_path,
                                  open_losses, quarantine_after, repair_table, versions_desc)
from clipsql.kernels.arrays import to_numpy
from clipsql.store.fits import ARRAY_KEYS
from clipsql.store.runs import abort_dead_runs
from clipsql.store.stats import StatsState, recompute_stats, refresh_stats, saved_stats
from clipsql.store.tables import DELETIONS, SAMPLES, TAGS, is_embeddings_table, is_target_table, stored_table_name
from clipsql.store.targets import get_target
from clipsql.store.store import MODEL_METADATA_KEY, Store, default_catalog
from clipsql.store.reads import for_duckdb

STATS_RTOL = 1e-6       # relative agreement of the catalog's statistics with a recomputation


@dataclass
class Finding:
    check: str
    level: str              # ok | warn | error
    detail: str
    repaired: str | None = None


@dataclass
class Report:
    store: str
    findings: list[Finding] = field(default_factory=list)
    repair: bool = False
    unreadable: set = field(default_factory=set)     # tables the later checks must not scan
    lost_rows: int = 0                               # rows this repair could not keep
    missing: int = 0                                 # warnings about lost rows (a re-ingest restores them)

    def add(self, check: str, level: str, detail: str, repaired: str | None = None) -> Finding:
        f = Finding(check, level, detail, repaired)
        self.findings.append(f)
        return f

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error" and not f.repaired]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warn" and not f.repaired]

    @property
    def consistent(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"store": self.store, "consistent": self.consistent, "repair": self.repair,
                "errors": len(self.errors), "warnings": len(self.warnings), "lost_rows": self.lost_rows,
                "findings": [asdict(f) for f in self.findings]}


def doctor(path: str | os.PathLike, repair: bool = False) -> Report:
    path = store_path(path)
    report = Report(str(path), repair=repair)
    try:
        marker = read_marker(path)      # a missing / newer clipsql.json is a one-line refusal
    except MarkerDamaged as e:
        if not repair:
            report.add("format", "error", str(e))
            return report
        marker = _rebuild_marker(path, report, str(e).split(": `clipsql doctor")[0])
    else:
        report.add("format", "ok", f"clipsql.json format {marker.get('format', FORMAT_VERSION)}")
    url = os.environ.get("CLIPSQL_CATALOG_URL") or marker.get("catalog") or default_catalog(path)
    st = Store(path, url)
    lost = _catalog_problem(st, marker, path)
    if lost and not repair:
        report.add("catalog", "error", lost + " — `clipsql doctor STORE --repair` rebuilds it from the Lance data")
        return report
    if not repair:
        version = cat.schema_version(st.engine)
        if version < cat.SCHEMA_VERSION:
            report.add("catalog", "warn", f"schema version {version} < {cat.SCHEMA_VERSION}: the next writer (or "
                                          "`repair=True`) migrates it")
            return report
        report.add("catalog", "ok", f"{cat.safe_url(st.engine.url)} (schema {version})")
        _check(st, report, repair=False)
        return report
    with st.lock():
        if lost:
            st = _rebuild_catalog(st, marker, path, report, lost)
        else:
            report.add("catalog", "ok", f"{cat.safe_url(st.engine.url)} (schema {cat.schema_version(st.engine)})")
        cat.migrate(st.engine)
        _check(st, report, repair=True)
    return report


# --------------------------------------------------------------------------- the catalog
def _rebuild_marker(path: Path, report: Report, why: str) -> dict:
    """Rewrite a damaged clipsql.json from the catalog (catalog.sqlite inside the store, or
    CLIPSQL_CATALOG_URL), which records the store id; a one-line refusal when it cannot."""
    given = os.environ.get("CLIPSQL_CATALOG_URL")
    if not given and (is_remote(path) or not (path / "catalog.sqlite").exists()):
        raise MarkerDamaged(f"{why}, and there is no catalog.sqlite in the store to rebuild it from: set "
                            "CLIPSQL_CATALOG_URL to the store's catalog database and re-run `clipsql doctor "
                            f"{path} --repair`")
    st = Store(path, given or default_catalog(path))
    try:
        store_id = st.get_setting("store_id")
    except (sa.exc.DatabaseError, UnicodeDecodeError, ValueError) as e:
        raise MarkerDamaged(f"{why}, and the catalog cannot be read either ({first_line(getattr(e, 'orig', e))}): "
                            "restore both from a backup") from None
    if not isinstance(store_id, str) or not store_id:
        raise MarkerDamaged(f"{why}, and the catalog holds no store id to rebuild it from: restore it from a backup")
    with st.lock():
        marker = write_marker(path, given, store_id)
    st.engine.dispose()
    f = report.add("format", "error", why)
    f.repaired = f"rewritten from the catalog (store id {store_id})"
    return marker


def _catalog_problem(st: Store, marker: dict, path: Path) -> str | None:
    """Why the catalog cannot be used (missing, damaged, empty, another store's), or None."""
    if not marker.get("catalog") and not os.environ.get("CLIPSQL_CATALOG_URL") and not is_remote(path) \
            and not (path / "catalog.sqlite").exists():
        return f"the catalog {path / 'catalog.sqlite'} is missing"
    try:
        if st.engine.dialect.name == "sqlite":
            with st.engine.connect() as conn:
                res = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check").fetchall()]
            if res != ["ok"]:
                return f"the catalog fails SQLite's integrity check ({'; '.join(res[:3])})"
        version = cat.schema_version(st.engine)
        if version > cat.SCHEMA_VERSION:
            raise CatalogError(f"the catalog has schema version {version}, newer than this clipsql "
                               f"understands ({cat.SCHEMA_VERSION}): upgrade clipsql")
        owner = st.get_setting("store_id")
    except CatalogError:
        raise
    except (sa.exc.DatabaseError, UnicodeDecodeError, ValueError) as e:
        return f"the catalog cannot be read ({(str(getattr(e, 'orig', e)).splitlines() or ['?'])[0][:200]})"
    if owner is None:
        return "the catalog holds no store (deleted or emptied)"
    if marker.get("store_id") and owner != marker["store_id"]:
        raise CatalogError("the catalog belongs to another store (its store id differs from clipsql.json): "
                           "point CLIPSQL_CATALOG_URL at this store's catalog; doctor will not overwrite it")
    return None


def _rebuild_catalog(st: Store, marker: dict, path: Path, report: Report, why: str) -> Store:
    """A new catalog from the Lance data: models (each table's recorded model record), committed
    versions (the newest readable), statistics (recomputed); the rest reported lost."""
    if st.engine.dialect.name == "sqlite" and not marker.get("catalog"):
        st.engine.dispose()
        old = path / "catalog.sqlite"
        kept = None
        if old.exists():
            kept = path / "quarantine" / f"catalog.sqlite.{int(time.time())}"
            kept.parent.mkdir(exist_ok=True)
            shutil.move(str(old), kept)
            for side in ("-wal", "-shm"):
                Path(str(old) + side).unlink(missing_ok=True)
        st = Store(path, default_catalog(path))
    cat.migrate(st.engine)
    if st.get_setting("store_id") is None:
        st.set_setting("store_path", str(path.resolve()))
        st.set_setting("store_id", marker.get("store_id") or "")
    models, skipped = [], []
    for name in st.table_names():
        if not is_embeddings_table(name):
            continue
        good = _newest_readable(st, name, None, report, repair=True)
        if good is None:
            continue
        ds = lance.dataset(st.table_uri(name), version=good)
        meta = (ds.schema.metadata or {}).get(MODEL_METADATA_KEY.encode())
        if meta is None:
            skipped.append(name)
            continue
        m = json.loads(meta)
        with st.engine.begin() as conn:
            conn.execute(cat.models.insert().values(
                model_id=m["model_id"], table_name=name, kind=m["kind"], dim=int(m["dim"]),
                logit_scale=float(m["logit_scale"]), logit_bias=m["logit_bias"], context_length=m["context_length"],
                spec=cat.to_json(m["spec"]), created_at=time.time()))
            set_committed_version(conn, name, good, None)
        models.append(m["model_id"])
    for name in (SAMPLES, DELETIONS, TAGS):
        if table_created(st.table_uri(name)):
            good = _newest_readable(st, name, None, report, repair=True)
            if good is not None:
                with st.engine.begin() as conn:
                    set_committed_version(conn, name, good, None)
    if models:
        st.set_setting("default_model", models[0])
    targets = [n for n in st.table_names() if is_target_table(n)]
    lost = "fits, targets (" + (", ".join(targets) or "none") + ") and the ingested-unit ledger are lost: " \
           "re-run `clipsql stats fit` and `clipsql target add`; a re-ingest re-reads its sources and adds nothing twice"
    note = f"; tables without a model record (written before clipsql recorded one): {', '.join(skipped)}" if skipped else ""
    report.add("catalog", "error", why, repaired=f"rebuilt from the Lance data: models {models or 'none'}; {lost}{note}")
    return st


# --------------------------------------------------------------------------- Lance tables
def _scan_ok(ds: Any) -> str | None:
    """None if every data file of this version exists and its ids scan, else why not."""
    for frag in ds.get_fragments():
        for f in frag.data_files():
            p = f.path if hasattr(f, "path") else str(f)
            full = p if os.path.isabs(p) or "://" in p else f"{ds.uri}/data/{p}"
            if not exists(full):
                return f"data file {full.rsplit('/', 1)[-1]} is missing"
    try:
        for _ in ds.to_batches(columns=["id"], batch_size=1 << 16):
            pass
    except Exception as e:  # noqa: BLE001 - any read failure is what doctor reports
        return first_line(e)
    return None


_versions_desc, _manifest_path = versions_desc, manifest_path


def _newest_readable(st: Store, name: str, limit: int | None, report: Report, repair: bool) -> int | None:
    """The newest version ≤ `limit` that opens and scans; with `repair`, the manifests of every newer
    version are moved to STORE/quarantine/<table>/ (Lance then sees the good version as the latest)."""
    uri = st.table_uri(name)
    versions = [v for v in _versions_desc(uri) if limit is None or v <= limit]
    for v in versions:
        try:
            why = _scan_ok(lance.dataset(uri, version=v))
        except Exception as e:  # noqa: BLE001
            why = first_line(e)
        if why is None:
            if repair:
                quarantine_after(st, name, v)
            return v
    report.add(f"table {name}", "error", "no version of this table can be read")
    return None


def _check_tables(st: Store, report: Report, repair: bool) -> None:
    recorded = committed_versions(st)
    names = [n for n in (SAMPLES, DELETIONS) if table_created(st.table_uri(n))] \
        + [m.table_name for m in st.list_models()] + ([TAGS] if table_created(st.table_uri(TAGS)) else [])      # a model's table must exist: checked below
    ledger = load_ledger(st) if repair else []
    for name in names:
        uri = st.table_uri(name)
        check = f"table {name}"
        if not exists(uri):
            report.add(check, "error", "the catalog names it but its Lance directory is missing")
            continue
        v = recorded.get(name)
        try:
            why = _scan_ok(lance.dataset(uri, version=v))
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {(str(e).splitlines() or ['?'])[0][:200]}"
        latest = _versions_desc(uri)[0] if _versions_desc(uri) else None
        if why is not None:
            f = report.add(check, "error", f"committed version {v} cannot be read: {why}")
            report.unreadable.add(name)
            if repair:
                _repair_table(st, name, v, f, report, ledger)
            continue
        if latest is not None and v is not None and latest > v:
            f = report.add(check, "warn", f"Lance versions {v + 1}..{latest} are not in the ledger (a writer killed "
                                          "before its catalog transaction): the next writer rolls them back")
            if repair:
                rolled = recover(st).get(name)
                f.repaired = f"rolled back to the committed version ({rolled or 0} uncommitted rows dropped)"
            continue
        report.add(check, "ok", f"version {v}, {lance.dataset(uri, version=v).count_rows()} rows")


def _repair_table(st: Store, name: str, version: int | None, f: Finding, report: Report, ledger: list) -> None:
    """Keep every row of table `name` that still reads (store.repair), record what was lost in the
    same catalog transaction that commits the repaired version, and report it."""
    rep = repair_table(st, name, version, ledger)
    why = "no version of this table opens"
    if rep is not None:
        try:
            why = _scan_ok(lance.dataset(st.table_uri(name), version=rep.version))
        except Exception as e:  # noqa: BLE001
            why = first_line(e)
    if why is not None:
        f.repaired = None
        report.add(f"table {name}", "error", f"cannot be repaired: {why}")
        return
    models = {m.table_name: m.model_id for m in st.list_models()}
    with st.engine.begin() as conn:
        res = forget_lost(conn, st, rep, models)
    report.unreadable.discard(name)
    report.lost_rows += rep.lost_rows
    rewound = "".join(f"; commit #{c['commit_id']} ({c['kind']}) was rolled back" + (
        ": re-run the ingest with --update to rewrite its captions again" if c["kind"] == "update" else "")
        for c in rep.rewound)
    f.repaired = (f"{describe(rep)}; version {rep.version} committed, every row that reads kept ({rep.lost_rows} lost"
                  + (f"; the unreadable manifests are in STORE/quarantine/{name}/" if rep.rolled_back_from is not None
                     else "") + ")" + rewound)
    if not rep.lost_rows:
        return
    if name == DELETIONS:
        report.add(f"lost rows {name}", "warn", f"{rep.lost_rows} deletion records could not be kept "
                   f"({describe(rep)}): ingest no longer skips those ids; delete them again if they come back")
        return
    what = "samples" if name == SAMPLES else f"embedding rows of {models.get(name, name)}"
    kept = "; their embeddings are kept" if name == SAMPLES else ""
    units = (f"; {res['units']} source unit(s) forgotten: re-run `clipsql ingest STORE "
             f"{' / '.join(res['sources'][:3]) or 'SOURCE'}` (same model and options) to restore them"
             if res["units"] else "; re-run the ingest of their source to restore them")
    stale = (f"; fit(s) {', '.join('#' + str(x) for x in res['stale_fits'])} covered them and are now stale"
             if res["stale_fits"] else "")
    report.add(f"lost rows {name}", "warn",
               f"{rep.lost_rows} {what} could not be kept ({describe(rep)}){kept}{units}{stale}")


def _rows_at(uri: str, version: int | None) -> int:
    try:
        return lance.dataset(uri, version=version).count_rows()
    except Exception:  # noqa: BLE001
        return -1


def _check_rows(st: Store, report: Report, repair: bool) -> None:
    """Row counts and duplicate ids per table; embeddings without a sample and samples a model does
    not hold, explained by the losses a repair recorded. Intact embeddings are never deleted: rows
    whose sample was lost are kept, and the ingest that wrote them restores the sample."""
    samples = st.samples_table() if SAMPLES not in report.unreadable else None
    con = duckdb.connect()
    if samples is not None:
        con.register("s", samples)
        n, distinct = con.sql("SELECT count(*), count(DISTINCT id) FROM s").fetchall()[0]
        report.add("rows samples", "ok" if n == distinct else "error",
                   f"{n} rows, {distinct} distinct ids" + ("" if n == distinct else f": {n - distinct} duplicated"))
    with st.engine.connect() as conn:
        losses = open_losses(conn)
    held, explained = [], False
    for i, rec in enumerate(st.list_models()):
        if rec.table_name in report.unreadable:
            continue
        ds = st.embeddings_table(rec)
        con.register(f"e{i}", for_duckdb(ds))
        held.append(f"SELECT id FROM e{i}")
        n, distinct = con.sql(f"SELECT count(*), count(DISTINCT id) FROM e{i}").fetchall()[0]
        report.add(f"rows {rec.model_id}", "ok" if n == distinct else "error",
                   f"{n} rows, {distinct} distinct ids" + ("" if n == distinct else f": {n - distinct} duplicated"))
        if samples is None:
            continue
        orphans = con.sql(f"SELECT count(*) FROM e{i} ANTI JOIN s USING (id)").fetchall()[0][0]
        if orphans:
            mine = [x for x in losses if x["table_name"] == SAMPLES]
            if mine:
                report.missing += 1
                report.add(f"orphans {rec.model_id}", "warn", f"{orphans} embedding rows have no sample: their "
                           f"samples were {loss_hint(mine)} (the embeddings are kept)")
            else:
                f = report.add(f"orphans {rec.model_id}", "error", f"{orphans} embedding rows have no sample")
                if repair:
                    f.repaired = _forget_for_orphans(st, rec, orphans)
        mine = [x for x in losses if x["table_name"] == rec.table_name]
        if mine:
            unheld = con.sql(f"SELECT count(*) FROM s ANTI JOIN e{i} USING (id)").fetchall()[0][0]
            if unheld:
                explained = True
                report.missing += 1
                report.add(f"samples without embeddings {rec.model_id}", "warn",
                           f"{unheld} samples have no {rec.model_id} embedding: "
                           f"{sum(x['rows'] for x in mine)} rows were {loss_hint(mine)}")
    if samples is not None and held:
        unheld = con.sql(f"SELECT count(*) FROM s ANTI JOIN ({' UNION ALL '.join(held)}) USING (id)").fetchall()[0][0]
        if not (explained and unheld):
            report.add("samples without embeddings", "ok",
                       f"{unheld} samples no model holds" + (" (left by `models rm`, or a model's rejects)"
                                                             if unheld else ""))
    con.close()


def _forget_for_orphans(st: Store, rec: Any, orphans: int) -> str:
    """Embedding rows whose sample is gone for no recorded reason: keep them, forget the model's
    source units (which of them held the rows is unknown) so that its next ingests restore the
    samples, and record the loss."""
    import time
    u = cat.ingested_units
    with st.engine.begin() as conn:
        sources = sorted(set(conn.execute(sa.select(u.c.source).where(u.c.model_id == rec.model_id).distinct())
                             .scalars()))
        units = conn.execute(sa.delete(u).where(u.c.model_id == rec.model_id)).rowcount or 0
        conn.execute(cat.lost_rows.insert().values(
            table_name=SAMPLES, model_id=rec.model_id, rows=orphans, sources=cat.to_json(sources), units=units,
            detail="embedding rows without a sample", created_at=time.time()))
    return (f"kept them; forgot the {units} source unit(s) of {rec.model_id} so that re-running its ingests "
            "restores their samples")


def _check_stats(st: Store, report: Report, repair: bool) -> None:
    for rec in st.list_models():
        if rec.table_name in report.unreadable:
            report.add(f"statistics {rec.model_id}", "warn", "not checked: the table cannot be read")
            continue
        check = f"statistics {rec.model_id}"
        try:
            stored = saved_stats(st, rec)
        except CatalogDamaged as e:
            f = report.add(check, "error", str(e).split(": run `")[0])
            if repair:
                refresh_stats(st, rec)
                f.repaired = "recomputed from the stored vectors"
            continue
        fresh = recompute_stats(st, rec)
        why = _moments_differ(stored, fresh)
        if why is None:
            report.add(check, "ok", f"current: cover all {fresh.n} rows and equal a recomputation")
            continue
        f = report.add(check, "error", why)
        if repair:
            refresh_stats(st, rec)
            f.repaired = "recomputed from the stored vectors"


def _moments_differ(a: StatsState, b: StatsState) -> str | None:
    for key, mb in b.moments.items():
        ma = a.moments[key]
        if ma.n != mb.n:
            return f"{key[0]} {key[1]} statistics cover {ma.n} rows, the table holds {mb.n}"
        if mb.n == 0:
            continue
        if not np.allclose(ma.mean, mb.mean, rtol=STATS_RTOL, atol=STATS_RTOL * (np.abs(mb.mean).max() + 1e-12)):
            return f"{key[0]} {key[1]} mean differs from a recomputation"
        if ma.second and mb.second:
            scale = np.abs(mb.cov).max() + 1e-12
            if not np.allclose(ma.cov, mb.cov, rtol=STATS_RTOL, atol=STATS_RTOL * scale):
                return f"{key[0]} {key[1]} covariance differs from a recomputation"
    return None


def _check_fits_targets(st: Store, report: Report, repair: bool) -> None:
    """Every fit's arrays and reference sample and every target's second moment are read back
    (damaged bytes fail here, not in the scores); what cannot be read is dropped (a fit: refit) or
    recomputed from the target's rows."""
    known = {m.model_id for m in st.list_models()}
    with st.engine.connect() as conn:
        fits = conn.execute(sa.select(cat.fits.c.fit_id, cat.fits.c.model_id)).all()
        targets = conn.execute(sa.select(cat.targets.c.name, cat.targets.c.table_name, cat.targets.c.n)).all()
        refs = {r[0] for r in conn.execute(sa.select(cat.fit_references.c.fit_id))}
        kept = dropped_fit_ids(conn)      # fits of a removed model, kept for sessions opened before
    fits = [(f, m) for f, m in fits if f not in kept]
    bad = [f for f, m in fits if m not in known or f not in refs]
    report.add("fits", "error" if bad else "ok",
               f"{len(fits)} fits" + (f"; #{', #'.join(map(str, bad))} lack their model or reference" if bad else ""))
    for fit_id, model_id in fits:
        if fit_id in bad:
            continue
        why = _unreadable_fit(st, fit_id)
        if why is None:
            continue
        f = report.add(f"fit #{fit_id}", "error", why)
        if repair:
            f.repaired = _drop_fit(st, fit_id, model_id)
    names = set(st.table_names())
    for name, table, n in targets:
        if table not in names:
            report.add(f"target {name}", "error", f"its table {table} is missing: re-add it with `clipsql target add`")
            continue
        rows = _rows_at(st.table_uri(table), None)
        if rows != n:
            report.add(f"target {name}", "error", f"{rows} rows, the catalog says {n}")
            continue
        why = _target_moment_problem(st, name, table)
        if why is None:
            report.add(f"target {name}", "ok", f"{rows} rows, the catalog says {n}")
            continue
        f = report.add(f"target {name}", "error", why)
        if repair:
            with st.engine.begin() as conn:
                conn.execute(sa.update(cat.targets).where(cat.targets.c.name == name).values(
                    second_moment=cat.pack(_moment_of(st, table))))
            f.repaired = ("its second moment recomputed from the target's stored rows (float32: NormSim2 within "
                          "about 1e-7 relative of the original; re-add the target for the exact value)")


def _unreadable_fit(st: Store, fit_id: int) -> str | None:
    """Why a fit's catalog row cannot be used (damaged arrays, reference or options), or None."""
    try:
        row = get_fit(st, fit_id, with_arrays=True, with_reference=True)
    except CatalogDamaged as e:
        return str(e).split(": run `")[0]
    if row is None:
        return None
    lacks = [k for k in (*ARRAY_KEYS, "X_ref_raw", "Y_ref_raw") if k not in row.arrays]
    if lacks or not isinstance(row.options, dict):
        return f"fit #{fit_id} lacks {', '.join(lacks) or 'its options'}"
    return None


def _drop_fit(st: Store, fit_id: int, model_id: str) -> str:
    """Remove an unreadable fit from the catalog; says what used it and what to do."""
    with st.engine.begin() as conn:
        conn.execute(sa.delete(cat.fits).where(cat.fits.c.fit_id == fit_id))
        for table in (cat.fit_references, cat.stale_fits, cat.recipe_fits):
            conn.execute(sa.delete(table).where(table.c.fit_id == fit_id))
    used = ""
    rec = next((m for m in st.list_models() if m.model_id == model_id), None)
    stored = stored_table_name(rec.table_name) if rec is not None else None
    if stored is not None and stored in st.table_names():
        try:
            n = st.dataset(stored, latest=True).count_rows(filter=f"fit_id = {int(fit_id)}")
        except Exception:  # noqa: BLE001 - a table without fit_id: nothing computed with a fit
            n = 0
        if n:
            used = f"; {n} stored score rows were computed with it and are stale: re-run `clipsql score`"
    after = latest_fit(st, rec, with_arrays=False) if rec is not None else None
    now = (f"; scores of {model_id} now use the older fit #{after.fit_id}: refit with `clipsql stats fit "
           f"{st.path} --model {model_id}`" if after is not None else
           f"; {model_id} has no fit now: refit with `clipsql stats fit {st.path} --model {model_id}`")
    return "dropped" + used + now


def _moment_of(st: Store, table: str) -> np.ndarray:
    """F_t^T F_t (float64) of a target's stored rows, streamed."""
    S = None
    for batch in lance.dataset(st.table_uri(table)).to_batches(columns=["vector"], batch_size=16_384):
        X = to_numpy(batch.column("vector")).astype(np.float64)
        S = X.T @ X if S is None else S + X.T @ X
    return S if S is not None else np.zeros((0, 0))


def _target_moment_problem(st: Store, name: str, table: str) -> str | None:
    """Why a target's stored second moment cannot be used: unreadable, or not that of its rows
    (float32 rows: equal within 1e-5 of the largest entry)."""
    try:
        S = get_target(st, name).second_moment
    except CatalogDamaged as e:
        return str(e).split(": run `")[0]
    fresh = _moment_of(st, table)
    if S is None or S.shape != fresh.shape or not np.all(np.isfinite(S)) or \
            not np.allclose(S, fresh, rtol=1e-5, atol=1e-5 * (np.abs(fresh).max() + 1e-12)):
        return f"the second moment of target {name!r} in the catalog is not that of its stored rows (damaged)"
    return None


def _check_runs(st: Store, report: Report, repair: bool) -> None:
    with st.engine.connect() as conn:
        running = [r[0] for r in conn.execute(sa.select(cat.ingest_runs.c.run_id).where(
            cat.ingest_runs.c.status == "running"))]
        drops = pending_drops(conn)
    if running:
        holder = _lock_holder(st)
        if holder is None or repair:
            f = report.add("runs", "warn", f"run(s) {running} are `running` but no writer holds the lock (killed)")
            if repair:
                dead = abort_dead_runs(st.engine)
                f.repaired = f"marked {dead} aborted, counts from the ledger"
        else:
            report.add("runs", "ok", f"run(s) {running} in progress ({holder})")
    else:
        report.add("runs", "ok", "no run left running")
    overdue = [t for t, rec in drops.items() if due(rec, DEFAULT_RETENTION_HOURS)]
    if overdue:
        f = report.add("dropped tables", "warn", f"{len(overdue)} table(s) a committed change let go are still on disk")
        if repair:
            f.repaired = f"deleted {sweep_dropped_tables(st)}"
    elif drops:
        report.add("dropped tables", "ok", f"{len(drops)} table(s) a `models rm` let go are kept for sessions opened "
                   f"before it, for {DEFAULT_RETENTION_HOURS:g} h (the next writer after that deletes them)")


def _lock_holder(st: Store) -> str | None:
    """Who holds the writer lock (None: nobody), without taking it."""
    import fcntl
    if is_remote(st.path):
        if st.engine.dialect.name != "sqlite":
            return lease_holder(st.engine, "writer")
        lock = Path((st.engine.url.database or "").split("?")[0].removeprefix("file:") + ".write.lock")
    else:
        lock = st.path / ".write.lock"
    if not lock.exists():
        return None
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            return fh.read().strip() or "another process"
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None


def _check_deletions(st: Store, report: Report, repair: bool) -> None:
    """The deletions record: no id it holds may be stored (a repair that rolled a delete back brings
    deleted rows back: --repair deletes them again, statistics downdated)."""
    ds = deletions.table(st) if DELETIONS not in report.unreadable else None
    if ds is None:
        return
    con = duckdb.connect()
    con.register("d", ds)
    parts = []
    samples = st.samples_table() if SAMPLES not in report.unreadable else None
    if samples is not None:
        con.register("s", samples)
        parts.append("SELECT id FROM s")
    for i, rec in enumerate(st.list_models()):
        if rec.table_name not in report.unreadable:
            con.register(f"e{i}", for_duckdb(st.embeddings_table(rec)))
            parts.append(f"SELECT id FROM e{i}")
    n = con.sql("SELECT count(*) FROM d").fetchall()[0][0]
    back = con.sql(f"SELECT DISTINCT id FROM ({' UNION ALL '.join(parts)}) SEMI JOIN d USING (id)").arrow() \
        if parts else None
    con.close()
    back = back.read_all() if hasattr(back, "read_all") else back
    if back is None or back.num_rows == 0:
        report.add("deletions", "ok", f"{n} deleted ids recorded, none stored")
        return
    f = report.add("deletions", "error", f"{back.num_rows} ids recorded as deleted are stored again")
    if repair:
        out = delete_ids(st, back.column("id").combine_chunks())
        f.repaired = (f"deleted them again ({out.samples} samples, "
                      + (", ".join(f"{v} from {m}" for m, v in out.rows.items()) or "no embedding rows") + ")")


def _check(st: Store, report: Report, repair: bool) -> None:
    try:
        _check_tables(st, report, repair)
        _check_deletions(st, report, repair)
        _check_rows(st, report, repair)
        _check_stats(st, report, repair)
        _check_fits_targets(st, report, repair)
        _check_runs(st, report, repair)
    except ClipsqlError as e:
        report.add("store", "error", str(e))


def format_report(r: Report) -> str:
    marks = {"ok": "ok   ", "warn": "WARN ", "error": "ERROR"}
    lines = []
    for f in r.findings:
        lines.append(f"{marks[f.level]} {f.check}: {f.detail}")
        if f.repaired:
            lines.append(f"      repaired: {f.repaired}")
    verdict = ("consistent" if r.consistent else f"{len(r.errors)} problem(s)") + \
              (f", {len(r.warnings)} warning(s)" if r.warnings else "") + \
              (f"; {r.lost_rows} rows could not be kept (see `lost rows` above)" if r.lost_rows else "")
    if r.consistent and r.warnings and len(r.warnings) == r.missing and not r.repair:
        hint = " — re-run the ingest named above to restore the lost rows"
    else:
        hint = "" if r.consistent and not r.warnings or r.repair else \
            " — `clipsql doctor STORE --repair` fixes what it can"
    lines.append(f"{r.store}: {verdict}{hint}")
    return "\n".join(lines)
