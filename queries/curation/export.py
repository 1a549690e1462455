"""`clipsql export STORE OUT`: one committed snapshot of a store, as files any DuckDB, pandas or
BI tool reads without clipsql: a DuckDB database when OUT ends in `.duckdb`, else a folder of
parquet files (NAME.parquet per table).

Tables (the same names in both forms; <key> is the model's Lance table name without its `emb_`
prefix: a slug of the model id and 8 hex digits of its hash):

    samples               the `samples` view (metadata keys as typed columns), or its `--columns`
    embeddings_<key>      one per model: id, model, image_embedding, text_embedding (FLOAT[d])
    stored_scores_<key>   the model's stored score columns (`clipsql score`), when it has them
    semdedup_<key>        the model's SemDeDup columns (`clipsql dedup`), when it has them

and what was exported: the table `clipsql_export` in the database (one row per table, with the
whole record as JSON in `manifest`), the file `_clipsql_export.json` in the folder: the store id,
the ledger's commit id, every table's Lance version, the models, clipsql's version and the time.
The database also gets a view `embeddings` over every model, as the store has.

One snapshot: the ledger's committed versions and its last commit id are read in one statement,
and the connection's views are opened at exactly those versions (queries.sql.db.connect); the
stored-score and SemDeDup tables, which the ledger does not version, are opened once at their
newest version (recorded too) and keep only the exported samples' ids. A writer committing
meanwhile changes nothing in the export. `--where` (SQL on `samples`, evaluated as `delete`
evaluates it) chooses the samples; the rows of the other tables follow by id.

Atomic: everything is written under a hidden temporary name beside OUT (`.OUT.tmp-PID-…`) and
renamed to OUT at the end, so OUT is absent or complete, never half written; temporaries of killed
exports are removed by the next export to the same OUT. An existing OUT is never overwritten.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from clipsql import __version__
from clipsql.errors import ExportError, QueryError
from clipsql.files import fsync_path
from clipsql.lazy import duckdb, tqdm
from clipsql.queries.curation.delete import ids_where
from clipsql.queries.sql.db import connect, quote_ident, quote_literal
from clipsql.store.location import is_remote
from clipsql.store.records import ModelRecord
from clipsql.store.snapshot import Snapshot
from clipsql.store.store import Store
from clipsql.store.tables import EMBEDDINGS, SAMPLES, dedup_table_name, stored_table_name
from clipsql.store.reads import for_duckdb

EXPORT_TABLE = "clipsql_export"
MANIFEST = "_clipsql_export.json"
BATCH_ROWS = 65_536


@dataclass
class Part:
    """One exported table: its name, what it is, where it came from and the SQL that reads it."""
    name: str
    kind: str                   # samples | embeddings | stored_scores | semdedup
    sql: str
    rows: int
    model: str | None = None
    lance_table: str | None = None
    lance_version: int | None = None
    params: dict = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"table": self.name, "kind": self.kind, "model": self.model, "lance_table": self.lance_table,
                "lance_version": self.lance_version, "rows": self.rows, **({"params": self.params} if self.params else {})}


@dataclass
class ExportRecord:
    """What an export holds (its manifest: the store, the ledger commit and table versions it is a
    snapshot of, the models and tables) and, once written, where and how long it took."""
    store_id: str | None
    store_path: str
    commit_id: int | None
    table_versions: dict[str, int]
    models: list[dict[str, Any]]
    clipsql_version: str
    exported_at: str
    format: str                                   # duckdb | parquet
    where: str | None
    columns: list[str] | None
    tables: list[dict[str, Any]]                  # Part.record() of each exported table
    path: str | None = None                       # set once published
    seconds: float | None = None

    def manifest(self) -> dict[str, Any]:
        """The record written into the export (without path and seconds, known only after)."""
        return {k: v for k, v in asdict(self).items() if k not in ("path", "seconds")}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_store(st: Store, out: str | os.PathLike, *, columns: list[str] | None = None, where: str | None = None,
                 model: str | None = None, progress: bool = True, batch_rows: int = BATCH_ROWS) -> ExportRecord:
    """Write one committed snapshot of `st` to `out` (.duckdb file or parquet folder); returns the record."""
    out = Path(out)
    fmt = "duckdb" if out.name.lower().endswith(".duckdb") else "parquet"
    _check_out(st, out)
    snap = Snapshot.read(st)        # the ledger's versions and last commit id, in one catalog read
    models = [snap.model(model)] if model else list(snap.models)
    versions, commit_id = snap.versions, snap.commit_id
    t0 = time.perf_counter()
    con = connect(snap, progress_bar=False)
    try:
        parts = _plan(st, con, versions, models, columns, where)
        record = ExportRecord(store_id=st.get_setting("store_id"), store_path=str(st.path), commit_id=commit_id,
                              table_versions={k: versions[k] for k in sorted(versions)},
                              models=[_model_record(m) for m in models if m.table_name in versions],
                              clipsql_version=__version__,
                              exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              format=fmt, where=where, columns=columns or None, tables=[p.record() for p in parts])
        _sweep_temporaries(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            total = sum(p.rows for p in parts)
            with tqdm.tqdm(total=total, unit="rows", unit_scale=total >= 10_000, desc="export", disable=not progress,
                           dynamic_ncols=True) as bar:
                if fmt == "duckdb":
                    _write_duckdb(con, parts, tmp, record, bar, batch_rows)
                else:
                    _write_parquet(con, parts, tmp, record, bar, batch_rows)
            _publish(tmp, out)
        except OSError as e:
            _remove(tmp)
            raise ExportError(f"cannot write {out}: {e.strerror or e} ({e.filename or tmp}); nothing was "
                              "written there") from None
        except BaseException:
            _remove(tmp)
            raise
    finally:
        con.close()
    record.path = str(out)
    record.seconds = round(time.perf_counter() - t0, 3)
    return record


# -- what to export ----------------------------------------------------------------------------
def _plan(st: Store, con: Any, versions: dict[str, int], models: list[ModelRecord], columns: list[str] | None,
          where: str | None) -> list[Part]:
    have = [r[0] for r in con.sql("DESCRIBE samples").fetchall()]
    cols = _columns(have, columns)
    if where is not None:
        ids = ids_where(st, where, con=con)
        if len(ids) == 0:
            raise ExportError(f"`where` {where!r} selects no samples: nothing to export", param="where")
        con.register("_export_ids", pa.table({"id": ids}))
        keep, id_source = "id IN (SELECT id FROM _export_ids)", "_export_ids"
        n_samples = _count(con, f"SELECT count(*) FROM samples WHERE {keep}")
    else:
        keep, id_source = None, "samples"
        n_samples = _count(con, "SELECT count(*) FROM samples") if SAMPLES in versions else 0
    filt = f" WHERE {keep}" if keep else ""
    parts = [Part("samples", "samples", f"SELECT {', '.join(map(quote_ident, cols))} FROM samples{filt}",
                  n_samples, lance_table=SAMPLES, lance_version=versions.get(SAMPLES))]
    tables = set(st.table_names())
    for i, m in enumerate(models):
        if m.table_name not in versions:      # registered, nothing committed yet
            continue
        key = m.table_name[len(EMBEDDINGS) + 1:]
        ds = st.embeddings_table(m, versions[m.table_name])
        con.register(f"_export_emb_{i}", for_duckdb(ds))
        rows = ds.count_rows() if keep is None else _count(con, f"SELECT count(*) FROM _export_emb_{i}{filt}")
        parts.append(Part(
            f"embeddings_{key}", "embeddings",
            f"SELECT id, {quote_literal(m.model_id)} AS model, {_vec('image_embedding')} AS image_embedding, "
            f"{_vec('text_embedding')} AS text_embedding FROM _export_emb_{i}{filt}",
            rows, m.model_id, m.table_name, versions[m.table_name]))
        for kind, name in (("stored_scores", stored_table_name(m.table_name)),
                           ("semdedup", dedup_table_name(m.table_name))):
            if name not in tables:
                continue
            ds = st.dataset(name, latest=True)     # not versioned by the ledger: its newest version, once
            rel = f"_export_{kind}_{i}"
            con.register(rel, ds)
            sel = f"FROM {rel} WHERE id IN (SELECT id FROM {id_source})"
            params = json.loads((ds.schema.metadata or {}).get(b"clipsql", b"{}") or b"{}")
            parts.append(Part(f"{kind}_{key}", kind, f"SELECT * {sel}", _count(con, f"SELECT count(*) {sel}"),
                              m.model_id, name, ds.version, params))
    return parts


def _columns(have: list[str], columns: list[str] | None) -> list[str]:
    if not columns:
        return have
    unknown = [c for c in columns if c not in have]
    if unknown:
        raise ExportError(f"`columns`: no column {', '.join(map(repr, unknown))} in samples; it has: "
                          f"{', '.join(have)}", param="columns")
    return ["id"] + [c for c in dict.fromkeys(columns) if c != "id"]


def _vec(col: str) -> str:
    # as the store's `embeddings` view: an expression DuckDB does not push into the Lance scan
    return f"CASE WHEN {col} IS NULL THEN NULL ELSE {col} END"


def _count(con: Any, sql: str) -> int:
    try:
        return int(con.sql(sql).fetchall()[0][0])
    except duckdb.Error as e:
        raise QueryError(str(e).strip().splitlines()[0]) from None


def _model_record(m: ModelRecord) -> dict[str, Any]:
    return {"model": m.model_id, "kind": m.kind, "dim": m.dim, "logit_scale": m.logit_scale,
            "logit_bias": m.logit_bias, "lance_table": m.table_name}


def _batches(con: Any, part: Part, bar: Any, batch_rows: int) -> pa.RecordBatchReader:
    """The part's rows as a stream of Arrow batches, counted on the progress bar as they pass."""
    try:
        reader = con.sql(part.sql).to_arrow_reader(batch_rows)
    except duckdb.Error as e:
        raise QueryError(f"reading {part.name} failed: {str(e).strip().splitlines()[0]}") from None

    def counted() -> Iterator[pa.RecordBatch]:
        for batch in reader:
            bar.update(batch.num_rows)
            yield batch
    return pa.RecordBatchReader.from_batches(reader.schema, counted())


