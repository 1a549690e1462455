"""The SQL endpoint: an Arrow Flight SQL server on pyarrow.flight over the store's views.

Clients: ADBC (`adbc_driver_flightsql`, Python/R/Go/C), the Flight SQL JDBC driver (DBeaver and
other JDBC tools), anything speaking Flight SQL. What it implements:

* authentication on every call (`AuthMiddlewareFactory`): HTTP Basic (user name + password,
  answered with a session token) or a bearer token; anonymous only when the server allows it;
* queries: CommandStatementQuery and prepared statements (Create/ClosePreparedStatement,
  CommandPreparedStatementQuery, parameters bound through DoPut) — GetFlightInfo starts the query
  on a Python-owned worker and returns one endpoint; DoGet streams its record batches;
* transactions (Begin/EndTransaction): the queries of one transaction run on one connection,
  so they all see the snapshot it was opened on; outside a transaction every query gets the
  last commit as of its start;
* cancellation: a client cancelling its call (or CancelFlightInfo / CancelQuery) interrupts the
  query's DuckDB connection; a time limit per query; a memory limit per connection;
* metadata: GetSqlInfo, GetCatalogs, GetDbSchemas, GetTables (+ schemas), GetTableTypes and
  empty key lists;
* read-only: only queries run (see sessions.check_read_only), on connections locked down as for
  `clipsql query`; updates (DoPut statements, Substrait) are refused.

Every error reaches the client as one line (no server traceback).
"""
from __future__ import annotations

import functools
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.flight as flight

from clipsql.errors import AuthError, ClipsqlError, QueryCancelled, QueryError, ServeError

from clipsql.serve import flightsql_catalog as meta
from clipsql.serve import flightsql_proto as proto
from clipsql.serve.auth import Auth, Identity
from clipsql.serve.sessions import READ_ONLY, ConnectionPool, Lease, ReadOnlyRefused, check_read_only, parameter_count
from clipsql.serve.stream import RunningQuery

SCHEMA_CACHE = 512       # result schemas of prepared queries kept (DB-API clients prepare every execute)


# -- authentication -------------------------------------------------------------------------------

class _Authenticated(flight.ServerMiddleware):
    def __init__(self, who: Identity, token: str | None):
        self.who = who
        self.token = token

    def sending_headers(self) -> dict:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}


class AuthMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Checks the `authorization` header of every call (Handshake included)."""

    def __init__(self, auth: Auth):
        super().__init__()
        self.auth = auth

    def start_call(self, info: Any, headers: dict) -> _Authenticated:
        values = headers.get("authorization") or headers.get("Authorization") or []
        header = values[0] if values else None
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        try:
            who, token = self.auth.authenticate(header)
        except AuthError as e:
            raise flight.FlightUnauthenticatedError(str(e)) from None
        return _Authenticated(who, token)


class _NoHandshakeAuth(flight.ServerAuthHandler):
    """Lets Handshake through: credentials are checked by the middleware on every call."""

    def authenticate(self, outgoing: Any, incoming: Any) -> None:
        pass

    def is_valid(self, token: bytes) -> str:
        return ""


# -- state ----------------------------------------------------------------------------------------

@dataclass
class Prepared:
    sql: str
    owner: str
    transaction_id: bytes | None
    peer: str = ""
    params: list | None = None
    used: float = field(default_factory=time.monotonic)


@dataclass
class Transaction:
    lease: Lease
    owner: str
    peer: str = ""            # the client's connection: CloseSession from it ends the transaction
    used: float = field(default_factory=time.monotonic)
    busy: RunningQuery | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _to_flight_error(e: BaseException) -> BaseException:
    """The client's one line, with the gRPC status that says what kind of failure it was."""
    if isinstance(e, flight.FlightError):
        return e
    msg = " ".join(str(e).split()) or type(e).__name__   # one line: DuckDB's messages span several
    if isinstance(e, AuthError):
        return flight.FlightUnauthenticatedError(msg)
    if isinstance(e, ReadOnlyRefused):
        return flight.FlightUnauthorizedError(msg)
    if isinstance(e, QueryCancelled):
        if "time limit" in msg:
            return flight.FlightTimedOutError(msg)
        return flight.FlightCancelledError(msg)
    if isinstance(e, ServeError):
        return flight.FlightUnavailableError(msg)
    if isinstance(e, ClipsqlError):
        return flight.FlightServerError(msg)
    return flight.FlightServerError(f"internal error: {type(e).__name__}: {_one_line(e)}")


