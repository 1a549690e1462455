"""`clipsql query` and `clipsql sql`: run SQL and format the result."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from store.errors import QueryError

from .db import connect
from .functions import one_blas_thread


def execute(con: Any, sql: str) -> Any:
    import duckdb
    try:
        return con.sql(sql)
    except duckdb.Error as e:
        raise QueryError(str(e)) from None


def run_query(store: Any, sql: str, fmt: str = "table", output: Path | None = None,
              allow_external_access: bool = False, max_rows: int = 40) -> str:
    """Run `sql` against the store; returns text for stdout ('' when written to `output`)."""
    from .db import open_store
    from .fit import staleness
    st = open_store(store)
    if st.list_models():
        warn = staleness(st, st.model())
        if warn:
            import sys
            print(f"warning: {warn}", file=sys.stderr)
    con = connect(st, allow_external_access=allow_external_access)
    try:
        with one_blas_thread():
            return _run(con, sql, fmt, output, max_rows)
    finally:
        con.close()


def _run(con: Any, sql: str, fmt: str, output: Path | None, max_rows: int) -> str:
    import duckdb
    rel = execute(con, sql)
    if rel is None:
        return ""
    try:
        tbl = rel.arrow()
        if hasattr(tbl, "read_all"):
            tbl = tbl.read_all()
    except duckdb.Error as e:
        raise QueryError(str(e)) from None
    if fmt == "parquet":
        if output is None:
            raise QueryError("--format parquet needs --output FILE")
        import pyarrow.parquet as pq
        pq.write_table(tbl, output)
        return ""
    if fmt == "csv":
        import pyarrow.csv as pcsv
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
    import pyarrow as pa
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
    """A minimal interactive prompt: statements end with ';', `.quit` leaves."""
    con = connect(store, allow_external_access=allow_external_access)
    try:
        _repl(con)
    finally:
        con.close()


def _repl(con: Any) -> None:
    print("clipsql SQL — views: samples, embeddings, rejects, stats, scores. End statements with ';', .quit to leave.")
    buf: list[str] = []
    while True:
        try:
            line = input("... " if buf else "sql> ")
        except EOFError:
            print()
            return
        if not buf and line.strip() in (".quit", ".exit", "\\q"):
            return
        buf.append(line)
        if line.rstrip().endswith(";"):
            stmt = "\n".join(buf)
            buf = []
            try:
                with one_blas_thread():
                    rel = execute(con, stmt)
                    tbl = None if rel is None else rel.arrow()
                if tbl is not None:
                    print(_table_text(tbl.read_all() if hasattr(tbl, "read_all") else tbl, 40))
            except QueryError as e:
                print(f"Error: {e}")
