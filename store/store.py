"""A clipsql store is a directory: a LanceDB database plus a SQLAlchemy catalog.

    STORE/
      clipsql.json       marker: format version, catalog URL and the store id (also in the
                         catalog's `settings`: one catalog database holds one store)
      lance/             LanceDB: table `samples` and one `emb_<model>` table per model
      catalog.sqlite     default catalog (WAL); `--catalog URL` puts it elsewhere
      .write.lock        flock()ed by the one writer

Write protocol for one batch (single writer, under the lock):
  1. append new sample rows to `samples`          (one Lance commit)
  2. append embedding rows, stamped `seq`, to the model table   (one Lance commit)
  3. one catalog transaction: record rejects, metadata column types and run counters.
The writer folds each committed batch into its in-memory running statistics and
saves them (stamped `covered_seq`, the last batch folded in) every few seconds and
at the end. Rows of a killed run beyond `covered_seq` are folded in by
`sync_stats` at the next ingest or `stats refresh`, so the statistics always
equal the stored vectors. A kill
between 1 and 2 leaves samples without embeddings, which the next ingest encodes.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from . import catalog as cat
from .errors import CatalogError, DimensionMismatch, ModelError, StoreLocked, StoreNotFound
from .stats import RunningMoments, normalize_rows

MARKER = "clipsql.json"
FORMAT_VERSION = 1
MODALITIES = ("image", "text")
SPACES = ("raw", "normalized")
SAMPLE_COLUMNS = ("id", "uri", "caption", "width", "height", "source", "location",
                  "caption_truncated", "metadata")


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    table_name: str
    kind: str
    dim: int
    logit_scale: float
    logit_bias: float | None
    context_length: int | None
    spec: dict

    @classmethod
    def from_row(cls, row: Any) -> "ModelRecord":
        m = row._mapping
        return cls(m["model_id"], m["table_name"], m["kind"], int(m["dim"]), float(m["logit_scale"]),
                   None if m["logit_bias"] is None else float(m["logit_bias"]), m["context_length"],
                   json.loads(m["spec"]))


@dataclass
class StatsState:
    """Running statistics of one model: moments per (modality, space) and the batch seq they cover."""
    model_id: str
    moments: dict[tuple[str, str], RunningMoments]
    covered_seq: int

    @property
    def n(self) -> int:
        return self.moments[("image", "raw")].n


def samples_schema() -> pa.Schema:
    return pa.schema([
        ("id", pa.string()), ("uri", pa.string()), ("caption", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()), ("source", pa.string()),
        ("location", pa.string()), ("caption_truncated", pa.bool_()), ("metadata", pa.string()),
    ])


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("id", pa.string()),
        ("image_embedding", pa.list_(pa.float32(), dim)),
        ("text_embedding", pa.list_(pa.float32(), dim)),
        ("seq", pa.int64()),
    ])


def table_name_for(model_id: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", model_id.lower()).strip("_")[:40]
    return f"emb_{slug}_{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"


class Store:
    def __init__(self, path: Path, catalog_url: str):
        self.path = Path(path)
        self.catalog_url = catalog_url
        self.engine = cat.make_engine(catalog_url)

    # -- lifecycle ----------------------------------------------------------------------
    @classmethod
    def init(cls, path: str | os.PathLike, catalog_url: str | None = None) -> "Store":
        path = Path(path)
        if (path / MARKER).exists():
            store = cls.open(path)
            cat.migrate(store.engine)
            return store
        if path.exists() and any(path.iterdir()):
            raise StoreNotFound(f"{path} exists and is not an empty directory or a clipsql store; "
                                "choose a new path")
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        try:
            (path / "lance").mkdir(exist_ok=True)
            store_id = uuid.uuid4().hex
            marker = {"format": FORMAT_VERSION, "catalog": catalog_url,  # None = catalog.sqlite inside
                      "store_id": store_id}
            store = cls(path, catalog_url or _default_catalog(path))
            cat.migrate(store.engine)
            store._claim_catalog(store_id)
            (path / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        except BaseException:
            # leave nothing half-made behind (an unreachable catalog, a missing driver): the same
            # `clipsql init` works once the cause is fixed
            _undo_init(path, remove_dir=created)
            raise
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, migrate: bool = True) -> "Store":
        path = Path(path)
        marker_path = path / MARKER
        if not marker_path.exists():
            raise StoreNotFound(f"no clipsql store at {path}: create one with `clipsql init {path}`")
        marker = json.loads(marker_path.read_text())
        url = os.environ.get("CLIPSQL_CATALOG_URL") or marker.get("catalog") or _default_catalog(path)
        store = cls(path, url)
        if migrate:
            cat.migrate(store.engine)
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
        if self.get_setting("store_id") != store_id:
            where = self.get_setting("store_path") or "no store"
            raise CatalogError(f"{self.path} and the catalog at {cat.safe_url(self.engine.url)} belong to "
                               f"different stores (the catalog holds {where}); "
                               "point CLIPSQL_CATALOG_URL (or the store's clipsql.json) at this store's catalog")

    @cached_property
    def db(self):  # noqa: ANN201 - lancedb.DBConnection
        os.environ.setdefault("LANCE_LOG", "error")   # Lance's Rust logger warns on every table creation
        import lancedb
        return lancedb.connect(str(self.path / "lance"))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive writer lock; a second writer fails at once with StoreLocked."""
        lock_path = self.path / ".write.lock"
        fh = open(lock_path, "a+")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise StoreLocked(f"{self.path} is being written by {holder}; one writer per store — "
                                  "wait for it to finish (readers such as `clipsql query` can run meanwhile)") from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
            yield
        finally:
            fh.close()  # closing releases the flock

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
        rec = ModelRecord(model_id, table_name_for(model_id), kind, int(dim), float(logit_scale),
                          None if logit_bias is None else float(logit_bias), context_length, spec)
        if rec.table_name not in self._table_names():
            self.db.create_table(rec.table_name, schema=embeddings_schema(rec.dim))
        with self.engine.begin() as conn:
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
        if not models:
            raise ModelError(f"store {self.path} has no models yet: ingest data first "
                             "(`clipsql ingest STORE SOURCE --model …`)")
        if name is None:
            name = self.get_setting("default_model") or models[0].model_id
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

    # -- Lance tables ---------------------------------------------------------------------
    def _table_names(self) -> list[str]:
        res = self.db.list_tables()
        return list(getattr(res, "tables", res))

    def samples_table(self, create: bool = False):  # noqa: ANN201
        if "samples" not in self._table_names():
            if not create:
                return None
            return self.db.create_table("samples", schema=samples_schema())
        return self.db.open_table("samples")

    def embeddings_table(self, model: ModelRecord):  # noqa: ANN201
        return self.db.open_table(model.table_name)

    def sample_ids(self) -> set[str]:
        tbl = self.samples_table()
        if tbl is None:
            return set()
        return set(tbl.to_lance().to_table(columns=["id"]).column("id").to_pylist())

    def embedding_ids(self, model: ModelRecord) -> set[str]:
        ds = self.embeddings_table(model).to_lance()
        return set(ds.to_table(columns=["id"]).column("id").to_pylist())

    def max_seq(self, model: ModelRecord) -> int:
        ds = self.embeddings_table(model).to_lance()
        col = ds.to_table(columns=["seq"]).column("seq")
        return int(pa.compute.max(col).as_py() or 0) if len(col) else 0

    def count_rows(self, model: ModelRecord) -> int:
        return self.embeddings_table(model).count_rows()

    def read_embeddings(self, model: ModelRecord, *, min_seq: int | None = None,
                        ids: list[str] | None = None, columns: tuple[str, ...] = ("id", "image_embedding",
                                                                                   "text_embedding")) -> pa.Table:
        ds = self.embeddings_table(model).to_lance()
        filt = None
        if min_seq is not None:
            filt = f"seq > {int(min_seq)}"
        tbl = ds.to_table(columns=list(columns), filter=filt)
        if ids is not None:
            import pyarrow.compute as pc
            tbl = tbl.filter(pc.is_in(tbl.column("id"), value_set=pa.array(ids, pa.string())))
        return tbl

    # -- writing ------------------------------------------------------------------------
    def write_batch(self, model: ModelRecord, *, samples: pa.Table | None, ids: list[str],
                    image: np.ndarray, text: np.ndarray, seq: int, run_id: int,
                    source: str, rejects: list[tuple[str, str, str]], meta_types: dict[str, str]) -> None:
        """Commit one batch following the write protocol in the module docstring."""
        if image.shape != text.shape or image.ndim != 2 or image.shape[1] != model.dim:
            raise DimensionMismatch(f"model {model.model_id} has dim {model.dim}; got image {image.shape} "
                                    f"and text {text.shape}")
        if meta_types:   # before the samples commit, so a kill cannot leave columns unregistered
            with self.engine.begin() as conn:
                self._record_meta_types(conn, meta_types)
        if samples is not None and samples.num_rows:
            self.samples_table(create=True).add(samples)
        if ids:
            self.embeddings_table(model).add(pa.table({
                "id": pa.array(ids, pa.string()),
                "image_embedding": _fixed_list(image, model.dim),
                "text_embedding": _fixed_list(text, model.dim),
                "seq": pa.array(np.full(len(ids), seq, dtype=np.int64)),
            }, schema=embeddings_schema(model.dim)))
        with self.engine.begin() as conn:
            self._record_rejects(conn, run_id, model.model_id, source, rejects)
            if ids or rejects:
                conn.execute(sa.update(cat.ingest_runs).where(cat.ingest_runs.c.run_id == run_id).values(
                    added=cat.ingest_runs.c.added + len(ids),
                    rejected=cat.ingest_runs.c.rejected + len(rejects)))

    def record_rejects(self, run_id: int, model_id: str | None, source: str,
                       rejects: list[tuple[str, str, str]]) -> None:
        with self.engine.begin() as conn:
            self._record_rejects(conn, run_id, model_id, source, rejects)
            conn.execute(sa.update(cat.ingest_runs).where(cat.ingest_runs.c.run_id == run_id).values(
                rejected=cat.ingest_runs.c.rejected + len(rejects)))

    def _record_rejects(self, conn: sa.Connection, run_id: int, model_id: str | None, source: str,
                        rejects: list[tuple[str, str, str]]) -> None:
        now = time.time()
        for location, reason, detail in rejects:
            exists = conn.execute(sa.select(cat.rejects.c.reject_id).where(
                cat.rejects.c.source == source, cat.rejects.c.location == location,
                cat.rejects.c.reason == reason)).first()
            if exists is None:
                conn.execute(cat.rejects.insert().values(
                    run_id=run_id, model_id=model_id, source=source, location=location, reason=reason,
                    detail=detail, created_at=now))

    def _record_meta_types(self, conn: sa.Connection, meta_types: dict[str, str]) -> None:
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

    # -- runs ---------------------------------------------------------------------------
    def start_run(self, model_id: str, source: str, source_kind: str) -> int:
        with self.engine.begin() as conn:
            res = conn.execute(cat.ingest_runs.insert().values(
                model_id=model_id, source=source, source_kind=source_kind, status="running",
                started_at=time.time(), added=0, skipped=0, rejected=0))
            return int(res.inserted_primary_key[0])

    def finish_run(self, run_id: int, status: str, skipped: int, summary: dict) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.update(cat.ingest_runs).where(cat.ingest_runs.c.run_id == run_id).values(
                status=status, finished_at=time.time(), skipped=skipped, summary=cat.to_json(summary)))

    # -- statistics -----------------------------------------------------------------------
    def stats(self, model: ModelRecord) -> StatsState:
        with self.engine.connect() as conn:
            return self._load_stats(conn, model)

    def _load_stats(self, conn: sa.Connection, model: ModelRecord) -> StatsState:
        rows = conn.execute(sa.select(cat.running_stats).where(
            cat.running_stats.c.model_id == model.model_id)).fetchall()
        moments = {(mo, sp): RunningMoments(model.dim) for mo in MODALITIES for sp in SPACES}
        covered = 0
        for r in rows:
            m = r._mapping
            moments[(m["modality"], m["space"])] = RunningMoments(
                model.dim, int(m["n"]), cat.unpack(m["shift"]), cat.unpack(m["sum"]), cat.unpack(m["sum_outer"]))
            covered = int(m["covered_seq"])
        return StatsState(model.model_id, moments, covered)

    def save_stats(self, state: StatsState) -> None:
        with self.engine.begin() as conn:
            self._save_stats(conn, state)

    def _save_stats(self, conn: sa.Connection, state: StatsState) -> None:
        conn.execute(sa.delete(cat.running_stats).where(cat.running_stats.c.model_id == state.model_id))
        now = time.time()
        for (mo, sp), rm in state.moments.items():
            conn.execute(cat.running_stats.insert().values(
                model_id=state.model_id, modality=mo, space=sp, dim=rm.dim, n=rm.n, shift=cat.pack(rm.shift),
                sum=cat.pack(rm.s1), sum_outer=cat.pack(rm.s2), covered_seq=state.covered_seq, updated_at=now))

    def _fold(self, state: StatsState, tbl: pa.Table) -> None:
        if tbl.num_rows:
            update_moments(state, to_numpy(tbl.column("image_embedding")),
                            to_numpy(tbl.column("text_embedding")))

    def uncovered_rows(self, model: ModelRecord) -> int:
        state = self.stats(model)
        return self.count_rows(model) - state.n

    def sync_stats(self, model: ModelRecord) -> StatsState:
        """Fold in rows committed after the last statistics update (a killed ingest leaves some)."""
        with self.engine.begin() as conn:
            state = self._load_stats(conn, model)
            tbl = self.read_embeddings(model, min_seq=state.covered_seq,
                                       columns=("image_embedding", "text_embedding", "seq"))
            if tbl.num_rows:
                self._fold(state, tbl)
                state.covered_seq = int(pa.compute.max(tbl.column("seq")).as_py())
                self._save_stats(conn, state)
            return state

    def refresh_stats(self, model: ModelRecord, batch_rows: int = 65536) -> StatsState:
        """Recompute the running statistics from every stored vector."""
        state = StatsState(model.model_id, {(mo, sp): RunningMoments(model.dim) for mo in MODALITIES
                                            for sp in SPACES}, 0)
        ds = self.embeddings_table(model).to_lance()
        for batch in ds.to_batches(columns=["image_embedding", "text_embedding", "seq"], batch_size=batch_rows):
            tbl = pa.Table.from_batches([batch])
            self._fold(state, tbl)
            if tbl.num_rows:
                state.covered_seq = max(state.covered_seq, int(pa.compute.max(tbl.column("seq")).as_py()))
        with self.engine.begin() as conn:
            self._save_stats(conn, state)
        return state

    # -- fits (reference samples) -------------------------------------------------------------
    def save_fit(self, model: ModelRecord, *, n_rows: int, covered_seq: int, reference_size: int,
                 options: dict, arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> int:
        """Store a fit: its O(M + d²) arrays in `fits`, the M × d reference sample in `fit_references`
        (so scores that need only means and factors never load the reference)."""
        with self.engine.begin() as conn:
            res = conn.execute(cat.fits.insert().values(
                model_id=model.model_id, created_at=time.time(), n_rows=n_rows, covered_seq=covered_seq,
                reference_size=reference_size, options=cat.to_json(options), arrays=cat.pack_many(arrays)))
            fit_id = int(res.inserted_primary_key[0])
            conn.execute(cat.fit_references.insert().values(fit_id=fit_id, arrays=cat.pack_many(reference)))
            return fit_id

    def latest_fit(self, model: ModelRecord, with_arrays: bool = True, with_reference: bool = False) -> dict | None:
        """The newest fit's catalog row; `arrays` (and the reference sample merged into them) on request."""
        cols = [c for c in cat.fits.c if with_arrays or c.name != "arrays"]
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*cols).where(cat.fits.c.model_id == model.model_id)
                               .order_by(cat.fits.c.fit_id.desc()).limit(1)).first()
            if row is None:
                return None
            out = dict(row._mapping)
            if with_arrays:
                out["arrays"] = cat.unpack_many(out["arrays"])
                if with_reference:
                    blob = conn.execute(sa.select(cat.fit_references.c.arrays).where(
                        cat.fit_references.c.fit_id == out["fit_id"])).scalar()
                    out["arrays"].update(cat.unpack_many(blob))
        out["options"] = json.loads(out["options"])
        return out


def _undo_init(path: Path, remove_dir: bool) -> None:
    """Remove what a failed `Store.init` made (the directory was new, or empty before)."""
    if remove_dir:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _default_catalog(path: Path) -> str:
    return f"sqlite:///{(Path(path) / 'catalog.sqlite').resolve()}"


def _fixed_list(X: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(X, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """FLOAT[d] column → (n, d) float32 array (zero-copy where possible)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    dim = arr.type.list_size
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), dim)


def update_moments(state: StatsState, image: np.ndarray, text: np.ndarray) -> None:
    for modality, X in (("image", image), ("text", text)):
        X64 = np.asarray(X, dtype=np.float64)
        state.moments[(modality, "raw")].update(X64)
        state.moments[(modality, "normalized")].update(normalize_rows(X64))


def merge_sql_types(a: str, b: str) -> str:
    if a == b:
        return a
    if {a, b} == {"BIGINT", "DOUBLE"}:
        return "DOUBLE"
    return "VARCHAR"
