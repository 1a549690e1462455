"""What a reader sees: one read of the catalog, in one transaction.

    snap = Snapshot.read(st)                # committed versions, models, fits, statistics, …
    snap.dataset("samples")                 # the Lance table at the version the snapshot names

A connection (queries.sql.db.connect), a report (`stats show`, `geometry`) or a server session
builds everything from one `Snapshot`, so it never mixes two commits: the `stats` view's `n`
matches the rows the views read, a model registered or removed meanwhile is either wholly in or
wholly out. The catalog is read in one transaction (SQLite: one read transaction of the WAL;
PostgreSQL: REPEATABLE READ). What does not change once written is read later, on demand: a fit's
arrays by its id (fits are immutable; `models rm` keeps the rows of its fits readable for the
same retention as its tables, store.drops), row counts at the named versions, target rows.

`Snapshot.read(st, samples_only=True)` reads only what the `samples`, `deletions` and `tags`
views need (committed versions and metadata column types): commands that select ids
(`delete --where`, dry runs) never read models, statistics or fits.
"""
from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import sqlalchemy as sa

from clipsql.errors import CatalogDamaged, StatsError
from clipsql.store import catalog as cat
from clipsql.store.fit_rows import FitRow, get_fit
from clipsql.store.fits import DEFAULT_STALE_SHARE, stale_message
from clipsql.store.records import ModelRecord, pick_model
from clipsql.store.stats import StatsState, load_stats_in
from clipsql.store.store import Store
from clipsql.store.targets import Target, target_from_row


@contextlib.contextmanager
def read_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A catalog connection whose reads all see one committed state."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            # pysqlite starts no transaction for reads: each SELECT would see the latest commit
            conn.exec_driver_sql("BEGIN")
            yield conn
        return
    level = "REPEATABLE READ" if engine.dialect.name in ("postgresql", "mysql") else "SERIALIZABLE"
    with engine.connect().execution_options(isolation_level=level) as conn:
        with conn.begin():
            yield conn


