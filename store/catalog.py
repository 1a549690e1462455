"""The catalog: models, ingest runs, rejects and statistics, through SQLAlchemy.

Default backend is a SQLite file inside the store (WAL mode, so analysts can
read while an ingest writes); any SQLAlchemy URL works (PostgreSQL for a team).
The schema evolves by numbered migrations, applied in order and recorded in
``schema_migrations``.
"""
from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from typing import Any
from urllib.parse import quote

import numpy as np
import sqlalchemy as sa

from clipsql.errors import READ_ONLY_HINT, CatalogDamaged, CatalogError, StoreReadOnly

metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)
settings = sa.Table(
    "settings", metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
models = sa.Table(
    "models", metadata,
    sa.Column("model_id", sa.String(500), primary_key=True),
    sa.Column("table_name", sa.String(200), nullable=False, unique=True),
    sa.Column("kind", sa.String(20), nullable=False),           # clip | siglip
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("logit_scale", sa.Float, nullable=False),
    sa.Column("logit_bias", sa.Float, nullable=True),
    sa.Column("context_length", sa.Integer, nullable=True),
    sa.Column("spec", sa.Text, nullable=False),                # JSON: how to load it again
    sa.Column("created_at", sa.Float, nullable=False),
)
ingest_runs = sa.Table(
    "ingest_runs", metadata,
    sa.Column("run_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.String(500), nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("source_kind", sa.String(40), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),        # running | done | failed | aborted (killed)
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("added", sa.Integer, nullable=False, default=0),
    sa.Column("skipped", sa.Integer, nullable=False, default=0),
    sa.Column("rejected", sa.Integer, nullable=False, default=0),
    sa.Column("summary", sa.Text, nullable=True),              # JSON: timings per stage, rejects by reason
)
rejects = sa.Table(
    "rejects", metadata,
    sa.Column("reject_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("model_id", sa.String(500), nullable=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("location", sa.Text, nullable=False),
    sa.Column("reason", sa.String(100), nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("source", "location", "reason", name="uq_reject"),
)
running_stats = sa.Table(
    "running_stats", metadata,
    sa.Column("model_id", sa.String(500), primary_key=True),
    sa.Column("modality", sa.String(10), primary_key=True),    # image | text
    sa.Column("space", sa.String(12), primary_key=True),       # raw | normalized
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("n", sa.BigInteger, nullable=False),
    sa.Column("shift", sa.LargeBinary, nullable=True),
    sa.Column("sum", sa.LargeBinary, nullable=True),
    sa.Column("sum_outer", sa.LargeBinary, nullable=True),
    sa.Column("covered_seq", sa.BigInteger, nullable=False),   # highest write batch folded in
    sa.Column("updated_at", sa.Float, nullable=False),
)
metadata_columns = sa.Table(
    "metadata_columns", metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("sql_type", sa.String(20), nullable=False),      # BIGINT | DOUBLE | BOOLEAN | VARCHAR
)
fits = sa.Table(
    "fits", metadata,
    sa.Column("fit_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.String(500), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("n_rows", sa.BigInteger, nullable=False),        # rows of the model when fitted
    sa.Column("covered_seq", sa.BigInteger, nullable=False),
    sa.Column("reference_size", sa.Integer, nullable=False),
    sa.Column("options", sa.Text, nullable=False),             # JSON: seed, scale, a, b, prior, …
    sa.Column("arrays", sa.LargeBinary, nullable=False),       # npz: reference ids/vectors, priors, means, covariances, factors
)
targets = sa.Table(
    "targets", metadata,
    sa.Column("name", sa.String(200), primary_key=True),       # unique per store: SQL names it alone
    sa.Column("model_id", sa.String(500), nullable=False, index=True),
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("n", sa.BigInteger, nullable=False),             # target rows N_t (valid, normalized)
    sa.Column("table_name", sa.String(200), nullable=False),   # Lance table with the normalized rows
    sa.Column("source", sa.Text, nullable=False),              # what the rows came from (query or source path)
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("options", sa.Text, nullable=False),             # JSON: dropped rows, index and its measured recall
    sa.Column("second_moment", sa.LargeBinary, nullable=False),  # npy float64 (d, d): F_t^T F_t
)

fit_references = sa.Table(
    "fit_references", metadata,
    sa.Column("fit_id", sa.Integer, primary_key=True),
    sa.Column("arrays", sa.LargeBinary, nullable=False),       # npz: ref_ids, X_ref_raw, Y_ref_raw (M × d)
)

# The commit ledger (migration 5). A write is visible once its `commits` row exists:
# readers open each Lance table at the version `table_versions` names, and a writer that
# finds a table ahead of it (a kill between the Lance commit and this transaction) rolls
# the table back to that version first. `ingested_units` remembers which source units a
# model already holds, so a re-run skips them without reading them.
commits = sa.Table(
    "commits", metadata,
    sa.Column("commit_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.String(500), nullable=True),      # NULL: maintenance (optimize)
    sa.Column("run_id", sa.Integer, nullable=True),
    sa.Column("kind", sa.String(20), nullable=False),          # append | optimize | adopt
    sa.Column("rows", sa.BigInteger, nullable=False),          # embedding rows added
    sa.Column("sample_rows", sa.BigInteger, nullable=False),   # sample rows added
    sa.Column("versions", sa.Text, nullable=False),            # JSON {table: version} after the commit
    sa.Column("created_at", sa.Float, nullable=False),
)
table_versions = sa.Table(
    "table_versions", metadata,
    sa.Column("table_name", sa.String(200), primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),       # the committed Lance version readers open
    sa.Column("commit_id", sa.Integer, nullable=True),
)
ingested_units = sa.Table(
    "ingested_units", metadata,
    sa.Column("model_id", sa.String(500), primary_key=True),
    sa.Column("unit_key", sa.String(64), primary_key=True),    # fingerprint: files, sizes, mtimes, row range
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("commit_id", sa.Integer, nullable=True),
    sa.Column("rows", sa.BigInteger, nullable=False),          # rows of the unit stored with this model
    sa.Column("rejected", sa.BigInteger, nullable=False),
)

# Fits invalidated by a change to rows they covered (migration 6): `clipsql delete` and
# `ingest --update` record each fit whose covered rows were removed or rewritten.
stale_fits = sa.Table(
    "stale_fits", metadata,
    sa.Column("fit_id", sa.Integer, primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# Writer leases (migration 7): a store on object storage with a server catalog has no local
# directory to hold a lock file, so its writer lock is a row here, renewed by a heartbeat and
# lapsing at `expires_at` when its holder dies.
leases = sa.Table(
    "leases", metadata,
    sa.Column("name", sa.String(100), primary_key=True),      # writer | score
    sa.Column("holder", sa.String(300), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

# Fits made for a curation recipe (migration 8), e.g. `select --recipe kl-guided` at the model's
# logit scale with the uniform prior: kept out of `latest_fit`, so the default fit that the
# `scores` view uses is never replaced by a recipe's.
recipe_fits = sa.Table(
    "recipe_fits", metadata,
    sa.Column("fit_id", sa.Integer, primary_key=True),
    sa.Column("recipe", sa.String(100), nullable=False, index=True),
)

# Rows a repair could not keep (migration 9): `clipsql doctor --repair` records each loss (a lost
# Lance data file, a damaged manifest) with the sources whose units it forgot, so later checks say
# which rows are missing and which ingest restores them.
lost_rows = sa.Table(
    "lost_rows", metadata,
    sa.Column("loss_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("table_name", sa.String(200), nullable=False),
    sa.Column("model_id", sa.String(500), nullable=True),     # whose units were forgotten (NULL: none)
    sa.Column("rows", sa.BigInteger, nullable=False),
    sa.Column("sources", sa.Text, nullable=False),            # JSON list of the sources to re-ingest
    sa.Column("units", sa.BigInteger, nullable=False),        # source units forgotten
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# What a re-run plans from (migration 10): per ingested unit, the file group it was read from
# (`location`: a DataComp shard, a metadata file with its vectors), their total `size`, their
# modification times (`mtime`: nanoseconds per file, comma-separated) and a hash of their content,
# and how many units the group has (`parts`). A group whose current size and mtimes match rows
# for all its parts (still in `ingested_units`) is skipped without opening any of its files; when
# they differ, its content hash decides (store.units, ingest.planning).
unit_stamps = sa.Table(
    "unit_stamps", metadata,
    sa.Column("model_id", sa.String(500), primary_key=True),
    sa.Column("unit_key", sa.String(64), primary_key=True),
    sa.Column("variant", sa.String(64), nullable=False),       # the source kind and options, hashed
    sa.Column("location", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("mtime", sa.Text, nullable=False),
    sa.Column("content", sa.String(64), nullable=False),
    sa.Column("parts", sa.Integer, nullable=False),
)

# Numbered migrations: (version, name, tables created). Never edit a shipped one; add the next number.
MIGRATIONS: list[tuple[int, str, list[sa.Table]]] = [
    (1, "models, runs, rejects, running stats",
     [settings, models, ingest_runs, rejects, running_stats, metadata_columns]),
    (2, "fitted statistics with reference samples", [fits]),
    (3, "target sets", [targets]),
    (4, "reference samples apart from the fit's O(d²) arrays", [fit_references]),
    (5, "commit ledger: commits, committed table versions, ingested source units",
     [commits, table_versions, ingested_units]),
    (6, "fits made stale by deleted or rewritten rows", [stale_fits]),
    (7, "writer leases for stores on object storage", [leases]),
    (8, "fits made for a curation recipe, apart from the default fit", [recipe_fits]),
    (9, "rows a repair could not keep", [lost_rows]),
    (10, "where, how large and when each ingested unit's files were", [unit_stamps]),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def safe_url(url: str | sa.URL) -> str:
    """The URL with its password masked, for messages."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparseable URL>"


_DRIVERS = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pg8000": "pg8000",
            "asyncpg": "asyncpg", "pymysql": "pymysql", "mysqldb": "mysqlclient"}


def sqlite_file(url: str | sa.URL) -> str | None:
    """The absolute path of a SQLite catalog file, or None (another database, in memory, a `file:` URI)."""
    u = sa.make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:" or \
            u.database.startswith("file:"):
        return None
    return os.path.abspath(u.database)


def read_only_url(url: str) -> str:
    """The URL a reader opens: a SQLite file read-only, at what holds every commit (see
    `sqlite_reader`); other databases unchanged."""
    path = sqlite_file(url)
    if path is None:
        return url
    target, flag = sqlite_reader(path)
    return f"sqlite:///file:{quote(target)}?{flag}&uri=true"


def sqlite_reader(path: str) -> tuple[str, str]:
    """(file, URI flag) that read the SQLite catalog at `path` exactly as the store is, for a process
    that may not be able to write its directory (a read-only mount, a backup, another user).

    Commits live in `path` and, until a checkpoint copies them there, in `path-wal`; SQLite reads
    the WAL through a `-shm` index that it creates beside the file. So:
    - the directory (and any -shm) can be written: `mode=ro`, the ordinary read-only reader;
    - else, -shm and -wal exist and SQLite can read them in place (it can since 3.22, without
      writing them): `mode=ro`, which also stays exact while a writer commits;
    - else, the WAL is absent or empty: every commit is in the main file (writers checkpoint when
      they finish, `checkpoint`), so `immutable=1` reads it alone, exactly (immutable assumes that
      nothing writes the file while it is open: true of a read-only mount or a backup; no writer
      is connected, else -shm and -wal would exist);
    - else (commits in a WAL whose -shm is missing or unreadable, e.g. a backup without it): a
      private copy of the file and its WAL, opened where SQLite can build the index: exact, and
      consistent because neither file changed while it was taken (checked before and after; a
      WAL without -shm has no connection writing it); when it cannot be made, a CatalogError
      saying what to do."""
    folder = os.path.dirname(path)
    shm, wal = path + "-shm", path + "-wal"
    if os.access(folder, os.W_OK) and (not os.path.exists(shm) or os.access(shm, os.W_OK)):
        return path, "mode=ro"
    if os.path.exists(shm) and os.path.exists(wal) and _readable_in_place(path):
        return path, "mode=ro"
    if _stamp(wal) is None or _stamp(wal)[0] == 0:
        return path, "immutable=1"
    return _private_copy(path), "mode=ro"


def _readable_in_place(path: str) -> bool:
    try:
        con = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=5)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
        return True
    except sqlite3.Error:
        return False


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


_COPIES: dict[tuple, str] = {}        # (path, stamps of the file and its WAL) → private copy


def _private_copy(path: str) -> str:
    """A copy of the catalog file and its WAL in a private temporary directory (removed at exit), taken
    while neither changed (else retried); reused while they stay as they are."""
    wal = path + "-wal"
    for _ in range(3):
        key = (path, _stamp(path), _stamp(wal))
        if key in _COPIES:
            return _COPIES[key]
        folder = tempfile.mkdtemp(prefix="clipsql-catalog-")
        atexit.register(shutil.rmtree, folder, True)
        copy = os.path.join(folder, os.path.basename(path))
        try:
            shutil.copyfile(path, copy)
            shutil.copyfile(wal, copy + "-wal")
        except OSError as e:
            shutil.rmtree(folder, True)
            raise CatalogError(f"the catalog {path} has commits in {os.path.basename(wal)} that this process cannot "
                               f"read ({e.strerror}: {e.filename}); someone who can write the store should run "
                               "any write command on it, e.g. `clipsql optimize STORE` (a writer moves every "
                               "commit into the catalog file when it finishes)") from None
        if (path, _stamp(path), _stamp(wal)) == key:
            _COPIES[key] = copy
            return copy
        shutil.rmtree(folder, True)
    raise CatalogError(f"the catalog {path} kept changing while it was read (a writer is running): re-run when "
                       "it has finished")


def checkpoint(engine: sa.Engine) -> bool:
    """Move every commit of a SQLite catalog's WAL into its main file and empty the WAL
    (`wal_checkpoint(TRUNCATE)`), so that readers that read the main file alone (`sqlite_reader`)
    see every commit. Writers call it when they finish. It waits for nobody: while a reader still
    reads an older snapshot the WAL keeps what it holds (such readers then read it in place or from
    a copy). True when the WAL is empty afterwards; never raises, never creates a catalog."""
    path = sqlite_file(engine.url) if engine.dialect.name == "sqlite" else None
    if path is None or not os.path.exists(path):
        return True
    try:
        con = sqlite3.connect(f"file:{quote(path)}?mode=rw", uri=True, timeout=0, isolation_level=None)
        try:
            busy = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        finally:
            con.close()
        return not busy
    except sqlite3.Error:
        return False


def make_engine(url: str, read_only: bool = False) -> sa.Engine:
    try:
        if read_only:
            url = read_only_url(url)
        engine = sa.create_engine(url, future=True)
    except sa.exc.NoSuchModuleError as e:
        raise CatalogError(f"catalog URL {safe_url(url)}: unknown database dialect ({e})") from None
    except sa.exc.ArgumentError as e:
        raise CatalogError(f"catalog URL {url!r} is not a SQLAlchemy URL ({e}); expected e.g. "
                           "sqlite:////abs/path/catalog.sqlite or postgresql+psycopg://user:pw@host/db") from None
    except ImportError as e:
        name = (e.name or "").split(".")[0]
        hint = _DRIVERS.get(name.lower(), name or "the database driver")
        raise CatalogError(f"catalog URL {safe_url(url)} needs the {name or 'database'} driver, which is not "
                           f"installed: pip install '{hint}' (for PostgreSQL: pip install -e '.[postgres]')") from None
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            if not read_only:        # (setting the journal mode writes the file)
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    return engine


def migrate(engine: sa.Engine) -> list[int]:
    """Apply pending migrations; returns the versions applied."""
    try:
        schema_migrations.create(engine, checkfirst=True)
    except sa.exc.OperationalError as e:
        first = str(getattr(e, "orig", e)).strip().splitlines()[0]
        if engine.dialect.name == "sqlite":
            path = sqlite_file(engine.url)
            if "readonly" in first or path and not os.access(os.path.dirname(path), os.W_OK):
                raise StoreReadOnly(f"the catalog at {safe_url(engine.url)} cannot be written ({first}); "
                                    f"{READ_ONLY_HINT}") from None
            raise CatalogError(f"cannot open the catalog at {safe_url(engine.url)}: {first}") from None
        raise CatalogError(f"cannot reach the catalog at {safe_url(engine.url)}: {first}. Check that the "
                           "server is running and the URL's user, password, host and database are right "
                           "(CLIPSQL_CATALOG_URL overrides the URL a store recorded)") from None
    except sa.exc.DatabaseError as e:     # not a database any more: truncated, overwritten
        raise damaged(engine, e) from None
    with engine.begin() as conn:
        done = {r[0] for r in conn.execute(sa.select(schema_migrations.c.version))}
    if done and max(done) > SCHEMA_VERSION:
        raise CatalogError(f"the catalog at {safe_url(engine.url)} has schema version {max(done)}, newer than "
                           f"this clipsql understands ({SCHEMA_VERSION}): upgrade clipsql")
    applied = []
    for version, name, tables in MIGRATIONS:
        if version in done:
            continue
        with engine.begin() as conn:
            for table in tables:
                table.create(conn, checkfirst=True)
            conn.execute(schema_migrations.insert().values(version=version, name=name, applied_at=time.time()))
        applied.append(version)
    return applied


def damaged(engine: sa.Engine, e: BaseException) -> CatalogError:
    first = (str(getattr(e, "orig", e)).strip().splitlines() or [type(e).__name__])[0]
    return CatalogError(f"the catalog at {safe_url(engine.url)} is damaged ({first}): restore it from a backup, "
                        "or rebuild it from the Lance data with `clipsql doctor STORE --repair`")


def check_schema(engine: sa.Engine, writer: bool) -> None:
    """Refuse a catalog newer than this clipsql; a reader also refuses one that needs migrating
    (readers never migrate: only a writer changes the catalog)."""
    try:
        v = schema_version(engine)
    except sa.exc.OperationalError as e:
        first = str(getattr(e, "orig", e)).strip().splitlines()[0]
        raise CatalogError(f"cannot read the catalog at {safe_url(engine.url)}: {first}") from None
    except sa.exc.DatabaseError as e:
        raise damaged(engine, e) from None
    if v > SCHEMA_VERSION:
        raise CatalogError(f"the catalog at {safe_url(engine.url)} has schema version {v}, newer than this "
                           f"clipsql understands ({SCHEMA_VERSION}): upgrade clipsql")
    if v < SCHEMA_VERSION and not writer:
        raise CatalogError(f"the catalog at {safe_url(engine.url)} has schema version {v} and this clipsql "
                           f"needs {SCHEMA_VERSION}; readers never migrate it: run a write command once, "
                           "e.g. `clipsql optimize STORE`")


def schema_version(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        v = conn.execute(sa.select(sa.func.max(schema_migrations.c.version))).scalar()
    return int(v or 0)


# -- array (de)serialisation: float64 stays float64, bit for bit ---------------------------
def pack(arr: np.ndarray | None) -> bytes | None:
    if arr is None:
        return None
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


# np.load parses the .npy header with ast.literal_eval, and on CPython 3.11 building
# AST objects on two threads at once can fail with "SystemError: AST constructor
# recursion depth mismatch" (the depth counter is interpreter-global; cpython#106905).
# DuckDB calls score UDFs from several threads, so every unpack goes through one lock.
NPY_LOCK = threading.Lock()


def unpack(blob: bytes | None, what: str = "an array") -> np.ndarray | None:
    """The array of `pack`; CatalogDamaged (naming `what`) when the bytes cannot be read."""
    if blob is None:
        return None
    try:
        with NPY_LOCK:
            return np.load(io.BytesIO(blob), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - damaged bytes fail np.load in many ways
        raise damaged_value(what, e) from None


def pack_many(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_many(blob: bytes, what: str = "arrays") -> dict[str, np.ndarray]:
    """The arrays of `pack_many`, every one read (so a damaged member fails its CRC here, not at
    first use); CatalogDamaged (naming `what`) when the bytes cannot be read."""
    try:
        with NPY_LOCK, np.load(io.BytesIO(blob), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - a damaged zip / npy fails in many ways (BadZipFile, ValueError …)
        raise damaged_value(what, e) from None


def damaged_value(what: str, e: BaseException) -> CatalogDamaged:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return CatalogDamaged(f"{what} cannot be read from the catalog ({type(e).__name__}: {detail})")


def to_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
