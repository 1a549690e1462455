"""A clipsql store is a directory: Lance tables plus a SQLAlchemy catalog.

    STORE/
      clipsql.json       marker: format version, catalog URL and the store id (also in the
                         catalog's `settings`: one catalog database holds one store)
      lance/             Lance datasets (LanceDB layout): `samples` and one `emb_<model>` per
                         model, created with stable row ids and V2 manifest paths
      catalog.sqlite     default catalog (WAL); `--catalog URL` puts it elsewhere
      .write.lock        flock()ed by the one writer

Write protocol (one writer, under the lock; store.writer does the buffering):
  1. rows arrive in small batches; their Lance data files are written as they come
     (`lance.fragment.write_fragments`), invisible to every reader;
  2. every N rows or T seconds, one *commit*: a Lance Append of the written fragments to
     `samples` and to the model table (two Lance versions), then ONE catalog transaction
     that inserts the `commits` ledger row, moves `table_versions` to the new versions,
     merges the commit's statistics partial into `running_stats`, marks the source units
     it completed in `ingested_units`, and records its rejects and run counters.
The catalog transaction is the commit point. Readers open each table at the version
`table_versions` names, so they see whole commits, `samples` and embeddings from the
same commit, and statistics that cover exactly the rows they see. A writer that finds
a Lance table ahead of its recorded version (a kill between 2's Lance commits and the
catalog transaction) restores the recorded version before it writes (`recover`);
data files of a killed commit are unreferenced and `clipsql optimize` deletes them.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from clipsql.errors import CatalogDamaged, CatalogError, DimensionMismatch, MarkerDamaged, ModelError, StoreNotFound
from clipsql.lazy import lance, lancedb
from clipsql.store import catalog as cat
from clipsql.store import runs, stats, units
from clipsql.store.drops import sweep_dropped_tables
from clipsql.store.faults import fault
from clipsql.store.location import exists, is_remote, rmtree, store_path
from clipsql.store.locks import file_lock, lease, lease_seconds
from clipsql.store.records import ModelRecord
from clipsql.store.runs import printable_text
from clipsql.store.stats import MODALITIES, FoldFragments, StatsState, new_moments, update_moments
from clipsql.store.tables import (DELETIONS, SAMPLES, TAGS, derived_tables, embeddings_schema, embeddings_table_name,
                                  samples_schema)

# what callers import from here that lives in the store's parts
__all__ = ["MODALITIES", "ModelRecord", "PendingCommit", "StatsState", "Store", "new_moments", "printable_text",
           "update_moments"]

MARKER = "clipsql.json"
MODEL_METADATA_KEY = "clipsql.model"     # Lance schema metadata of a model table: its model record
FORMAT_VERSION = 1


class Store:
    def __init__(self, path: Path, catalog_url: str, read_only: bool = False):
        self.path = store_path(path)
        self.catalog_url = catalog_url
        self.read_only = read_only
        self.engine = cat.make_engine(catalog_url, read_only=read_only)

    # -- lifecycle ----------------------------------------------------------------------
    @classmethod
    def init(cls, path: str | os.PathLike, catalog_url: str | None = None) -> "Store":
        path = store_path(path)
        if is_remote(path) and not catalog_url and not (path / MARKER).exists():
            raise CatalogError(f"a store on object storage ({path}) keeps its catalog elsewhere: pass `catalog_url` "
                               "postgresql+psycopg://user@host/db (a team), or sqlite:////local/dir/catalog.sqlite "
                               "(one machine)", param="catalog_url")
        if path.exists() and not path.is_dir():
            raise StoreNotFound(f"{path} is a file, not a directory: choose a new path for the store")
        if (path / MARKER).exists():
            store = cls.open(path)
            recorded = json.loads((path / MARKER).read_text()).get("catalog")
            if catalog_url and catalog_url != recorded:
                raise CatalogError(f"{path} is already a store, with its catalog at "
                                   f"{cat.safe_url(store.engine.url)}; --catalog applies only when a store is "
                                   "created (to reach its catalog elsewhere, set CLIPSQL_CATALOG_URL)")
            cat.migrate(store.engine)
            return store
        if path.exists() and any(path.iterdir()):
            raise StoreNotFound(f"{path} exists and is not an empty directory or a clipsql store; "
                                "choose a new path")
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreNotFound(f"cannot create the store directory {path}: {e.strerror or e}") from None
        try:
            (path / "lance").mkdir(exist_ok=True)
            store_id = uuid.uuid4().hex
            marker = {"format": FORMAT_VERSION, "catalog": catalog_url,  # None = catalog.sqlite inside
                      "store_id": store_id}
            store = cls(path, catalog_url or default_catalog(path))
            cat.migrate(store.engine)
            store._claim_catalog(store_id)
            (path / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            store.checkpoint()
        except BaseException:
            # leave nothing half-made behind (an unreachable catalog, a missing driver): the same
            # `clipsql init` works once the cause is fixed
            _undo_init(path, remove_dir=created)
            raise
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, migrate: bool = True, *, read_only: bool = False) -> "Store":
        """Open a store. Writers migrate the catalog; `read_only` (queries, reports) opens it read-only
        and never changes it (a catalog that needs migrating is refused with the command that does it)."""
        path = store_path(path)
        marker = read_marker(path)
        url = os.environ.get("CLIPSQL_CATALOG_URL") or marker.get("catalog") or default_catalog(path)
        if not marker.get("catalog") and not os.environ.get("CLIPSQL_CATALOG_URL") and not is_remote(path) \
                and not (path / "catalog.sqlite").exists():
            raise CatalogError(f"the catalog of {path} ({path / 'catalog.sqlite'}) is missing: restore it from a "
                               f"backup, or rebuild it from the Lance data with `clipsql doctor {path} --repair`")
        store = cls(path, url, read_only=read_only)
        if read_only:
            cat.check_schema(store.engine, writer=False)
        elif migrate and cat.migrate(store.engine):
            store.checkpoint()
        if marker.get("store_id"):
            store._check_catalog(marker["store_id"])
        return store

    def _claim_catalog(self, store_id: str) -> None:
        """Bind a new store's catalog to it: one catalog database holds one store."""
        owner = self.get_setting("store_id")
        if owner is not None:
            where = self.get_setting("store_path") or "another directory"
            raise CatalogError(f"the catalog at {cat.safe_url(self.engine.url)} already holds a store "
                               f"(created at {where}); give each store its own database, e.g. "
                               "CREATE DATABASE clipsql_<name>, and pass its URL to --catalog")
        self.set_setting("store_path", str(self.path.resolve()))
        self.set_setting("store_id", store_id)

    def _check_catalog(self, store_id: str) -> None:
        try:
            owner = self.get_setting("store_id")
        except sa.exc.DatabaseError as e:
            first = str(getattr(e, "orig", e)).strip().splitlines()[0]
            raise CatalogError(f"the catalog at {cat.safe_url(self.engine.url)} cannot be read ({first}): restore "
                               f"it, or rebuild it with `clipsql doctor {self.path} --repair`") from None
        if owner is None:
            raise CatalogError(f"the catalog at {cat.safe_url(self.engine.url)} holds no store (it was deleted or "
                               f"emptied, or the URL names the wrong database): restore it, or rebuild it from "
                               f"the Lance data with `clipsql doctor {self.path} --repair`")
        if owner != store_id:
            where = self.get_setting("store_path") or "no store"
            raise CatalogError(f"{self.path} and the catalog at {cat.safe_url(self.engine.url)} belong to "
                               f"different stores (the catalog holds {where}); "
                               "point CLIPSQL_CATALOG_URL (or the store's clipsql.json) at this store's catalog")

    @cached_property
    def db(self):  # noqa: ANN201 - lancedb.DBConnection
        os.environ.setdefault("LANCE_LOG", "error")   # Lance's Rust logger warns on every table creation
        return lancedb.connect(str(self.path / "lance"))

    @contextlib.contextmanager
    def lock(self, name: str = "writer") -> Iterator[None]:
        """Exclusive lock `name` (the writer lock, or `score` for score jobs); a second holder fails at
        once with StoreLocked. A local store flock()s a file in its directory; a store on object
        storage flock()s a file beside its local SQLite catalog, or holds a lease in its server
        catalog (store.locks)."""
        lease_seconds()       # a bad CLIPSQL_LEASE_SECONDS is refused by every writer, not only lease holders
        suffix = ".write.lock" if name == "writer" else f".{name}.lock"
        if not is_remote(self.path):
            held = file_lock(str(self.path / suffix), str(self.path))
        elif self.engine.dialect.name == "sqlite":
            db = self.engine.url.database or ""
            held = file_lock(db.split("?")[0].removeprefix("file:") + suffix, str(self.path))
        else:
            held = lease(self.engine, name, str(self.path))
        with held:
            if name == "writer":
                self._sweep_drops()
            try:
                yield
            finally:
                self.checkpoint()     # before the lock goes: the next reader finds every commit in the file

    def _sweep_drops(self) -> None:
        """Every writer, on taking the lock: delete the tables (and fits) a committed change let go that
        no reader may hold any more (store.drops). Best effort: a catalog that cannot be read here is
        for `clipsql doctor` to report, and the next writer tries again."""
        if self.read_only:
            return
        try:
            sweep_dropped_tables(self)
        except (sa.exc.SQLAlchemyError, OSError):
            pass

    def checkpoint(self) -> None:
        """A writer is done: a SQLite catalog's commits move from its WAL into the file, where readers
        that cannot write the store (a read-only mount, a backup, another user) read them."""
        if not self.read_only:
            cat.checkpoint(self.engine)

    # -- settings and models ------------------------------------------------------------
    def get_setting(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(cat.settings.c.value).where(cat.settings.c.key == key)).scalar()

    def set_setting(self, key: str, value: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(cat.settings).where(cat.settings.c.key == key))
            conn.execute(cat.settings.insert().values(key=key, value=value))

    def list_models(self) -> list[ModelRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(cat.models).order_by(cat.models.c.created_at)).fetchall()
        return [ModelRecord.from_row(r) for r in rows]

    def register_model(self, *, model_id: str, kind: str, dim: int, logit_scale: float,
                       logit_bias: float | None, context_length: int | None, spec: dict) -> ModelRecord:
        """Record a model (idempotent) and create its embedding table; the first model becomes the default."""
        existing = {m.model_id: m for m in self.list_models()}
        if model_id in existing:
            rec = existing[model_id]
            if rec.dim != dim:
                raise DimensionMismatch(f"model {model_id} is recorded with dim {rec.dim} but now produces {dim}")
            return rec
        rec = ModelRecord(model_id, embeddings_table_name(model_id), kind, int(dim), float(logit_scale),
                          None if logit_bias is None else float(logit_bias), context_length, spec)
        # a model removed under this name whose tables are still kept for readers: they go now
        sweep_dropped_tables(self, only=[rec.table_name, *derived_tables(rec.table_name)])
        version = self._new_model_table(rec)
        fault("register:after-table")
        with self.engine.begin() as conn:      # the table's version and the model: one transaction
            set_committed_version(conn, rec.table_name, version, None)
            conn.execute(cat.models.insert().values(
                model_id=rec.model_id, table_name=rec.table_name, kind=rec.kind, dim=rec.dim,
                logit_scale=rec.logit_scale, logit_bias=rec.logit_bias, context_length=context_length,
                spec=cat.to_json(spec), created_at=time.time()))
        if self.get_setting("default_model") is None:
            self.set_setting("default_model", model_id)
        return rec

    def model(self, name: str | None = None) -> ModelRecord:
        """A model by id (or unique substring); None → the store's default model."""
        models = self.list_models()
        default = self.get_setting("default_model") if models and name is None else None
        return pick_model(models, default, name, self.path)

    # -- Lance tables ---------------------------------------------------------------------
    def table_names(self) -> list[str]:
        """Lance tables of the store (a directory listing: importing lancedb costs ~1.5 s). A directory
        without `_versions` holds only data files of a table not yet committed (a job in flight)."""
        root = self.path / "lance"
        return sorted(p.name[:-len(".lance")] for p in root.glob("*.lance") if (p / "_versions").is_dir()) \
            if root.is_dir() else []

    def table_uri(self, name: str) -> str:
        return str(self.path / "lance" / f"{name}.lance")

    def _create_table(self, name: str, schema: pa.Schema) -> None:
        """An empty Lance table with stable row ids and V2 manifest paths, recorded at version 1."""
        ds = lance.write_dataset(schema.empty_table(), self.table_uri(name), schema=schema, mode="create",
                                 enable_stable_row_ids=True, enable_v2_manifest_paths=True)
        with self.engine.begin() as conn:
            set_committed_version(conn, name, ds.version, None)

    def _new_model_table(self, rec: ModelRecord) -> int:
        """The Lance version of a new model's empty embeddings table: created, or the table a writer
        killed between a table's creation and its catalog rows left behind (empty: nothing commits to
        a model the catalog does not know), adopted as it is."""
        uri = self.table_uri(rec.table_name)
        if exists(uri):
            try:
                ds = lance.dataset(uri)
            except (OSError, ValueError) as e:
                if exists(f"{uri}/_versions"):
                    raise StoreNotFound(f"Lance table {rec.table_name} of {self.path} cannot be opened "
                                        f"({str(e).splitlines()[0]}): run `clipsql doctor {self.path}`") from None
                rmtree(uri)      # data files of a creation killed before its first version: nothing to keep
            else:
                field = ds.schema.field("image_embedding") if "image_embedding" in ds.schema.names else None
                rows = ds.count_rows()
                if rows == 0 and field is not None and getattr(field.type, "list_size", None) == rec.dim:
                    return ds.version
                raise StoreNotFound(f"Lance table {rec.table_name} of {self.path} holds {rows} rows of model "
                                    f"{rec.model_id}, which the catalog does not know (a lost or replaced catalog): "
                                    f"rebuild the catalog from the Lance data with `clipsql doctor {self.path} "
                                    "--repair`")
        # the table carries its model record, so `clipsql doctor --repair` can rebuild a lost catalog
        meta = {MODEL_METADATA_KEY: json.dumps(dict(
            model_id=rec.model_id, kind=rec.kind, dim=rec.dim, logit_scale=rec.logit_scale,
            logit_bias=rec.logit_bias, context_length=rec.context_length, spec=rec.spec), sort_keys=True)}
        schema = embeddings_schema(rec.dim).with_metadata(meta)
        ds = lance.write_dataset(schema.empty_table(), uri, schema=schema, mode="create",
                                 enable_stable_row_ids=True, enable_v2_manifest_paths=True)
        return ds.version

    def versioned_tables(self) -> list[str]:
        """The Lance tables whose committed version the ledger names and that exist: `samples`, the
        deletions record (store.deletions), each model's table and `tags` (store.tags)."""
        names = [SAMPLES, DELETIONS] + [m.table_name for m in self.list_models()] + [TAGS]
        return [n for n in names if exists(self.table_uri(n))]

    def committed_versions(self) -> dict[str, int]:
        """{table: the Lance version the ledger's last commit names} (what readers open)."""
        with self.engine.connect() as conn:
            return dict(conn.execute(sa.select(cat.table_versions.c.table_name, cat.table_versions.c.version)).all())

    def dataset(self, name: str, version: int | None = None, *, latest: bool = False):  # noqa: ANN201
        """The Lance dataset `name` at its committed version (or `version`; `latest` for writers)."""
        os.environ.setdefault("LANCE_LOG", "error")
        if version is None and not latest:
            version = self.committed_versions().get(name)
        try:
            return lance.dataset(self.table_uri(name), version=version)
        except (OSError, ValueError) as e:
            raise StoreNotFound(f"Lance table {name} of {self.path} cannot be opened at version {version}: "
                                f"{str(e).splitlines()[0]} — run `clipsql doctor {self.path}`") from None

    def samples_table(self, version: int | None = None):  # noqa: ANN201
        """The `samples` Lance dataset at its committed version, or None before the first ingest."""
        if not (self.path / "lance" / f"{SAMPLES}.lance").exists():
            return None
        return self.dataset(SAMPLES, version)

    def ensure_samples_table(self) -> None:
        if not (self.path / "lance" / f"{SAMPLES}.lance").exists():
            self._create_table(SAMPLES, samples_schema())

    def embeddings_table(self, model: ModelRecord, version: int | None = None):  # noqa: ANN201
        return self.dataset(model.table_name, version)

    def recover(self) -> dict[str, int]:
        """Writers only (under the lock): roll every table whose Lance version is ahead of the ledger
        back to the committed version; adopt tables the ledger does not know yet (stores written
        before the ledger existed). Returns {table: rows rolled back}."""
        self.abort_dead_runs()
        recorded = self.committed_versions()
        rolled: dict[str, int] = {}
        for name in self.versioned_tables():
            uri = self.table_uri(name)
            latest = lance.dataset(uri)
            if name not in recorded:
                with self.engine.begin() as conn:
                    set_committed_version(conn, name, latest.version, None)
                continue
            if latest.version > recorded[name]:
                good = lance.dataset(uri, version=recorded[name])
                rolled[name] = latest.count_rows() - good.count_rows()
                good.restore()
                with self.engine.begin() as conn:
                    set_committed_version(conn, name, lance.dataset(uri).version, None)
        return rolled

    def read_embeddings(self, model: ModelRecord, *, min_seq: int | None = None,
                        ids: list[str] | None = None, columns: tuple[str, ...] = ("id", "image_embedding",
                                                                                   "text_embedding")) -> pa.Table:
        ds = self.embeddings_table(model)
        filt = None
        if min_seq is not None:
            filt = pc.field("seq") > int(min_seq)
        if ids is not None:
            f = pc.field("id").isin(pa.array(ids, pa.string()))
            filt = f if filt is None else filt & f
        return ds.to_table(columns=list(columns), filter=filt)

    def count_rows(self, model: ModelRecord) -> int:
        return self.embeddings_table(model).count_rows()

    def stored_ids(self, model: ModelRecord, ids: pa.Array,
                   tables: tuple[Any, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For each of `ids`: (already in `samples`, already in the model's table), looked up through
        the `id` index (plus a scan of fragments not yet indexed), never a set of every stored id.
        `tables`: the (samples, model) datasets to look in (default: the committed versions)."""
        samples, emb = tables or (self.samples_table(), self.embeddings_table(model))
        n = len(ids)

        def lookup(ds: Any, keys: pa.Array) -> np.ndarray:
            if ds is None or len(keys) == 0 or ds.count_rows() == 0:
                return np.zeros(len(keys), dtype=bool)
            found = ds.to_table(columns=["id"], filter=pc.field("id").isin(keys)).column("id")
            return pc.is_in(keys, value_set=found.combine_chunks()).to_numpy(zero_copy_only=False)

        in_emb = lookup(emb, ids)
        in_samples = np.zeros(n, dtype=bool)
        if samples is None:
            return in_samples, in_emb
        # a model row is committed with its sample, so hits are checked only because a lost samples
        # data file (kept embeddings, `doctor --repair`) breaks that; they are rare (a resumed or
        # repaired run re-reading rows it holds). Misses need a look only where `samples` holds
        # rows the model does not (equal counts with no orphan: the same ids)
        hit = np.flatnonzero(in_emb)
        if len(hit):
            in_samples[hit] = lookup(samples, ids if len(hit) == n else ids.take(pa.array(hit)))
        miss = np.flatnonzero(~in_emb)
        if len(miss) and samples.count_rows() != (emb.count_rows() if emb else 0):
            in_samples[miss] = lookup(samples, ids if len(miss) == n else ids.take(pa.array(miss)))
        return in_samples, in_emb

    def sample_fields(self, ids: pa.Array, samples: pa.Table | None = None) -> tuple[pa.Array, pa.Array]:
        """uri and caption of each id, from `samples` (the rows about to be written) or the store."""
        parts = [samples.select(["id", "uri", "caption"])] if samples is not None and samples.num_rows else []
        have = pa.concat_tables(parts).column("id") if parts else pa.array([], pa.string())
        missing = ids.filter(pc.invert(pc.is_in(ids, value_set=have.combine_chunks() if parts else have)))
        stored = self.samples_table()
        if len(missing) and stored is not None:
            parts.append(stored.to_table(columns=["id", "uri", "caption"], filter=pc.field("id").isin(missing)))
        if not parts:
            return pa.nulls(len(ids), pa.string()), pa.nulls(len(ids), pa.string())
        known = pa.concat_tables(parts)
        idx = pc.index_in(ids, value_set=known.column("id").combine_chunks())
        return known.column("uri").take(idx).combine_chunks(), known.column("caption").take(idx).combine_chunks()

    # -- writing ------------------------------------------------------------------------

    def commit(self, model: ModelRecord, c: "PendingCommit") -> int | None:
        """Make one pending commit visible (the write protocol of the module docstring)."""
        if c.meta_types:   # before the Lance commits, so a kill cannot leave columns unregistered
            with self.engine.begin() as conn:
                self.record_meta_types(conn, c.meta_types)
        recorded = self.committed_versions()
        versions: dict[str, int] = {}
        for name, frags in ((SAMPLES, c.sample_fragments), (model.table_name, c.fragments)):
            if frags:
                ds = lance.LanceDataset.commit(self.table_uri(name), lance.LanceOperation.Append(frags),
                                         read_version=recorded[name])
                versions[name] = ds.version
                if name == SAMPLES:
                    fault("commit:between-tables")
        fault("commit:after-lance")
        if not (versions or c.units or c.rejects):
            return None
        with self.engine.begin() as conn:
            commit_id = None
            if versions:
                res = conn.execute(cat.commits.insert().values(
                    model_id=model.model_id, run_id=c.run_id, kind="append", rows=c.rows,
                    sample_rows=c.sample_rows, versions=cat.to_json(versions), created_at=time.time()))
                commit_id = int(res.inserted_primary_key[0])
                for name, v in versions.items():
                    set_committed_version(conn, name, v, commit_id)
            if c.rows:
                state = stats.load_stats_in(conn, model)
                for key, part in c.moments.items():
                    state.moments[key].merge(part)
                state.covered_seq = max(state.covered_seq, c.seq)
                stats.save_stats_in(conn, state)
            for unit_key, rows, rejected in c.units:
                conn.execute(sa.delete(cat.ingested_units).where(
                    cat.ingested_units.c.model_id == model.model_id, cat.ingested_units.c.unit_key == unit_key))
                conn.execute(cat.ingested_units.insert().values(
                    model_id=model.model_id, unit_key=unit_key, source=c.source, commit_id=commit_id,
                    rows=rows, rejected=rejected))
            units.record_in(conn, model.model_id, c.stamps)
            runs.record_rejects(conn, c.run_id, model.model_id, c.source, c.rejects)
            if c.run_id is not None:
                conn.execute(sa.update(cat.ingest_runs).where(cat.ingest_runs.c.run_id == c.run_id).values(
                    added=cat.ingest_runs.c.added + c.rows,
                    rejected=cat.ingest_runs.c.rejected + len(c.rejects)))
        return commit_id

    def done_units(self, model: ModelRecord, keys: list[str]) -> dict[str, tuple[int, int]]:
        """{unit_key: (rows, rejected)} for the given source units this model already holds."""
        out: dict[str, tuple[int, int]] = {}
        t = cat.ingested_units
        with self.engine.connect() as conn:
            for i in range(0, len(keys), 500):
                part = keys[i:i + 500]
                for k, rows, rej in conn.execute(sa.select(t.c.unit_key, t.c.rows, t.c.rejected).where(
                        t.c.model_id == model.model_id, t.c.unit_key.in_(part))):
                    out[k] = (int(rows), int(rej))
        return out

    def record_meta_types(self, conn: sa.Connection, meta_types: dict[str, str]) -> None:
        if not meta_types:
            return
        known = dict(conn.execute(sa.select(cat.metadata_columns.c.name, cat.metadata_columns.c.sql_type)).all())
        for name, sql_type in meta_types.items():
            if name not in known:
                conn.execute(cat.metadata_columns.insert().values(name=name, sql_type=sql_type))
            elif known[name] != sql_type:
                merged = merge_sql_types(known[name], sql_type)
                if merged != known[name]:
                    conn.execute(sa.update(cat.metadata_columns).where(
                        cat.metadata_columns.c.name == name).values(sql_type=merged))

    def metadata_columns(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return dict(conn.execute(sa.select(cat.metadata_columns.c.name, cat.metadata_columns.c.sql_type)
                                     .order_by(cat.metadata_columns.c.name)).all())

    # -- runs (store.runs) ------------------------------------------------------------------
    def start_run(self, model_id: str, source: str, source_kind: str) -> int:
        return runs.start_run(self.engine, model_id, source, source_kind)

    def abort_dead_runs(self) -> list[int]:
        return runs.abort_dead_runs(self.engine)

    def finish_run(self, run_id: int, status: str, skipped: int, summary: dict) -> None:
        runs.finish_run(self.engine, run_id, status, skipped, summary)

    # -- statistics (store.stats) -----------------------------------------------------------
    def stats(self, model: ModelRecord) -> StatsState:
        return stats.stats(self, model)

    def load_stats_in(self, conn: sa.Connection, model: ModelRecord) -> StatsState:
        return stats.load_stats_in(conn, model, self.path)

    def save_stats(self, state: StatsState) -> None:
        stats.save_stats(self, state)

    def save_stats_in(self, conn: sa.Connection, state: StatsState) -> None:
        stats.save_stats_in(conn, state)

    def uncovered_rows(self, model: ModelRecord) -> int:
        return stats.uncovered_rows(self, model)

    def sync_stats(self, model: ModelRecord) -> StatsState:
        return stats.sync_stats(self, model)

    def refresh_stats(self, model: ModelRecord, batch_rows: int = 65536, *,
                      fold_fragments: FoldFragments | None = None) -> StatsState:
        return stats.refresh_stats(self, model, batch_rows, fold_fragments=fold_fragments)

    def recompute_stats(self, model: ModelRecord, batch_rows: int = 65536, *,
                        fold_fragments: FoldFragments | None = None) -> StatsState:
        return stats.recompute_stats(self, model, batch_rows, fold_fragments=fold_fragments)

    def fold_fragment(self, model: ModelRecord, version: int, fragment_id: int, shifts: dict,
                      batch_rows: int = 65536) -> StatsState:
        return stats.fold_fragment(self, model, version, fragment_id, shifts, batch_rows)

    # -- fits (reference samples) -------------------------------------------------------------
    def save_fit(self, model: ModelRecord, *, n_rows: int, covered_seq: int, reference_size: int,
                 options: dict, arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                 recipe: str | None = None) -> int:
        """Store a fit: its O(M + d²) arrays in `fits`, the M × d reference sample in `fit_references`
        (so scores that need only means and factors never load the reference). `recipe`: a fit made
        for that curation recipe, which never becomes the default fit (`latest_fit`)."""
        with self.engine.begin() as conn:
            res = conn.execute(cat.fits.insert().values(
                model_id=model.model_id, created_at=time.time(), n_rows=n_rows, covered_seq=covered_seq,
                reference_size=reference_size, options=cat.to_json(options), arrays=cat.pack_many(arrays)))
            fit_id = int(res.inserted_primary_key[0])
            conn.execute(cat.fit_references.insert().values(fit_id=fit_id, arrays=cat.pack_many(reference)))
            if recipe is not None:
                conn.execute(cat.recipe_fits.insert().values(fit_id=fit_id, recipe=recipe))
            return fit_id

    def stale_fit_reason(self, fit_id: int) -> str | None:
        """Why a fit no longer describes its rows (rows it covered were deleted or rewritten), or None."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(cat.stale_fits.c.reason).where(cat.stale_fits.c.fit_id == fit_id)).scalar()

    def latest_fit(self, model: ModelRecord, with_arrays: bool = True, with_reference: bool = False,
                   recipe: str | None = None, where: Callable[[dict], bool] | None = None) -> dict | None:
        """The newest default fit's catalog row (fits made for a recipe excluded) or, with `recipe`,
        the newest fit made for that recipe whose options satisfy `where`; `arrays` (and the
        reference sample merged into them) on request."""
        made_for = sa.select(cat.recipe_fits.c.fit_id)
        if recipe is not None:
            made_for = made_for.where(cat.recipe_fits.c.recipe == recipe)
        chosen = cat.fits.c.fit_id.in_(made_for) if recipe is not None else cat.fits.c.fit_id.not_in(made_for)
        with self.engine.connect() as conn:
            query = sa.select(cat.fits.c.fit_id, cat.fits.c.options).where(
                cat.fits.c.model_id == model.model_id, chosen).order_by(cat.fits.c.fit_id.desc())
            if where is None:
                query = query.limit(1)
            fit_id = next((r[0] for r in conn.execute(query) if where is None or where(json.loads(r[1]))), None)
        return None if fit_id is None else self.get_fit(fit_id, with_arrays, with_reference)

    def get_fit(self, fit_id: int, with_arrays: bool = True, with_reference: bool = False) -> dict | None:
        """One fit's catalog row by id (None if there is none); arrays and reference as in `latest_fit`."""
        cols = [c for c in cat.fits.c if with_arrays or c.name != "arrays"]
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*cols).where(cat.fits.c.fit_id == fit_id)).first()
            if row is None:
                return None
            out = dict(row._mapping)
            what = f"fit #{fit_id} of model {out['model_id']}"
            try:
                if with_arrays:
                    out["arrays"] = cat.unpack_many(out["arrays"], what)
                    if with_reference:
                        blob = conn.execute(sa.select(cat.fit_references.c.arrays).where(
                            cat.fit_references.c.fit_id == out["fit_id"])).scalar()
                        if blob is None:
                            raise CatalogDamaged(f"{what} has lost its reference sample")
                        out["arrays"].update(cat.unpack_many(blob, f"the reference sample of {what}"))
                try:
                    out["options"] = json.loads(out["options"])
                except (TypeError, ValueError, UnicodeDecodeError) as e:
                    raise cat.damaged_value(f"the options of {what}", e) from None
            except CatalogDamaged as e:
                raise CatalogDamaged(f"{e}: run `clipsql doctor {self.path} --repair` (drops it), then refit with "
                                     f"`clipsql stats fit {self.path} --model {out['model_id']}`") from None
        return out


def pick_model(models: list[ModelRecord], default: str | None, name: str | None, path: Any) -> ModelRecord:
    """The model `name` (an id, or a unique part of one) among `models`; None → `default` (else the first)."""
    if not models:
        raise ModelError(f"store {path} has no models yet: ingest data first "
                         "(`clipsql ingest STORE SOURCE --model …`)")
    if name is None:
        name = default or models[0].model_id
    exact = [m for m in models if m.model_id == name]
    if exact:
        return exact[0]
    partial = [m for m in models if name in m.model_id]
    if len(partial) == 1:
        return partial[0]
    known = ", ".join(m.model_id for m in models)
    if partial:
        raise ModelError(f"model {name!r} is ambiguous in this store; one of: {known}")
    raise ModelError(f"model {name!r} is not in this store; known models: {known}")


def read_marker(path: Path) -> dict:
    """The store's clipsql.json, checked: present, valid JSON, a format this clipsql reads.
    MarkerDamaged when it is there but unreadable (doctor --repair rewrites it from the catalog)."""
    marker_path = store_path(path) / MARKER
    if not marker_path.exists():
        raise StoreNotFound(f"no clipsql store at {path}: create one with `clipsql init {path}`")
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        if not isinstance(marker, dict):
            raise ValueError("not a JSON object")
        if not isinstance(marker.get("format", FORMAT_VERSION), int) or \
                not isinstance(marker.get("store_id", ""), (str, type(None))) or \
                not isinstance(marker.get("catalog"), (str, type(None))):
            raise ValueError("a field has the wrong type")
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise MarkerDamaged(f"{marker_path} is damaged ({str(e).splitlines()[0][:120]}): `clipsql doctor {path} "
                            "--repair` rewrites it from the catalog (which records the store id); a catalog "
                            "database outside the store: set CLIPSQL_CATALOG_URL to it first") from None
    fmt = marker.get("format", FORMAT_VERSION)
    if fmt > FORMAT_VERSION:
        raise StoreNotFound(f"{path} is a store of format {fmt!r}, newer than this clipsql reads ({FORMAT_VERSION}): "
                            "upgrade clipsql")
    return marker


def write_marker(path: Path, catalog_url: str | None, store_id: str) -> dict:
    """Write the store's clipsql.json (a local one through a temporary file and a rename)."""
    marker = {"format": FORMAT_VERSION, "catalog": catalog_url, "store_id": store_id}
    text = json.dumps(marker, indent=2) + "\n"
    target = store_path(path) / MARKER
    if is_remote(target):
        target.write_text(text)
        return marker
    tmp = Path(str(target) + f".tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return marker


def _undo_init(path: Path, remove_dir: bool) -> None:
    """Remove what a failed `Store.init` made (the directory was new, or empty before)."""
    if remove_dir:
        rmtree(path)
        return
    for child in path.iterdir():
        if child.is_dir():
            rmtree(child)
        else:
            child.unlink(missing_ok=True)


def set_committed_version(conn: sa.Connection, name: str, version: int, commit_id: int | None) -> None:
    conn.execute(sa.delete(cat.table_versions).where(cat.table_versions.c.table_name == name))
    conn.execute(cat.table_versions.insert().values(table_name=name, version=int(version), commit_id=commit_id))


@dataclass
class PendingCommit:
    """What one commit makes visible: written (unreferenced) fragments, their statistics
    partial, the source units it completes and the rejects seen since the last commit."""
    run_id: int | None
    source: str
    seq: int
    fragments: list = field(default_factory=list)          # model table
    sample_fragments: list = field(default_factory=list)   # samples table
    rows: int = 0
    sample_rows: int = 0
    moments: dict = field(default_factory=dict)            # (modality, space) → RunningMoments partial
    units: list = field(default_factory=list)              # (unit_key, rows, rejected)
    stamps: dict = field(default_factory=dict)             # {unit_key: store.units.UnitStamp} of those units
    rejects: list = field(default_factory=list)            # (location, reason, detail)
    meta_types: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """Nothing to commit: no rows, no completed units, no rejects, no new metadata columns."""
        return not (self.rows or self.sample_rows or self.units or self.rejects or self.meta_types)


def default_catalog(path: Path) -> str:
    return f"sqlite:///{(Path(path) / 'catalog.sqlite').resolve()}"


def merge_sql_types(a: str, b: str) -> str:
    if a == b:
        return a
    if {a, b} == {"BIGINT", "DOUBLE"}:
        return "DOUBLE"
    return "VARCHAR"
