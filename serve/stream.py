"""One query run on a Python-owned worker thread, its result streamed in record batches.

The worker owns the leased DuckDB connection for the query's lifetime: it runs the statement,
drains DuckDB's lazy Arrow reader and puts batches (cut to at most `chunk_bytes`) into a small
bounded queue. The RPC thread that serves the result only takes batches off that queue. (Draining
DuckDB's reader from Flight's own C++ thread crashed the process over Lance-backed views, so it is
never handed to Flight.) A slow client therefore holds back the query instead of the server
buffering its result: memory stays at a few batches whatever the result's size.

Cancellation — by the client, by the time limit, or when the result is never fetched — interrupts
the connection (DuckDB stops at its next check) and ends the stream with one line.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator

import pyarrow as pa

from clipsql.errors import QueryCancelled, QueryError
from clipsql.lazy import duckdb
from clipsql.serve.sessions import ReadOnlyRefused, error_message


_END = object()
POLL_S = 0.05


class RunningQuery:
    def __init__(self, lease: Any, sql: str, params: list | None = None, *, timeout_s: float | None = None,
                 batch_rows: int = 65536, chunk_bytes: int = 2 << 20, queue_batches: int = 4,
                 owner: Any = None, describe: bool = False):
        self.lease = lease
        self.sql = sql
        self.params = params
        self.timeout_s = timeout_s
        self.batch_rows = batch_rows
        self.chunk_bytes = chunk_bytes
        self.owner = owner
        self.describe = describe        # only the result's schema: the query under LIMIT 0
        self.claimed = False            # its result stream was handed out (DoGet)
        self.schema: Any = None
        self.error: BaseException | None = None
        self.created = time.monotonic()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_batches)
        self._ready = threading.Event()
        self._done = threading.Event()
        self._stop = threading.Event()
        self._stop_reason: str | None = None
        self._lock = threading.Lock()
        self._in_duckdb = False
        self._thread = threading.Thread(target=self._run, name="clipsql-serve-query", daemon=True)
        self._timer: threading.Timer | None = None

    # -- control ---------------------------------------------------------------------------
    def start(self, is_cancelled: Callable[[], bool] = lambda: False) -> Any:
        """Start the query; wait until its result schema is known (or it failed). Returns the schema."""
        self._thread.start()
        if self.timeout_s:
            self._timer = threading.Timer(self.timeout_s, self.cancel,
                                          args=(f"query stopped: it ran past the server's time limit of "
                                                f"{self.timeout_s:g} s",))
            self._timer.daemon = True
            self._timer.start()
        while not self._ready.wait(POLL_S):
            if is_cancelled():
                self.cancel("query cancelled by the client")
        if self.error is not None:
            raise self.error
        return self.schema

    def cancel(self, reason: str = "query cancelled") -> None:
        """Stop the query (idempotent, any thread): interrupts DuckDB only while this query runs in it."""
        with self._lock:
            if self._stop.is_set() or self._done.is_set():
                return
            self._stop_reason = reason
            self._stop.set()
            if self._in_duckdb:
                self.lease.con.interrupt()
        # DuckDB clears an interrupt that lands before its query really starts: repeat it until the
        # worker is out of DuckDB
        threading.Thread(target=self._keep_interrupting, name="clipsql-serve-cancel", daemon=True).start()

    def _keep_interrupting(self) -> None:
        while not self._done.wait(POLL_S):
            with self._lock:
                if self._in_duckdb:
                    self.lease.con.interrupt()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    # -- result ----------------------------------------------------------------------------
    def batches(self, is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[Any]:
        """The result's record batches; stops the query if the consumer goes away or cancels."""
        try:
            while True:
                try:
                    item = self._queue.get(timeout=POLL_S)
                except queue.Empty:
                    if is_cancelled():
                        self.cancel("query cancelled by the client")
                    continue
                if self._stop.is_set():          # cancelled: what is still queued is not sent
                    while not self._done.wait(POLL_S):
                        pass
                    raise self.error or QueryCancelled(self._stop_reason or "query cancelled")
                if item is _END:
                    if self.error is not None:
                        raise self.error
                    return
                yield item
        finally:
            if not self._done.is_set():
                self.cancel("query cancelled: the client stopped reading")

    # -- worker ----------------------------------------------------------------------------
    def _enter(self) -> bool:
        with self._lock:
            if self._stop.is_set():
                return False
            self._in_duckdb = True
            return True

    def _leave(self) -> None:
        with self._lock:
            self._in_duckdb = False

    def _run(self) -> None:
        con = self.lease.con
        reader = rel = None
        reusable = False        # the connection may serve another request (not after the unexpected)
        try:
            if not self._enter():
                raise QueryCancelled(self._stop_reason or "query cancelled")
            try:
                rel = con.sql(self.sql, params=self.params) if self.params else con.sql(self.sql)
                if rel is not None and self.describe:
                    rel = rel.limit(0)
                if rel is None:
                    self.schema = pa.schema([])
                else:
                    reader = rel.to_arrow_reader(self.batch_rows)
                    self.schema = reader.schema
            finally:
                self._leave()
            self._ready.set()
            while reader is not None:
                if not self._enter():
                    break
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                finally:
                    self._leave()
                for chunk in _chunks(batch, self.chunk_bytes):
                    if not self._put(chunk):
                        break
                if self._stop.is_set():
                    break
            if self._stop.is_set():
                raise QueryCancelled(self._stop_reason or "query cancelled")
            reusable = True
        except QueryCancelled as e:
            self.error = e
            reusable = True
        except Exception as e:  # noqa: BLE001 - one line to the client, never a traceback
            if self._stop.is_set() or isinstance(e, duckdb.InterruptException):
                self.error = QueryCancelled(self._stop_reason or "query cancelled")
                reusable = True
            elif isinstance(e, (duckdb.Error, OSError, pa.ArrowException)):
                reusable = isinstance(e, duckdb.Error)       # a SQL error leaves the connection as it was
                # DuckDB's message; the Arrow reader hands a failure mid-result over as OSError
                msg = error_message(e, con)
                self.error = ReadOnlyRefused(msg) if "no file access" in msg else QueryError(msg)
            else:
                self.error = QueryError(_one_line(e))
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if reader is not None:
                try:
                    reader.close()
                except Exception:  # noqa: BLE001
                    pass
            reader = rel = None
            with self._lock:
                self._done.set()
            self.lease.release(reusable=reusable)
            self._ready.set()
            self._put_end()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _put_end(self) -> None:
        """The end marker after the last batch; once stopped, what is still queued is dropped
        (nobody will read it) so the marker always fits."""
        while True:
            try:
                self._queue.put(_END, timeout=POLL_S)
                return
            except queue.Full:
                if self._stop.is_set():
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        pass


def _chunks(batch: Any, max_bytes: int) -> Iterator[Any]:
    """Zero-copy slices of at most ~max_bytes each (gRPC clients cap one message's size)."""
    n = batch.num_rows
    size = batch.nbytes
    if n <= 1 or size <= max_bytes:
        yield batch
        return
    step = max(1, int(n * max_bytes / size))
    for start in range(0, n, step):
        yield batch.slice(start, step)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