@dataclass
class Snapshot:
    """One committed state of a store, as a reader sees it (see the module docstring)."""
    store: Store
    versions: dict[str, int]                  # Lance table → committed version
    commit_id: int | None                     # the ledger's last commit
    metadata_columns: dict[str, str]          # metadata key → SQL type
    samples_only: bool = False
    models: tuple[ModelRecord, ...] = ()
    default_model: str | None = None
    stats: dict[str, StatsState] = field(default_factory=dict)     # model id → running statistics
    fits: dict[str, dict] = field(default_factory=dict)            # model id → latest default fit row, no arrays
    stale: dict[int, str] = field(default_factory=dict)            # fit id → why it is stale
    targets: dict[str, Target] = field(default_factory=dict)
    damaged_targets: dict[str, Exception] = field(default_factory=dict)    # name → CatalogDamaged
    rejects: list[dict] = field(default_factory=list)
    stale_share: float = DEFAULT_STALE_SHARE

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._rows: dict[str, int] = {}
        self._datasets: dict[str, Any] = {}
        self._fit_arrays: dict[tuple[int, bool], dict] = {}

    # -- reading -----------------------------------------------------------------------------
    @classmethod
    def read(cls, st: Store, *, samples_only: bool = False) -> "Snapshot":
        with read_transaction(st.engine) as conn:
            versions = dict(conn.execute(sa.select(cat.table_versions.c.table_name,
                                                   cat.table_versions.c.version)).all())
            commit_id = conn.execute(sa.select(sa.func.max(cat.commits.c.commit_id))).scalar()
            meta = dict(conn.execute(sa.select(cat.metadata_columns.c.name, cat.metadata_columns.c.sql_type)
                                     .order_by(cat.metadata_columns.c.name)).all())
            snap = cls(st, versions, commit_id, meta, samples_only=samples_only)
            if samples_only:
                return snap
            snap.models = tuple(ModelRecord.from_row(r) for r in conn.execute(
                sa.select(cat.models).order_by(cat.models.c.created_at)))
            settings = dict(conn.execute(sa.select(cat.settings.c.key, cat.settings.c.value).where(
                cat.settings.c.key.in_(["default_model", "stale_share"]))).all())
            snap.default_model = settings.get("default_model")
            if settings.get("stale_share") is not None:
                snap.stale_share = float(settings["stale_share"])
            snap.stats = {m.model_id: load_stats_in(conn, m, st.path) for m in snap.models}
            cols = [c for c in cat.fits.c if c.name != "arrays"]
            recipe = sa.select(cat.recipe_fits.c.fit_id)
            for row in conn.execute(sa.select(*cols).where(cat.fits.c.fit_id.not_in(recipe))
                                    .order_by(cat.fits.c.fit_id.desc())):
                m = row._mapping
                if m["model_id"] in snap.fits or m["model_id"] not in {r.model_id for r in snap.models}:
                    continue
                snap.fits[m["model_id"]] = FitRow.from_row(m, json.loads(m["options"]))
            snap.stale = dict(conn.execute(sa.select(cat.stale_fits.c.fit_id, cat.stale_fits.c.reason)).all())
            for r in conn.execute(sa.select(cat.targets)):
                try:
                    snap.targets[r._mapping["name"]] = target_from_row(r, st.path)
                except CatalogDamaged as e:     # only the queries using this target fail, saying why
                    snap.damaged_targets[r._mapping["name"]] = e
            snap.rejects = [dict(r._mapping) for r in conn.execute(
                sa.select(cat.rejects).order_by(cat.rejects.c.reject_id))]
        return snap

    # -- models ----------------------------------------------------------------------------------
    def _need_models(self) -> None:
        if self.samples_only:
            raise RuntimeError("a samples-only snapshot holds no models (Snapshot.read(st) reads them)")

    def model(self, name: str | None = None) -> ModelRecord:
        """A model by id (or unique substring); None → the default model (as `Store.model`)."""
        self._need_models()
        return pick_model(list(self.models), self.default_model, name, self.store.path)

    # -- Lance tables at the snapshot's versions ----------------------------------------------
    def dataset(self, name: str) -> Any:
        """The Lance table `name` at the version this snapshot names (opened once)."""
        with self._lock:
            if name not in self._datasets:
                self._datasets[name] = self.store.dataset(name, self.versions.get(name))
            return self._datasets[name]

    def latest(self, name: str) -> Any:
        """A derived table outside the ledger (stored scores, SemDeDup) at the version it had when first
        asked for here (opened once: later rewrites of it are not seen)."""
        key = "latest:" + name
        with self._lock:
            if key not in self._datasets:
                self._datasets[key] = self.store.dataset(name, latest=True)
            return self._datasets[key]

    def embeddings_table(self, rec: ModelRecord) -> Any:
        return self.dataset(rec.table_name)

    def rows(self, rec: ModelRecord) -> int:
        """Rows of the model's table at the snapshot's version."""
        with self._lock:
            if rec.model_id not in self._rows:
                self._rows[rec.model_id] = self.embeddings_table(rec).count_rows()
            return self._rows[rec.model_id]

    # -- fits --------------------------------------------------------------------------------------
    def fit(self, rec: ModelRecord) -> FitRow | None:
        """The model's latest default fit as of the snapshot (its catalog row, without arrays)."""
        self._need_models()
        return self.fits.get(rec.model_id)

    def fit_with_arrays(self, rec: ModelRecord, reference: bool = True) -> FitRow | None:
        """The snapshot's fit of `rec` with its arrays (and reference sample), read by fit id."""
        row = self.fit(rec)
        if row is None:
            return None
        key = (int(row.fit_id), reference)
        with self._lock:
            if key not in self._fit_arrays:
                full = get_fit(self.store, key[0], with_arrays=True, with_reference=reference)
                if full is None:
                    raise_fit_gone(self.store, rec, key[0])
                self._fit_arrays[key] = full
            return self._fit_arrays[key]

    def staleness(self, rec: ModelRecord, fit: FitRow | None = None) -> str | None:
        """Why the model's fit (or `fit`) is stale, as `store.fits.staleness` says it, from this snapshot."""
        fit = fit if fit is not None else self.fit(rec)
        if fit is None:
            return None
        return stale_message(rec, fit, self.stale.get(int(fit.fit_id)), self.rows(rec), self.stale_share)


def raise_fit_gone(st: Store, rec: ModelRecord, fit_id: int) -> None:
    raise StatsError(f"fit #{fit_id} of model {rec.model_id} is no longer in the catalog of {st.path} (removed "
                     "after this connection was opened, past the retention): open a new connection")