# -- writing -----------------------------------------------------------------------------------
def _write_parquet(con: Any, parts: list[Part], tmp: Path, record: ExportRecord, bar: Any, batch_rows: int) -> None:
    tmp.mkdir()
    for part in parts:
        reader = _batches(con, part, bar, batch_rows)
        path = tmp / f"{part.name}.parquet"
        with pq.ParquetWriter(path, reader.schema) as w:
            for batch in reader:
                w.write_batch(batch)
        fsync_path(path)
    (tmp / MANIFEST).write_text(json.dumps(record.manifest(), indent=2) + "\n")
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)


def _write_duckdb(con: Any, parts: list[Part], tmp: Path, record: ExportRecord, bar: Any, batch_rows: int) -> None:
    dst = duckdb.connect(str(tmp))
    try:
        dst.execute("SET enable_progress_bar = false")
        for part in parts:
            dst.register("_clipsql_src", _batches(con, part, bar, batch_rows))
            dst.execute(f"CREATE TABLE {quote_ident(part.name)} AS SELECT * FROM _clipsql_src")
            dst.unregister("_clipsql_src")
        emb = [p for p in parts if p.kind == "embeddings"]
        if emb:
            dims = {m["dim"] for m in record.models}
            cast = "" if len(dims) <= 1 else "::FLOAT[]"
            dst.execute("CREATE VIEW embeddings AS " + " UNION ALL ".join(
                f"SELECT id, model, image_embedding{cast} AS image_embedding, text_embedding{cast} AS "
                f"text_embedding FROM {quote_ident(p.name)}" for p in emb))
        manifest = json.dumps(record.manifest(), indent=2)
        rows = [{"table_name": t["table"], "kind": t["kind"], "model": t["model"], "lance_table": t["lance_table"],
                 "lance_version": t["lance_version"], "rows": t["rows"], "store_id": record.store_id,
                 "commit_id": record.commit_id, "clipsql_version": record.clipsql_version,
                 "exported_at": record.exported_at, "where_clause": record.where, "manifest": manifest}
                for t in record.tables]
        schema = pa.schema([("table_name", pa.string()), ("kind", pa.string()), ("model", pa.string()),
                            ("lance_table", pa.string()), ("lance_version", pa.int64()), ("rows", pa.int64()),
                            ("store_id", pa.string()), ("commit_id", pa.int64()), ("clipsql_version", pa.string()),
                            ("exported_at", pa.string()), ("where_clause", pa.string()), ("manifest", pa.string())])
        dst.register("_clipsql_meta", pa.Table.from_pylist(rows, schema=schema))
        dst.execute(f"CREATE TABLE {EXPORT_TABLE} AS SELECT * EXCLUDE (exported_at), "
                    "exported_at::TIMESTAMPTZ AS exported_at FROM _clipsql_meta")
        dst.unregister("_clipsql_meta")
        dst.execute("CHECKPOINT")
    finally:
        dst.close()
    fsync_path(tmp)


