"""Prepared read-only DuckDB connections for the server, one per request, on the last commit.

Every request (a query, a catalog call, a page of the app) leases a connection made by
`clipsql.queries.sql.db.connect` — the store's views, score functions and the same lock-down as
`clipsql query` (no file access, configuration locked) plus a per-connection memory limit. A
registration (`con.register`) is connection-scoped, so a connection is only ever used by one
request at a time and never shared across threads concurrently.

Opening a connection costs ~0.1–0.2 s (catalog reads, Lance manifests, statistics), so released
connections are kept and reused while the store has not changed: `snapshot_key` reads, in one
catalog round trip, everything `connect` builds a connection from (committed table versions,
models, statistics, fits, targets, rejects, metadata columns) plus the Lance tables read at their
latest version. A request whose key differs from a kept connection's gets a new one, so it sees
the commit that landed before it started, never half of one.

Clients can change nothing a later request would see: statements other than queries are refused
(`check_read_only`) and settings are locked. A connection is kept after a query that finished,
failed with a SQL error or was cancelled, and closed after anything unexpected.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import sqlalchemy as sa

from clipsql.errors import QueryError, ServeError
from clipsql.lazy import duckdb, threadpoolctl
from clipsql.queries.sql.cli_query import clean_error
from clipsql.queries.sql.db import connect, open_store
from clipsql.store import catalog as cat
from clipsql.store.store import Store

READ_ONLY = "clipsql serve is read-only"
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")
READ_ONLY_HINT = "SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN"


class ReadOnlyRefused(QueryError):
    """A statement that is not a query, or a query reaching for files or settings."""


def error_message(e: BaseException, con: Any = None) -> str:
    """DuckDB's message as `clipsql query` cleans it, with the server's own word on file access
    (a remote client cannot lift it)."""
    msg = clean_error(e, con)
    head, sep, _ = msg.partition("\n(clipsql query is read-only towards files")
    if sep:
        msg = head + f" ({READ_ONLY}: no file access)"
    if "Out of Memory Error" in msg:       # DuckDB's remedies (SET …) are not the client's to apply
        msg = msg.split("Possible solutions")[0].rstrip() + \
            " (the server's memory limit per query: ask for less, e.g. fewer columns, a LIMIT or an aggregate)"
    return msg


def check_read_only(con: Any, sql: str) -> None:
    """Refuse anything but one query (parsed by DuckDB, not by pattern): COPY, ATTACH, SET,
    CREATE, INSERT, PRAGMA, transactions… are refused with one line."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(error_message(e)) from None
    if not statements:
        raise QueryError("empty statement: send one query")
    if len(statements) > 1:
        raise QueryError(f"{len(statements)} statements in one request: send one query at a time")
    kind = statements[0].type.name
    if kind not in READ_ONLY_STATEMENTS:
        first = (statements[0].query.split() or [""])[0].upper()
        word = first if first.isalpha() and first != "WITH" else kind.replace("_", " ")   # INSTALL, not LOAD
        raise ReadOnlyRefused(f"{READ_ONLY}: {word} statements are refused (only queries run: {READ_ONLY_HINT})")


def parameter_count(con: Any, sql: str) -> int:
    try:
        return len(con.extract_statements(sql)[0].named_parameters)
    except (duckdb.Error, IndexError):
        return 0


def snapshot_key(st: Store) -> tuple:
    """What `connect(st)` reads, condensed: equal keys → a connection made for one serves the other."""
    with st.engine.connect() as conn:
        versions = tuple(sorted(conn.execute(sa.select(cat.table_versions.c.table_name,
                                                       cat.table_versions.c.version)).all()))
        aggregates = conn.execute(sa.select(
            sa.select(sa.func.max(cat.commits.c.commit_id)).scalar_subquery(),
            sa.select(sa.func.count()).select_from(cat.models).scalar_subquery(),
            sa.select(sa.func.count()).select_from(cat.metadata_columns).scalar_subquery(),
            sa.select(sa.func.max(cat.running_stats.c.updated_at)).scalar_subquery(),
            sa.select(sa.func.sum(cat.running_stats.c.n)).scalar_subquery(),
            sa.select(sa.func.max(cat.fits.c.fit_id)).scalar_subquery(),
            sa.select(sa.func.count()).select_from(cat.fits).scalar_subquery(),
            sa.select(sa.func.count()).select_from(cat.stale_fits).scalar_subquery(),
            sa.select(sa.func.count()).select_from(cat.targets).scalar_subquery(),
            sa.select(sa.func.max(cat.targets.c.created_at)).scalar_subquery(),
            sa.select(sa.func.count()).select_from(cat.rejects).scalar_subquery(),
            sa.select(sa.func.max(cat.rejects.c.reject_id)).scalar_subquery(),
        )).one()
    committed = {name for name, _ in versions}
    latest = tuple((name, _latest_version(st, name)) for name in st.table_names() if name not in committed)
    return versions, tuple(aggregates), latest


