"""`clipsql query` and `clipsql sql`: run SQL and format the result."""
from __future__ import annotations

import io
import json
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from clipsql.errors import ClipsqlError, QueryCancelled, QueryError
from clipsql.lazy import duckdb
from clipsql.queries.sql.db import connect, open_store, reads_no_table
from clipsql.queries.sql.functions import one_blas_thread, udf_error
from clipsql.queries.sql.specs import help_table
from clipsql.store.snapshot import Snapshot

_UDF_PREFIX = re.compile(r"^.*?Python exception occurred while executing the UDF: (?:\w+\.)*\w+: ", re.S)


def clean_error(e: BaseException, con: Any = None) -> str:
    """DuckDB's message, with what clipsql can add: a score function's own message without
    DuckDB's UDF wrapper, and the fix for the two errors new users meet first."""
    msg = str(e).strip()
    msg = _UDF_PREFIX.sub("", msg, count=1)
    if "enable_external_access" in msg or "disabled by configuration" in msg or "Permission Error" in msg:
        msg += ("\n(clipsql query is read-only towards files by default: pass --allow-external-access to "
                "COPY results out or read other files)")
    elif re.search(r"Table with name (scores|stats|embeddings) does not exist", msg) and con is not None:
        try:
            has_models = bool(con.sql("SELECT count(*) FROM embeddings").fetchall()[0][0])
        except Exception:  # noqa: BLE001 - a hint only
            has_models = True
        if not has_models:
            msg = "the store has no models yet: ingest data first (`clipsql ingest STORE SOURCE --model …`)"
    return msg


def execute(con: Any, sql: str) -> Any:
    try:
        return con.sql(sql)
    except duckdb.Error as e:
        raise udf_error(e, con) or QueryError(clean_error(e, con)) from None


def fetch_table(con: Any, sql: str) -> Any:
    """Run `sql` to an Arrow table (None for a statement without rows), BLAS pinned on the
    thread that runs it; a DuckDB error becomes QueryError with a clean message."""
    with one_blas_thread():
        rel = execute(con, sql)
        if rel is None:
            return None
        try:
            tbl = rel.arrow()
            return tbl.read_all() if hasattr(tbl, "read_all") else tbl
        except duckdb.InterruptException:
            raise QueryCancelled("query cancelled") from None
        except duckdb.Error as e:
            raise udf_error(e, con) or QueryError(clean_error(e, con)) from None