# -- publishing --------------------------------------------------------------------------------
def _check_out(st: Store, out: Path) -> None:
    """Refuse, in one line, an OUT that exists or cannot be written, before reading anything."""
    if out.exists() or out.is_symlink():
        raise ExportError(f"{out} already exists: an export never overwrites; choose a new name or remove it")
    parent = out.parent.resolve()
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise ExportError(f"cannot write {out}: {parent} {what}")
    store = None if is_remote(st.path) else Path(st.path).resolve()
    if store is not None and (parent == store or store in parent.parents):
        raise ExportError(f"cannot write {out} inside the store {st.path}: choose a path outside it")
    probe = parent / f".{out.name}.tmp-{os.getpid()}-probe"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise ExportError(f"cannot write {out}: {parent} is not writable ({e.strerror or e})") from None


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temporary to OUT, never replacing something that appeared meanwhile."""
    if tmp.is_dir():
        if out.exists() or out.is_symlink():
            raise ExportError(f"{out} appeared while the export ran: the export was not published")
        os.rename(tmp, out)
    else:
        try:
            os.link(tmp, out)       # fails if OUT exists: no window in which one is replaced
        except FileExistsError:
            raise ExportError(f"{out} appeared while the export ran: the export was not published") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if out.exists() or out.is_symlink():
                raise ExportError(f"{out} appeared while the export ran: the export was not published") from None
            os.rename(tmp, out)
            fsync_path(out.parent)
            return
        os.unlink(tmp)
    fsync_path(out.parent)


def _sweep_temporaries(out: Path) -> list[Path]:
    """Remove temporaries of exports to `out` whose process has ended (a kill leaves them)."""
    swept = []
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name[len(f".{out.name}.tmp-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(p)
            swept.append(p)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        for q in (p, Path(str(p) + ".wal")):
            try:
                q.unlink()
            except FileNotFoundError:
                pass