def _one_line_errors(batches: Iterator[Any]) -> Iterator[Any]:
    """A result stream whose failure mid-way reaches the client as one line, like an RPC's."""
    try:
        yield from batches
    except GeneratorExit:
        raise
    except BaseException as e:  # noqa: BLE001
        raise _to_flight_error(e) from None


def _rpc(fn: Callable) -> Callable:
    """Every RPC handler: clipsql errors (and anything else) become one line to the client."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - one line to the client, never a traceback
            raise _to_flight_error(e) from None
    return wrapper


# -- the server -----------------------------------------------------------------------------------

class FlightSqlServer(flight.FlightServerBase):
    def __init__(self, location: str, pool: ConnectionPool, auth: Auth, *, tls_certificates: list | None = None,
                 query_timeout_s: float | None = 600.0, claim_timeout_s: float = 60.0,
                 transaction_timeout_s: float = 600.0, max_prepared: int = 10_000,
                 max_transactions_per_user: int = 16, max_transactions: int = 256, **kwargs: Any):
        super().__init__(location, auth_handler=_NoHandshakeAuth(), tls_certificates=tls_certificates or [],
                         middleware={"auth": AuthMiddlewareFactory(auth)}, **kwargs)
        self.pool = pool
        self.auth = auth
        self.query_timeout_s = query_timeout_s or None
        self.claim_timeout_s = claim_timeout_s
        self.transaction_timeout_s = transaction_timeout_s
        self.max_prepared = max_prepared
        self.busy_wait_s = 5.0
        self.max_transactions_per_user = max_transactions_per_user
        self.max_transactions = max_transactions
        self._lock = threading.Lock()
        self._queries: dict[bytes, RunningQuery] = {}
        self._prepared: dict[bytes, Prepared] = {}
        self._transactions: dict[bytes, Transaction] = {}
        self._schemas: dict[tuple, pa.Schema] = {}      # (snapshot key, sql) → result schema
        self._stopping = threading.Event()
        self.on_query: Callable[[RunningQuery], None] | None = None   # called as each query starts
        self._reaper = threading.Thread(target=self._reap, name="clipsql-serve-reaper", daemon=True)
        self._reaper.start()

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _who(context: Any) -> Identity:
        mw = context.get_middleware("auth")
        if mw is None:                                   # never: the middleware runs on every call
            raise AuthError("not authenticated")
        return mw.who

    def _transaction(self, who: Identity, tid: bytes | None) -> Transaction | None:
        if not tid:
            return None
        with self._lock:
            txn = self._transactions.get(tid)
        if txn is None or txn.owner != who.user:
            raise QueryError("unknown or expired transaction: begin a new one")
        txn.used = time.monotonic()
        return txn

    def _lease_for(self, txn: Transaction | None) -> tuple[Lease, Callable[[bool], None]]:
        """A connection for one query and how to give it back: the transaction's own (one query of
        a transaction at a time) or a fresh one on the last commit."""
        if txn is None:
            lease = self.pool.acquire()
            return lease, lambda reusable: lease.release(reusable)
        # a result the client just closed takes a moment to stop on the server
        if not txn.lock.acquire(timeout=self.busy_wait_s):
            raise QueryError("another query of this transaction is still running: read its result "
                             "or close it first")
        try:
            self.pool.unpark(txn.lease)
        except BaseException:
            txn.lock.release()
            raise

        def done(reusable: bool) -> None:
            txn.used = time.monotonic()
            self.pool.park(txn.lease)
            txn.lock.release()
        return txn.lease, done

    def _start(self, context: Any, who: Identity, sql: str, params: list | None, txn: Transaction | None,
               descriptor: Any) -> flight.FlightInfo:
        lease, give_back = self._lease_for(txn)
        try:
            check_read_only(lease.con, sql)
        except BaseException:
            give_back(True)
            raise
        q = RunningQuery(_Releasing(lease, give_back), sql, params, timeout_s=self.query_timeout_s,
                         owner=who.user)
        if txn is not None:
            txn.busy = q
        handle = secrets.token_bytes(16)
        with self._lock:
            self._queries[handle] = q
        if self.on_query is not None:
            self.on_query(q)
        try:
            schema = q.start(context.is_cancelled)
        except BaseException:
            with self._lock:
                self._queries.pop(handle, None)
            raise
        ticket = flight.Ticket(proto.TicketStatementQuery.pack(statement_handle=handle))
        return flight.FlightInfo(schema, descriptor, [flight.FlightEndpoint(ticket, [])], -1, -1)

    def _describe(self, context: Any, who: Identity, sql: str, txn: Transaction | None) -> pa.Schema:
        """A query's result schema without its rows (the query under LIMIT 0, with the same time
        limit and cancellation as a query)."""
        lease, give_back = self._lease_for(txn)
        try:
            check_read_only(lease.con, sql)
            n_params = parameter_count(lease.con, sql)
        except BaseException:
            give_back(True)
            raise
        if n_params:
            give_back(True)
            return pa.schema([])                        # known once parameters are bound
        cache_key = (lease.key, sql) if lease.key is not None else None
        with self._lock:
            schema = self._schemas.get(cache_key) if cache_key else None
        if schema is not None:                          # the same query on the same snapshot
            give_back(True)
            return schema
        q = RunningQuery(_Releasing(lease, give_back), sql, timeout_s=self.query_timeout_s, owner=who.user,
                         describe=True)
        schema = q.start(context.is_cancelled)
        for _ in q.batches(context.is_cancelled):
            pass
        if cache_key:
            with self._lock:
                self._schemas[cache_key] = schema
                while len(self._schemas) > SCHEMA_CACHE:
                    self._schemas.pop(next(iter(self._schemas)))
        return schema

    def _with_connection(self, fn: Callable[[Any], Any]) -> Any:
        lease = self.pool.acquire()
        ok = False
        try:
            out = fn(lease.con)
            ok = True
            return out
        finally:
            lease.release(ok)

    # -- RPCs ------------------------------------------------------------------------------
    @_rpc
    def get_flight_info(self, context: Any, descriptor: Any) -> flight.FlightInfo:
        who = self._who(context)
        name, cmd = self._command(descriptor)
        if name == "CommandStatementQuery":
            txn = self._transaction(who, cmd["transaction_id"])
            return self._start(context, who, cmd["query"] or "", None, txn, descriptor)
        if name == "CommandPreparedStatementQuery":
            prep = self._prepared_for(who, cmd["prepared_statement_handle"])
            txn = self._transaction(who, prep.transaction_id)
            return self._start(context, who, prep.sql, prep.params, txn, descriptor)
        if name in meta.SCHEMAS:
            schema = meta.schema_for(name, cmd)
            ticket = flight.Ticket(descriptor.command)
            return flight.FlightInfo(schema, descriptor, [flight.FlightEndpoint(ticket, [])], -1, -1)
        raise self._unsupported(name)

    @_rpc
    def get_schema(self, context: Any, descriptor: Any) -> flight.SchemaResult:
        who = self._who(context)
        name, cmd = self._command(descriptor)
        if name == "CommandStatementQuery":
            return flight.SchemaResult(self._describe(context, who, cmd["query"] or "",
                                                      self._transaction(who, cmd["transaction_id"])))
        if name == "CommandPreparedStatementQuery":
            prep = self._prepared_for(who, cmd["prepared_statement_handle"])
            return flight.SchemaResult(self._describe(context, who, prep.sql,
                                                      self._transaction(who, prep.transaction_id)))
        if name in meta.SCHEMAS:
            return flight.SchemaResult(meta.schema_for(name, cmd))
        raise self._unsupported(name)

    @_rpc
    def do_get(self, context: Any, ticket: Any) -> Any:
        who = self._who(context)
        name, cmd = proto.parse_command(ticket.ticket)
        if name == "TicketStatementQuery":
            handle = cmd["statement_handle"] or b""
            with self._lock:
                q = self._queries.get(handle)
                if q is None or q.owner != who.user or q.claimed:
                    q = None
                else:
                    q.claimed = True
            if q is None:
                raise QueryError("unknown or expired result ticket: run the query again")
            return flight.GeneratorStream(q.schema, _one_line_errors(q.batches(context.is_cancelled)))
        if name == "CommandGetSqlInfo":
            table = meta.sql_info_table(cmd["info"], meta.server_info(self.transaction_timeout_s))
        elif name == "CommandGetCatalogs":
            table = meta.catalogs_table()
        elif name == "CommandGetDbSchemas":
            table = meta.db_schemas_table(cmd)
        elif name == "CommandGetTableTypes":
            table = meta.table_types_table()
        elif name == "CommandGetTables":
            table = self._with_connection(lambda con: meta.tables_table(con, cmd))
        elif name in meta.SCHEMAS:
            table = meta.empty_table(name)
        else:
            raise self._unsupported(name)
        return flight.RecordBatchStream(table)

    @_rpc
    def do_put(self, context: Any, descriptor: Any, reader: Any, writer: Any) -> None:
        who = self._who(context)
        name, cmd = self._command(descriptor)
        if name == "CommandPreparedStatementQuery":
            prep = self._prepared_for(who, cmd["prepared_statement_handle"])
            batches, n = [], 0
            for chunk in reader:                      # one row of parameters; refuse more before reading it all
                if chunk.data is not None:
                    n += chunk.data.num_rows
                    batches.append(chunk.data)
                if n > 1:
                    raise QueryError("several parameter sets bound to one query: bind one row of parameters")
            rows = pa.Table.from_batches(batches).to_pylist() if batches else []
            prep.params = list(rows[0].values()) if rows else None
            return
        if name in ("CommandStatementUpdate", "CommandPreparedStatementUpdate", "CommandStatementSubstraitPlan"):
            raise ReadOnlyRefused(f"{READ_ONLY}: updates are refused (only queries run)")
        raise self._unsupported(name)

    @_rpc
    def do_action(self, context: Any, action: Any) -> Iterator[flight.Result]:
        who = self._who(context)
        kind = action.type
        body = action.body.to_pybytes() if action.body is not None else b""
        if kind == "CreatePreparedStatement":
            cmd = self._action_body(body, proto.ActionCreatePreparedStatementRequest)
            return iter([flight.Result(self._prepare(context, who, cmd["query"] or "", cmd["transaction_id"]))])
        if kind == "ClosePreparedStatement":
            cmd = self._action_body(body, proto.ActionClosePreparedStatementRequest)
            with self._lock:
                prep = self._prepared.get(cmd["prepared_statement_handle"] or b"")
                if prep is not None and prep.owner == who.user:
                    del self._prepared[cmd["prepared_statement_handle"]]
            return iter([])
        if kind == "BeginTransaction":
            self._action_body(body, proto.ActionBeginTransactionRequest)
            return iter([flight.Result(self._begin(who, context.peer()))])
        if kind == "EndTransaction":
            cmd = self._action_body(body, proto.ActionEndTransactionRequest)
            self._end(who, cmd["transaction_id"] or b"")
            return iter([])
        if kind == "CloseSession":       # ADBC closing a connection: end what it left open
            self._close_session(who, context.peer())
            return iter([flight.Result(proto.close_session_result(proto.CLOSE_SESSION_CLOSED))])
        if kind == "CancelFlightInfo":
            info = flight.FlightInfo.deserialize(proto.cancel_flight_info_request(body))
            status = self._cancel(who, info)
            return iter([flight.Result(proto.cancel_flight_info_result(
                proto.CANCEL_STATUS_CANCELLED if status else proto.CANCEL_STATUS_NOT_CANCELLABLE))])
        if kind == "CancelQuery":
            cmd = self._action_body(body, proto.ActionCancelQueryRequest)
            status = self._cancel(who, flight.FlightInfo.deserialize(cmd["info"] or b""))
            return iter([flight.Result(proto.ActionCancelQueryResult.pack(
                result=proto.CANCEL_RESULT_CANCELLED if status else proto.CANCEL_RESULT_NOT_CANCELLABLE))])
        raise QueryError(f"action {kind!r} is not supported by clipsql serve")

    def list_actions(self, context: Any) -> list:
        return [("CreatePreparedStatement", "prepare a query"), ("ClosePreparedStatement", "close a prepared query"),
                ("BeginTransaction", "pin a snapshot for several queries"),
                ("EndTransaction", "end a transaction (commit or rollback: both just release the snapshot)"),
                ("CancelFlightInfo", "cancel a running query"), ("CancelQuery", "cancel a running query"),
                ("CloseSession", "end the transactions and prepared statements of this connection")]

    def list_flights(self, context: Any, criteria: Any) -> Iterator:
        return iter([])

    def do_exchange(self, context: Any, descriptor: Any, reader: Any, writer: Any) -> None:
        raise flight.FlightServerError("DoExchange is not supported by clipsql serve")

    # -- actions ---------------------------------------------------------------------------
    def _prepare(self, context: Any, who: Identity, sql: str, tid: bytes | None) -> bytes:
        txn = self._transaction(who, tid)
        dataset = self._describe(context, who, sql, txn)     # refuses what would not run
        peer = context.peer()
        handle = secrets.token_bytes(16)
        with self._lock:
            if len(self._prepared) >= self.max_prepared:
                oldest = min(self._prepared, key=lambda h: self._prepared[h].used)
                del self._prepared[oldest]
            self._prepared[handle] = Prepared(sql, who.user, tid or None, peer)
        return proto.ActionCreatePreparedStatementResult.pack(
            prepared_statement_handle=handle,
            dataset_schema=dataset.serialize().to_pybytes() if len(dataset) else None)

    def _prepared_for(self, who: Identity, handle: bytes | None) -> Prepared:
        with self._lock:
            prep = self._prepared.get(handle or b"")
        if prep is None or prep.owner != who.user:
            raise QueryError("unknown or closed prepared statement: prepare it again")
        prep.used = time.monotonic()
        return prep

    def _begin(self, who: Identity, peer: str) -> bytes:
        evicted = []
        with self._lock:      # bounded: per user, and in all (each holds an open connection)
            idle = sorted((txn.used, t) for t, txn in self._transactions.items() if not txn.lock.locked())
            mine = [(used, t) for used, t in idle if self._transactions[t].owner == who.user]
            if len(mine) >= self.max_transactions_per_user:
                evicted.append(self._transactions.pop(mine[0][1]))      # the least recently used
            elif len(self._transactions) >= self.max_transactions and idle:
                evicted.append(self._transactions.pop(idle[0][1]))
        for txn in evicted:
            self._close_transaction(txn)
        lease = self.pool.acquire()
        self.pool.park(lease)
        tid = secrets.token_bytes(16)
        with self._lock:
            self._transactions[tid] = Transaction(lease, who.user, peer)
        return proto.ActionBeginTransactionResult.pack(transaction_id=tid)

    def _close_session(self, who: Identity, peer: str) -> None:
        with self._lock:
            ended = [t for t, txn in self._transactions.items() if txn.owner == who.user and txn.peer == peer]
            txns = [self._transactions.pop(t) for t in ended]
            for h in [h for h, p in self._prepared.items() if p.owner == who.user and p.peer == peer]:
                del self._prepared[h]
        for txn in txns:
            self._close_transaction(txn)

    def _end(self, who: Identity, tid: bytes) -> None:
        with self._lock:
            txn = self._transactions.get(tid)
            if txn is None or txn.owner != who.user:
                raise QueryError("unknown or expired transaction")
            del self._transactions[tid]
        self._close_transaction(txn)

    @staticmethod
    def _close_transaction(txn: Transaction) -> None:
        q = txn.busy
        if q is not None and not q.finished:
            q.cancel("query cancelled: its transaction ended")
            if not q.wait(30):
                return        # still in DuckDB: never hand its connection to another request
        txn.lease.release(True)

    def _cancel(self, who: Identity, info: Any) -> bool:
        hit = False
        for endpoint in info.endpoints:
            try:
                name, cmd = proto.parse_command(endpoint.ticket.ticket)
            except proto.ProtocolError:
                continue
            if name != "TicketStatementQuery":
                continue
            with self._lock:
                q = self._queries.get(cmd["statement_handle"] or b"")
            if q is not None and q.owner == who.user:
                q.cancel("query cancelled by the client")
                hit = True
        return hit

    # -- parsing ---------------------------------------------------------------------------
    @staticmethod
    def _command(descriptor: Any) -> tuple[str, dict]:
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise proto.ProtocolError("clipsql serve takes Flight SQL commands, not paths")
        return proto.parse_command(descriptor.command)

    @staticmethod
    def _action_body(body: bytes, msg: proto.Message) -> dict:
        name, value = proto.unpack_any(body)
        if name != msg.name:
            raise proto.ProtocolError(f"malformed action: expected {msg.name}, got {name}")
        return msg.parse(value)

    @staticmethod
    def _unsupported(name: str) -> QueryError:
        if name in ("CommandStatementUpdate", "CommandPreparedStatementUpdate"):
            return ReadOnlyRefused(f"{READ_ONLY}: updates are refused (only queries run)")
        return QueryError(f"{name} is not supported by clipsql serve")

    def running(self) -> list[RunningQuery]:
        """Queries started and not finished (their results may still be streaming)."""
        with self._lock:
            return [q for q in self._queries.values() if not q.finished]

    # -- housekeeping ----------------------------------------------------------------------
    def _reap(self) -> None:
        """Unfetched results past `claim_timeout_s`, idle transactions past `transaction_timeout_s`."""
        while not self._stopping.wait(1.0):
            now = time.monotonic()
            with self._lock:
                done = [h for h, q in self._queries.items() if q.claimed and q.finished]
                for h in done:
                    del self._queries[h]
                unclaimed = [h for h, q in self._queries.items()
                             if not q.claimed and now - q.created > self.claim_timeout_s]
                queries = [self._queries.pop(h) for h in unclaimed]
                stale_t = [t for t, txn in self._transactions.items()
                           if now - txn.used > self.transaction_timeout_s and not txn.lock.locked()]
                txns = [self._transactions.pop(t) for t in stale_t]
            for q in queries:
                q.cancel("query cancelled: its result was not fetched in time")
            for txn in txns:
                self._close_transaction(txn)

    def stop(self, grace_s: float = 10.0) -> bool:
        """Cancel everything running, release every connection, stop serving. False when calls were
        still open after `grace_s` (a client that stopped reading a result blocks its stream's
        write, and pyarrow's shutdown waits for it): the caller then exits without waiting."""
        self._stopping.set()
        with self._lock:
            queries = list(self._queries.values())
            txns = list(self._transactions.values())
            self._queries.clear()
            self._transactions.clear()
        for q in queries:
            q.cancel("query cancelled: the server is stopping")
        for txn in txns:
            self._close_transaction(txn)
        done = threading.Thread(target=self.shutdown, name="clipsql-serve-shutdown", daemon=True)
        done.start()
        done.join(grace_s)
        return not done.is_alive()


class _Releasing:
    """A lease whose release goes through `give_back` (a transaction keeps its connection)."""

    def __init__(self, lease: Lease, give_back: Callable[[bool], None]):
        self.con = lease.con
        self._give_back = give_back
        self._done = False

    def release(self, reusable: bool = True) -> None:
        if not self._done:
            self._done = True
            self._give_back(reusable)