def interruptible(con: Any, fn: Any) -> Any:
    """Run `fn()` (a query on `con`) on a worker thread so that Ctrl-C / SIGINT cancels it.

    The main thread waits in short joins with its own SIGINT handler, which interrupts the
    connection (repeatedly: a query that had not started yet would run on) and makes this raise
    QueryCancelled. A plain KeyboardInterrupt is not used: raised while DuckDB runs, it left the
    worker's thread state torn down and the process aborted at exit. Off the main thread (no
    signal handlers there) the query runs inline."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    box: dict[str, Any] = {}
    hit = threading.Event()

    def target() -> None:
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["err"] = e

    def on_sigint(signum: int, frame: Any) -> None:
        hit.set()
        con.interrupt()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        t = threading.Thread(target=target, name="clipsql-query", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.1)
            if hit.is_set():
                con.interrupt()
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit.is_set():
        raise QueryCancelled("query cancelled")
    if "err" in box:
        raise box["err"]
    return box.get("out")


def run_query(store: Any, sql: str, fmt: str = "table", output: Path | None = None,
              allow_external_access: bool = False, max_rows: int = 40) -> str:
    """Run `sql` against the store; returns text for stdout ('' when written to `output`)."""
    snap = Snapshot.read(open_store(store))     # the warning and the query: one snapshot
    con = connect(snap, allow_external_access=allow_external_access, for_sql=sql)
    try:
        # a statement without FROM (`SELECT 1`) opens no Lance table, and scores none of the store's
        # rows: the warning that the fit predates rows is not its concern
        if snap.models and not reads_no_table(sql, con):
            warn = snap.staleness(snap.model())
            if warn:
                print(f"warning: {warn}", file=sys.stderr)
        tbl = interruptible(con, lambda: fetch_table(con, sql))
        return _format(tbl, fmt, output, max_rows)
    finally:
        con.close()


def _format(tbl: Any, fmt: str, output: Path | None, max_rows: int) -> str:
    if tbl is None:
        return ""
    if fmt == "parquet":
        if output is None:
            raise QueryError("`fmt` parquet needs an `output` file", param="output")
        pq.write_table(tbl, output)
        return ""
    if fmt == "csv":
        buf = io.BytesIO()
        pcsv.write_csv(_flatten_lists(tbl), buf)
        text = buf.getvalue().decode()
    elif fmt == "json":
        text = json.dumps(tbl.to_pylist(), default=str, indent=1)
    else:
        text = _table_text(tbl, max_rows)
    if output is not None:
        Path(output).write_text(text)
        return ""
    return text.rstrip("\n")


def _flatten_lists(tbl: Any) -> Any:
    cols = []
    for col in tbl.columns:
        if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_struct(col.type):
            col = pa.array([None if v is None else json.dumps(v) for v in col.to_pylist()], pa.string())
        cols.append(col)
    return pa.table(cols, names=tbl.column_names)


def _table_text(tbl: Any, max_rows: int) -> str:
    rows = tbl.to_pylist()
    shown = rows if not max_rows else rows[:max_rows]
    names = tbl.column_names

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, (list, tuple)):
            head = ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v[:3])
            return f"[{head}{', …' if len(v) > 3 else ''}] ({len(v)})"
        s = "NULL" if v is None else str(v)
        return s if len(s) <= 60 else s[:57] + "…"

    grid = [[cell(r[n]) for n in names] for r in shown]
    widths = [max([len(n)] + [len(g[i]) for g in grid]) for i, n in enumerate(names)]
    out = [" | ".join(n.ljust(w) for n, w in zip(names, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(g, widths)) for g in grid]
    more = len(rows) - len(shown)
    out.append(f"({len(rows)} rows{f', {more} not shown (use --max-rows 0 or --output)' if more > 0 else ''})")
    return "\n".join(out)


def repl(store: Any, allow_external_access: bool = False) -> None:
    """The interactive prompt: statements end with ';', errors print and the prompt goes on,
    Ctrl-C cancels the running query (or clears the line), Ctrl-D or `.quit` leaves (an
    unfinished statement is dropped, not run); dot commands (`.help`) list the tables, their
    columns and the functions; line editing and history (~/.clipsql_history) through readline."""
    con = connect(store, allow_external_access=allow_external_access)
    history = _readline()
    try:
        _repl(con)
    finally:
        con.close()
        if history is not None:
            history()


def _readline() -> Any:
    """Line editing + history where the readline module exists; returns a function saving it."""
    try:
        import os
        import readline
    except ImportError:
        return None
    path = os.path.expanduser("~/.clipsql_history")
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(2000)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass
    return save


DOT_COMMANDS = (
    (".tables", "the tables and views you can query"),
    (".schema [NAME]", "the columns and types of NAME (default: of every table)"),
    (".help", "these commands and the SQL functions"),
    (".quit", "leave (also .exit, \\q, Ctrl-D)"),
)


def _repl(con: Any) -> None:
    print("clipsql SQL — views: samples, embeddings, rejects, stats, scores (.tables, .schema NAME). End "
          "statements with ';'; .help lists the commands and functions; Ctrl-C cancels, Ctrl-D or .quit leaves.")
    buf: list[str] = []
    while True:
        try:
            line = input("... " if buf else "sql> ")
        except KeyboardInterrupt:          # at the prompt: drop the half-typed statement
            print()
            buf = []
            continue
        except EOFError:
            print()
            if "\n".join(buf).strip():    # never run half a statement the user did not finish
                print("(the unfinished statement was not run: end a statement with ';')")
            return
        if not buf and line.strip().startswith((".", "\\")):
            if _dot_command(con, line.strip()):
                return
            continue
        buf.append(line)
        if line.rstrip().endswith(";"):
            stmt, buf = "\n".join(buf), []
            _run_statement(con, stmt)


def _dot_command(con: Any, line: str) -> bool:
    """Run one dot command; True when it asks to leave."""
    command, _, arg = line.partition(" ")
    arg = arg.strip().rstrip(";").strip()
    if command in (".quit", ".exit", "\\q"):
        return True
    if command == ".help":
        width = max(len(c) for c, _ in DOT_COMMANDS)
        print("\n".join(f"{c.ljust(width)}  {what}" for c, what in DOT_COMMANDS) + "\n")
        print(help_table())
    elif command == ".tables":
        rows = _tables(con)
        width = max((len(n) for n, _ in rows), default=0)
        print("\n".join(f"{n.ljust(width)}  {kind}" for n, kind in rows) or "no tables")
    elif command == ".schema":
        _print_schema(con, arg)
    else:
        print(f"Error: unknown command {command}: .help lists the commands")
    return False


def _tables(con: Any) -> list[tuple[str, str]]:
    """(name, 'view' | 'table') of what a user queries: the store's views and the user's own
    tables; the connection's internal views (names starting with '_') are left out."""
    rows = con.execute("SELECT DISTINCT table_name, lower(table_type) FROM information_schema.tables "
                       "WHERE table_schema = 'main' AND NOT starts_with(table_name, '_') ORDER BY 1").fetchall()
    return [(n, "view" if "view" in t else "table") for n, t in rows]


def _print_schema(con: Any, name: str) -> None:
    names = [n for n, _ in _tables(con)]
    if name:
        match = [n for n in names if n == name] or [n for n in names if n.lower() == name.lower()]
        if not match:
            print(f"Error: no table or view named {name!r}: .tables lists them")
            return
        names = match[:1]
    for i, table in enumerate(names):
        cols = con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = "
                           "'main' AND table_name = ? ORDER BY ordinal_position", [table]).fetchall()
        width = max((len(c) for c, _ in cols), default=0)
        print(("\n" if i else "") + f"{table}:\n" + "\n".join(f"  {c.ljust(width)}  {t}" for c, t in cols))


def _run_statement(con: Any, stmt: str) -> None:
    try:
        tbl = interruptible(con, lambda: fetch_table(con, stmt))
        if tbl is not None:
            print(_table_text(tbl, 40))
    except QueryCancelled:
        print("cancelled")
    except ClipsqlError as e:
        print(f"Error: {e}")
