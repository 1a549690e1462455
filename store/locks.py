"""Writer locks: a flock()ed file for stores on a local disk (or beside a local SQLite catalog),
a lease row in a server catalog for stores on object storage.

A lease is taken in one catalog transaction (refused while another holder's lease is live),
renewed by a heartbeat thread every TTL/3 and deleted on release; a killed holder's lease lapses
after TTL seconds (default 30, CLIPSQL_LEASE_SECONDS), so the next writer takes over.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import threading
import time
import uuid
from typing import Iterator

import sqlalchemy as sa

from clipsql.store import catalog as cat
from clipsql.errors import READ_ONLY_HINT, StoreLocked, StoreReadOnly, env_number

WAIT_HINT = "one writer per store — wait for it to finish (readers such as `clipsql query` can run meanwhile)"
def read_only_error(what: str, e: OSError) -> StoreReadOnly | None:
    """One line for a write refused because the store cannot be written here (a read-only file system,
    another user's files), or None for any other OSError."""
    if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
        return None
    why = "it is on a read-only file system" if e.errno == errno.EROFS else "this user may not write it"
    return StoreReadOnly(f"{what} cannot be written: {why} ({e.filename or e.strerror}); {READ_ONLY_HINT}")


@contextlib.contextmanager
def file_lock(path: str, what: str) -> Iterator[None]:
    try:
        fh = open(path, "a+")
    except OSError as e:
        err = read_only_error(what, e)
        if err is None:
            raise
        raise err from None
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise StoreLocked(f"{what} is being written by {holder}; {WAIT_HINT}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fh.close()  # closing releases the flock


def lease_seconds() -> float:
    """Seconds a writer's lease lasts without renewal (CLIPSQL_LEASE_SECONDS, default 30, at least 1)."""
    return max(1.0, env_number("CLIPSQL_LEASE_SECONDS", 30.0, above=True))


@contextlib.contextmanager
def lease(engine: sa.Engine, name: str, what: str) -> Iterator[None]:
    ttl = lease_seconds()
    holder = f"pid {os.getpid()} on {socket.gethostname()} ({uuid.uuid4().hex[:8]})"
    t = cat.leases
    now = time.time()
    try:
        with engine.begin() as conn:
            row = conn.execute(sa.select(t.c.holder, t.c.expires_at).where(t.c.name == name)
                               .with_for_update()).first()
            if row is not None and row.expires_at > now:
                raise StoreLocked(f"{what} is being written by {row.holder} (lease until "
                                  f"{time.strftime('%H:%M:%S', time.localtime(row.expires_at))}); {WAIT_HINT}")
            conn.execute(sa.delete(t).where(t.c.name == name))
            conn.execute(t.insert().values(name=name, holder=holder, expires_at=now + ttl))
    except sa.exc.IntegrityError:        # another writer inserted its lease between our read and insert
        raise StoreLocked(f"{what} is being written by another process; {WAIT_HINT}") from None
    stop = threading.Event()
    lost = threading.Event()

    def beat() -> None:
        while not stop.wait(ttl / 3):
            try:
                with engine.begin() as conn:
                    n = conn.execute(sa.update(t).where(t.c.name == name, t.c.holder == holder)
                                     .values(expires_at=time.time() + ttl)).rowcount
                if n == 0:
                    lost.set()
            except sa.exc.SQLAlchemyError:
                pass          # a catalog hiccup: the next beat retries; the lease lasts TTL
    thread = threading.Thread(target=beat, name=f"clipsql-lease-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with engine.begin() as conn:
            conn.execute(sa.delete(t).where(t.c.name == name, t.c.holder == holder))


def lease_holder(engine: sa.Engine, name: str) -> str | None:
    """The live holder of a lease, or None."""
    t = cat.leases
    with engine.connect() as conn:
        row = conn.execute(sa.select(t.c.holder, t.c.expires_at).where(t.c.name == name)).first()
    return row.holder if row is not None and row.expires_at > time.time() else None
