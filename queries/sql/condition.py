"""User SQL checked with DuckDB's own parser before it is run: one condition, or one query.

Every `where` the library takes (delete, undelete, select, search, the app's WHERE box) is the
user's own SQL boolean expression, run as ``… WHERE (<text>)``. Pasted as text, ``1=0) OR (1=1``
would close the parenthesis and widen the condition to every row. `check_condition` accepts the
text only when ``SELECT * FROM q WHERE <text>`` and ``SELECT * FROM q WHERE (<text>)`` both parse
(``json_serialize_sql``) as one plain SELECT of q with the same condition: text that closes the
parenthesis early, comments the rest out, appends a clause or a second statement parses
differently or not at all. Subqueries, literals holding parentheses and comments inside the
condition stay allowed.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Callable

from clipsql.errors import QueryError
from clipsql.lazy import duckdb

MAX_SQL_CHARS = 100_000


class ConditionError(QueryError):
    """A `where` (or other user SQL) that is not the one condition / query it must be."""


def serialize(con: Any, sql: str, *, param: str | None = None) -> dict:
    """DuckDB's parse tree of `sql` (json_serialize_sql); a parse error → ConditionError."""
    if len(sql) > MAX_SQL_CHARS:
        raise ConditionError(f"the SQL is longer than {MAX_SQL_CHARS} characters", param=param)
    if "\x00" in sql:
        raise ConditionError("the SQL holds a NUL character", param=param)
    con = con if con is not None else _parser()
    out = json.loads(con.execute("SELECT json_serialize_sql($sql)", {"sql": sql}).fetchall()[0][0])
    if out.get("error"):
        raise ConditionError(str(out.get("error_message") or "cannot parse").splitlines()[0], param=param)
    return out


_PARSER: list[Any] = []
_PARSER_LOCK = threading.Lock()


def _parser() -> Any:
    """A cursor on a private in-memory DuckDB connection used only to parse (no data, no files)."""
    with _PARSER_LOCK:
        if not _PARSER:
            _PARSER.append(duckdb.connect(":memory:"))
        return _PARSER[0].cursor()


def shown(text: str, limit: int = 200) -> str:
    """User text quoted on one line for a message (repr, cut to `limit` characters)."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def check_condition(con: Any, text: str, *, param: str = "where", example: str = "width >= 256") -> str:
    """`text` (stripped) when it is ONE SQL boolean expression, else a one-line ConditionError naming
    `param` in backticks (the CLI renames it to its flag). `con` is any DuckDB connection (None: a
    private one); the condition is parsed, not run."""
    text = (text or "").strip()
    if not text:
        raise ConditionError(f"`{param}` is empty: give a SQL condition, e.g. {example}", param=param)
    one = (f"`{param}` takes one SQL condition (e.g. {example}), not a statement, a query clause or "
           "unbalanced parentheses")
    trees = []
    for sql in (f"SELECT * FROM q WHERE {text}", f"SELECT * FROM q WHERE ({text})"):
        try:
            stmts = serialize(con, sql, param=param).get("statements", [])
        except ConditionError as e:
            why = "a statement is not a condition" if "Only SELECT" in str(e) else str(e)
            raise ConditionError(f"{one}: {shown(text)} ({why})", param=param) from None
        node = stmts[0].get("node", {}) if len(stmts) == 1 else {}
        if not _plain_select_of_q(node):
            raise ConditionError(f"{one}: {shown(text)}", param=param)
        trees.append(_without_locations(node["where_clause"]))
    if trees[0] != trees[1]:
        raise ConditionError(f"{one}: {shown(text)}", param=param)
    if find(trees[1], lambda n: n.get("class") == "PARAMETER"):
        raise ConditionError(f"`{param}` cannot hold parameters ($1, ?): write the values", param=param)
    return text


def condition_columns(con: Any, text: str) -> set[str]:
    """The column names a checked condition names."""
    node = serialize(con, f"SELECT * FROM q WHERE ({text})")["statements"][0]["node"]
    return {n["column_names"][-1] for n in find(node["where_clause"], lambda n: n.get("class") == "COLUMN_REF")
            if n.get("column_names")}


def _plain_select_of_q(node: dict) -> bool:
    frm = node.get("from_table") or {}
    return (node.get("type") == "SELECT_NODE" and not node.get("modifiers") and not has_cte(node)
            and not node.get("group_expressions") and not node.get("group_sets") and node.get("having") is None
            and node.get("qualify") is None and node.get("sample") is None
            and [x.get("class") for x in node.get("select_list", [])] == ["STAR"]
            and frm.get("type") == "BASE_TABLE" and frm.get("table_name") == "q"
            and not frm.get("schema_name") and not frm.get("catalog_name")
            and node.get("where_clause") is not None)


def _without_locations(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _without_locations(v) for k, v in tree.items() if not k.startswith("query_location")}
    if isinstance(tree, list):
        return [_without_locations(v) for v in tree]
    return tree


def has_cte(node: dict) -> bool:
    cte = node.get("cte_map") or {}
    return bool(cte.get("map") if isinstance(cte, dict) else cte)


def find(tree: Any, pred: Callable[[dict], bool]) -> list[dict]:
    """Every dict node of a parse tree for which `pred` holds."""
    out, stack = [], [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if pred(x):
                out.append(x)
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return out