def _latest_version(st: Store, name: str) -> Any:
    """The newest manifest of a Lance table read at its latest version (stored scores, dedup)."""
    folder = st.path / "lance" / f"{name}.lance" / "_versions"
    try:
        entries = sorted(p.name for p in folder.iterdir())
    except OSError:
        return None
    return (len(entries), entries[0] if entries else None, entries[-1] if entries else None)


@dataclass
class Lease:
    """One connection, held by one request until `release`."""
    con: Any
    key: tuple | None
    pool: "ConnectionPool"
    released: bool = False
    parked: bool = False        # held between queries (a transaction's): not counted as running

    def release(self, reusable: bool = True) -> None:
        if not self.released:
            self.released = True
            self.pool._give_back(self, reusable)


class ConnectionPool:
    """Connections on the store's latest snapshot; at most `max_connections` leased at once."""

    def __init__(self, store: Store | str | os.PathLike, *, memory_limit: str | None = None,
                 threads: int | None = None, max_connections: int = 32, max_idle: int = 8,
                 wait_s: float = 30.0, connect_fn: Callable[..., Any] | None = None):
        self.store = open_store(store)
        self.memory_limit = memory_limit
        self.threads = threads
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.wait_s = wait_s
        self._connect = connect_fn or connect
        self._idle: list[Lease] = []
        self._leased = 0
        self._cond = threading.Condition()
        self._closed = False

    def _open(self) -> Any:
        config = {"memory_limit": self.memory_limit} if self.memory_limit else {}
        return self._connect(self.store, threads=self.threads, config=config, progress_bar=False)

    def _take_slot(self) -> None:
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self._leased >= self.max_connections and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServeError(f"the server is busy ({self.max_connections} requests running): retry shortly")
                self._cond.wait(left)
            if self._closed:
                raise ServeError("the server is shutting down")
            self._leased += 1

    def park(self, lease: Lease) -> None:
        """`lease` stays open but runs nothing (a transaction between its queries): it frees its slot
        of `max_connections`, which bounds requests running at once."""
        with self._cond:
            if not lease.parked and not lease.released:
                lease.parked = True
                self._leased -= 1
                self._cond.notify()

    def unpark(self, lease: Lease) -> None:
        """A parked lease about to run a query: takes a slot (waiting, or busy, like `acquire`)."""
        if lease.parked:
            self._take_slot()
            lease.parked = False

    def acquire(self) -> Lease:
        """A connection on the last commit as of now (reused when nothing changed since it was made)."""
        self._take_slot()
        try:
            key = snapshot_key(self.store)
            stale: list[Lease] = []
            found = None
            with self._cond:
                keep = []
                for lease in self._idle:
                    if found is None and lease.key == key:
                        found = lease
                    elif lease.key == key:
                        keep.append(lease)
                    else:
                        stale.append(lease)
                self._idle = keep
            for lease in stale:
                _close(lease.con)
            if found is not None:
                found.released = False
                return found
            con = self._open()
            # a commit landing while the connection was made: serve this request, keep it for no other
            same = snapshot_key(self.store) == key
            return Lease(con, key if same else None, self)
        except BaseException:
            with self._cond:
                self._leased -= 1
                self._cond.notify()
            raise

    def _give_back(self, lease: Lease, reusable: bool) -> None:
        close = None
        with self._cond:
            if not lease.parked:
                self._leased -= 1
            lease.parked = False
            if reusable and lease.key is not None and not self._closed:
                self._idle.append(lease)
                if len(self._idle) > self.max_idle:
                    close = self._idle.pop(0)
            else:
                close = lease
            self._cond.notify()
        if close is not None:
            _close(close.con)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for lease in idle:
            _close(lease.con)


def _close(con: Any) -> None:
    try:
        con.close()
    except Exception:  # noqa: BLE001 - closing a connection that already failed
        pass


def pin_blas() -> None:
    """One BLAS thread for the whole server process: DuckDB runs score batches on several threads
    and concurrent requests add more; a multi-threaded BLAS under each oversubscribes the cores.
    (The pin is process-global, so the server sets it once instead of around each query.)"""
    try:
        threadpool_limits = threadpoolctl.threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=1, user_api="blas")
