"""A clipsql store is a directory: Lance tables plus a SQLAlchemy catalog.

    STORE/
      clipsql.json       marker: format version, catalog URL and the store id (also in the
                         catalog's `settings`: one catalog database holds one store)
      lance/             Lance datasets (LanceDB layout): `samples` and one `emb_<model>` per
                         model, created with stable row ids and V2 manifest paths
      catalog.sqlite     default catalog (WAL); `--catalog URL` puts it elsewhere
      .write.lock        flock()ed by the one writer

The store itself is its identity and plumbing: create and open (the marker and the catalog
bound to each other), the writer lock, settings, models, and the Lance tables at the versions the
commit ledger names. Its parts are plain functions taking the store: the ledger and the write
protocol (store.ledger), reads of a model's rows (store.reads), running statistics (store.stats),
run records (store.runs) and fit rows (store.fit_rows).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from functools import cached_property
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import sqlalchemy as sa

from clipsql.errors import CatalogError, DimensionMismatch, StorageError, StoreNotFound
from clipsql.lazy import lance, lancedb
from clipsql.store import catalog as cat
from clipsql.store.drops import sweep_dropped_tables
from clipsql.store.faults import fault
from clipsql.store.ledger import committed_versions, set_committed_version
from clipsql.store.location import exists, is_remote, rmtree, store_path, table_created
from clipsql.store.locks import file_lock, lease, lease_seconds
from clipsql.store.marker import FORMAT_VERSION, MARKER, read_marker
from clipsql.store.records import ModelRecord, pick_model
from clipsql.store.tables import (SAMPLES, STORAGE_TYPES, derived_tables, embeddings_schema, embeddings_table_name,
                                  samples_schema)

MODEL_METADATA_KEY = "clipsql.model"     # Lance schema metadata of a model table: its model record


class Store:
    """A store's identity and plumbing (the module docstring); its parts are functions taking it."""

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
                       logit_bias: float | None, context_length: int | None, spec: dict,
                       storage: str | None = None) -> ModelRecord:
        """Record a model (idempotent) and create its embedding table; the first model becomes the default.
        `storage`: how its vectors are stored, float32 or float16, chosen when the model is first
        recorded (None: float32, or what the model already has); asking an existing model for the
        other is refused."""
        if storage is not None and storage not in STORAGE_TYPES:
            raise StorageError(f"unknown storage {storage!r}: use one of {', '.join(STORAGE_TYPES)}", param="storage")
        existing = {m.model_id: m for m in self.list_models()}
        if model_id in existing:
            rec = existing[model_id]
            if rec.dim != dim:
                raise DimensionMismatch(f"model {model_id} is recorded with dim {rec.dim} but now produces {dim}")
            check_storage(rec, storage)
            return rec
        if storage not in (None, "float32"):      # float32 models record nothing: as every model before
            spec = {**spec, "storage": storage}
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
        return sorted(p.name[:-len(".lance")] for p in root.glob("*.lance") if table_created(p)) \
            if root.is_dir() else []

    def table_uri(self, name: str) -> str:
        return str(self.path / "lance" / f"{name}.lance")

    def _create_table(self, name: str, schema: pa.Schema) -> None:
        """An empty Lance table with stable row ids and V2 manifest paths, recorded at version 1. A
        directory left by a creation (or first write) killed before any version holds nothing
        committed: it is cleared first."""
        uri = self.table_uri(name)
        if exists(uri) and not table_created(uri):
            rmtree(uri)
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
                if table_created(uri):
                    raise StoreNotFound(f"Lance table {rec.table_name} of {self.path} cannot be opened "
                                        f"({str(e).splitlines()[0]}): run `clipsql doctor {self.path}`") from None
                rmtree(uri)      # data files of a creation killed before its first version: nothing to keep
            else:
                field = ds.schema.field("image_embedding") if "image_embedding" in ds.schema.names else None
                rows = ds.count_rows()
                empty = rows == 0 and field is not None and getattr(field.type, "list_size", None) == rec.dim
                if empty and field.type.value_type == STORAGE_TYPES[rec.storage]:
                    return ds.version
                if not empty:
                    raise StoreNotFound(f"Lance table {rec.table_name} of {self.path} holds {rows} rows of model "
                                        f"{rec.model_id}, which the catalog does not know (a lost or replaced "
                                        f"catalog): rebuild the catalog from the Lance data with `clipsql doctor "
                                        f"{self.path} --repair`")
                rmtree(uri)      # empty, of the other storage (a first ingest killed, retried otherwise)
        # the table carries its model record, so `clipsql doctor --repair` can rebuild a lost catalog
        meta = {MODEL_METADATA_KEY: json.dumps(dict(
            model_id=rec.model_id, kind=rec.kind, dim=rec.dim, logit_scale=rec.logit_scale,
            logit_bias=rec.logit_bias, context_length=rec.context_length, spec=rec.spec), sort_keys=True)}
        schema = embeddings_schema(rec.dim, rec.storage).with_metadata(meta)
        ds = lance.write_dataset(schema.empty_table(), uri, schema=schema, mode="create",
                                 enable_stable_row_ids=True, enable_v2_manifest_paths=True)
        return ds.version

    def dataset(self, name: str, version: int | None = None, *, latest: bool = False):  # noqa: ANN201
        """The Lance dataset `name` at its committed version (or `version`; `latest` for writers)."""
        os.environ.setdefault("LANCE_LOG", "error")
        if version is None and not latest:
            version = committed_versions(self).get(name)
        try:
            return lance.dataset(self.table_uri(name), version=version)
        except (OSError, ValueError) as e:
            raise StoreNotFound(f"Lance table {name} of {self.path} cannot be opened at version {version}: "
                                f"{str(e).splitlines()[0]} — run `clipsql doctor {self.path}`") from None

    def samples_table(self, version: int | None = None):  # noqa: ANN201
        """The `samples` Lance dataset at its committed version, or None before the first ingest."""
        if not table_created(self.table_uri(SAMPLES)):
            return None
        return self.dataset(SAMPLES, version)

    def ensure_samples_table(self) -> None:
        if not table_created(self.table_uri(SAMPLES)):
            self._create_table(SAMPLES, samples_schema())

    def embeddings_table(self, model: ModelRecord, version: int | None = None):  # noqa: ANN201
        return self.dataset(model.table_name, version)


def check_storage(rec: ModelRecord, storage: str | None) -> None:
    """Refuse `storage` (None: any) for a model stored otherwise: its table's type is fixed."""
    if storage is not None and storage != rec.storage:
        raise StorageError(f"model {rec.model_id} is stored as {rec.storage}, not {storage}: a model's storage is "
                           f"chosen when it is first ingested; drop `storage` (or pass {rec.storage}), or remove "
                           f"the model first (`clipsql models rm`)", param="storage")


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


def default_catalog(path: Path) -> str:
    return f"sqlite:///{(Path(path) / 'catalog.sqlite').resolve()}"

