"""`clipsql serve`: the SQL endpoint (Flight SQL) and the app (HTTP) in one process.

    run_server("my-store", host="0.0.0.0", auth_file="tokens", tls_cert="c.pem", tls_key="k.pem")

blocks until Ctrl-C / SIGTERM, then cancels running queries, closes every connection and returns.
`Server` is the same without the signal handling (tests, notebooks): `start()`, `stop()`.
The process only reads the store: it never takes the writer lock, so ingests keep running
beside it and each new commit is visible to the next request.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from clipsql.errors import ServeError
from clipsql.queries.sql.db import open_store

from clipsql.serve import http
from clipsql.serve.auth import Auth, is_loopback
from clipsql.serve.flight import FlightSqlServer
from clipsql.serve.sessions import ConnectionPool, pin_blas

DEFAULT_SQL_PORT = 8815
DEFAULT_HTTP_PORT = 8765


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _read_tls(cert: str | os.PathLike | None, key: str | os.PathLike | None) -> tuple[bytes, bytes] | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ServeError("TLS needs both --tls-cert and --tls-key (PEM files)")
    out = []
    for what, p in (("certificate", cert), ("key", key)):
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise ServeError(f"cannot read the TLS {what} {p}: {e.strerror or e}") from None
        if b"-----BEGIN" not in data:
            raise ServeError(f"the TLS {what} {p} is not a PEM file")
        out.append(data)
    return out[0], out[1]


class Server:
    """Both endpoints over one store; `stop()` ends them and releases every connection."""

    def __init__(self, store: Any, *, host: str = "127.0.0.1", port: int | None = DEFAULT_HTTP_PORT,
                 sql_port: int = DEFAULT_SQL_PORT, auth: Auth | None = None,
                 auth_file: str | os.PathLike | None = None, allow_anonymous: bool = False,
                 tls_cert: str | os.PathLike | None = None, tls_key: str | os.PathLike | None = None,
                 memory_limit: str | None = "4GB", query_timeout_s: float | None = 600.0,
                 max_queries: int = 32, threads: int | None = None, remote_images: bool = False,
                 echo: Callable[[str], None] = print):
        self.store = open_store(store)
        self.remote_images = remote_images
        self.host = host
        self.echo = echo
        self.auth = auth if auth is not None else Auth.load(auth_file, host=host, allow_anonymous=allow_anonymous,
                                                            warn=lambda m: echo(f"warning: {m}"))
        if auth is not None and auth.allow_anonymous and not is_loopback(host):
            raise ServeError(f"anonymous access is allowed only on a loopback address, not on {host}")
        self.tls = _read_tls(tls_cert, tls_key)
        self.tls_files = (str(tls_cert), str(tls_key)) if self.tls else None
        self.pool = ConnectionPool(self.store, memory_limit=memory_limit, threads=threads,
                                   max_connections=max_queries)
        self.port, self.sql_port = port, sql_port
        self.query_timeout_s = query_timeout_s
        self.flight: FlightSqlServer | None = None
        self.http: Any = None

    @property
    def sql_url(self) -> str:
        scheme = "grpc+tls" if self.tls else "grpc"
        return f"{scheme}://{_url_host(self.host)}:{self.flight.port if self.flight else self.sql_port}"

    @property
    def http_url(self) -> str | None:
        if self.http is None:
            return None
        return f"{'https' if self.tls else 'http'}://{_url_host(self.host)}:{self.http.port}"

    def start(self) -> "Server":
        pin_blas()
        try:      # fail now, with one line, on what would fail every request (memory limit, store)
            self.pool.acquire().release()
        except ServeError:
            raise
        except Exception as e:  # noqa: BLE001 - one line
            raise ServeError(f"cannot open the store for queries: {' '.join(str(e).split())}") from None
        scheme = "grpc+tls" if self.tls else "grpc"
        location = f"{scheme}://{_url_host(self.host)}:{self.sql_port}"
        try:
            import pyarrow.flight as flight
            certs = [flight.CertKeyPair(cert=self.tls[0], key=self.tls[1])] if self.tls else None
            self.flight = FlightSqlServer(location, self.pool, self.auth, tls_certificates=certs,
                                          query_timeout_s=self.query_timeout_s)
        except Exception as e:  # noqa: BLE001 - a port in use, a bad certificate: one line
            self.pool.close()
            raise ServeError(f"cannot serve SQL on {location}: {' '.join(str(e).split())[:300]}") from None
        if self.port is not None:
            try:
                self.http = http.start(self.store, host=self.host, port=self.port, auth=self.auth, tls=self.tls_files,
                                       remote_images=self.remote_images)
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> bool:
        """False when some client call was still open after the grace period (see FlightSqlServer.stop)."""
        clean = True
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self.flight is not None:
            clean = self.flight.stop()
            if clean:
                self.flight = None
        self.pool.close()
        return clean

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()




def run_server(store: Any, *, host: str = "127.0.0.1", port: int | None = DEFAULT_HTTP_PORT,
               sql_port: int = DEFAULT_SQL_PORT, auth_file: str | os.PathLike | None = None,
               allow_anonymous: bool = False, tls_cert: str | os.PathLike | None = None,
               tls_key: str | os.PathLike | None = None, memory_limit: str | None = "4GB",
               query_timeout_s: float | None = 600.0, max_queries: int = 32, threads: int | None = None,
               remote_images: bool = False, echo: Callable[[str], None] = print,
               stop: threading.Event | None = None) -> None:
    """Serve until Ctrl-C / SIGTERM (or `stop` is set), then stop cleanly with one line."""
    srv = Server(store, host=host, port=port, sql_port=sql_port, auth_file=auth_file,
                 allow_anonymous=allow_anonymous, tls_cert=tls_cert, tls_key=tls_key, memory_limit=memory_limit,
                 query_timeout_s=query_timeout_s, max_queries=max_queries, threads=threads,
                 remote_images=remote_images, echo=echo)
    stop = stop or threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    clean = True
    try:
        srv.start()
        _announce(srv, echo)
        while not stop.wait(0.5):
            pass
        echo("clipsql serve: stopping (running queries are cancelled)")
    finally:
        clean = srv.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if clean:
        echo("clipsql serve: stopped")
        return
    # a client stopped reading a result: its call cannot be ended from Python and would hold the
    # process at exit; nothing of the store is open for writing, so leave at once
    echo("clipsql serve: stopped (a client's unread result stream was cut)")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _announce(srv: Server, echo: Callable[[str], None]) -> None:
    who = "anyone on this machine (anonymous)" if srv.auth.allow_anonymous and not srv.auth.users else \
        f"{len(srv.auth.users)} credential(s)" + (" or anonymous" if srv.auth.allow_anonymous else "")
    echo(f"clipsql serve: {srv.store.path} read-only, for {who}")
    echo(f"  SQL (Arrow Flight SQL): {srv.sql_url}   e.g. adbc_driver_flightsql.dbapi.connect(\"{srv.sql_url}\", "
         "db_kwargs={\"username\": …, \"password\": …})")
    if srv.http_url:
        echo(f"  app: {srv.http_url}")
    if not srv.tls and not is_loopback(srv.host):
        echo("warning: no TLS: passwords and results cross the network in clear text (pass --tls-cert/--tls-key)")
    echo("Ctrl-C stops the server")
