"""The app's view of a store as SQL: the grid's query, its filters, search and sort.

A view state (JSON from the page):

    {"sql": "SELECT …" | null,                      the grid's query (null: the default view)
     "search": {"text": "a red circle"} | {"like": "<id>"} | null,
     "brushes": {"clip_score": [0.21, 0.3], …},     inclusive numeric ranges (histogram brushing)
     "filters": [{"column": "kind", "op": "=", "value": "photo"}, …],
     "where": "SQL boolean expression" | "",        the WHERE box, the user's own SQL
     "tag": "reject" | null,                        only rows carrying this tag
     "sort": {"column": "clip_score", "desc": true} | null}

becomes a `View`: the base query (the grid's SQL, or the search) and the conditions and order
over its rows. Every value travels as a named parameter when the server runs it (`$p0`, `$p1`,
…); `View.display_sql()` is the same query with the values written as literals, the SQL the page
shows (copyable: `clipsql query STORE "…"` returns the grid's rows) and the SQL an export runs
through `clipsql select --sql`.

User SQL is checked with DuckDB's own parser (`json_serialize_sql`): the grid's SQL must be one
SELECT statement; the WHERE box must parse as ONE boolean expression, i.e. `SELECT * FROM q WHERE
(<text>)` must be a single plain SELECT of q with that WHERE and nothing else (no second
statement, set operation, CTE, grouping, ordering or parameter smuggled in). Both then run on the
server's read-only connection (no file access, locked configuration).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from clipsql.errors import QueryError
from clipsql.queries.sql.condition import MAX_SQL_CHARS, ConditionError, check_condition, condition_columns, find
from clipsql.queries.sql.db import quote_ident, quote_literal

OPS = ("=", "!=", "<", "<=", ">", ">=", "contains")
SEARCH_K = 200


class ViewError(QueryError):
    """A view state the app cannot run as given (bad SQL, unknown column, bad value): one line."""


# --------------------------------------------------------------------------- parsing user SQL
def serialize(con: Any, sql: str) -> dict:
    """DuckDB's parse tree of `sql` (json_serialize_sql); a parse error → ViewError."""
    if len(sql) > MAX_SQL_CHARS:
        raise ViewError(f"the SQL is longer than {MAX_SQL_CHARS} characters")
    if "\x00" in sql:
        raise ViewError("the SQL holds a NUL character")
    out = json.loads(con.execute("SELECT json_serialize_sql($sql)", {"sql": sql}).fetchall()[0][0])
    if out.get("error"):
        msg = str(out.get("error_message") or "cannot parse").splitlines()[0]
        if "Only SELECT" in msg:
            msg = "only a SELECT query can be shown (the app never changes the store through SQL)"
        raise ViewError(msg)
    return out


def check_select(con: Any, sql: str) -> str:
    """The grid's SQL, stripped: exactly one SELECT statement without parameters."""
    sql = sql.strip().rstrip(";").strip()
    if not sql:
        raise ViewError("the grid's SQL is empty")
    tree = serialize(con, sql)
    if len(tree.get("statements", [])) != 1:
        raise ViewError("the grid's SQL must be ONE SELECT statement")
    if find(tree, lambda n: n.get("class") == "PARAMETER"):
        raise ViewError("the grid's SQL cannot hold parameters ($1, ?): write the values")
    return sql


def check_where(con: Any, text: str) -> tuple[str, set[str]]:
    """The WHERE box checked as one boolean expression (queries.sql.condition, the check every
    `where` goes through); (its text, the column names it names)."""
    try:
        text = check_condition(con, text, example="kind = 'photo' AND width >= 256")
    except ConditionError as e:
        raise ViewError(e.message({"where": "the WHERE box"})) from None
    return text, condition_columns(con, text)


def table_names(con: Any, sql: str) -> set[str]:
    """The tables and views `sql` reads (its BASE_TABLE references)."""
    tree = serialize(con, sql)
    return {n.get("table_name") for n in find(tree, lambda n: n.get("type") == "BASE_TABLE")}


# --------------------------------------------------------------------------- values
def literal(v: Any) -> str:
    """A value as SQL text for the shown SQL (the server binds it as a parameter)."""
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v!r}::DOUBLE"
    if isinstance(v, str):
        return quote_literal(v)
    raise ViewError(f"unsupported value {v!r}")


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ViewError(f"{what} must be a finite number; got {v!r}")
    return float(v)


def _text(v: Any, what: str, limit: int = 10_000) -> str:
    if not isinstance(v, str) or "\x00" in v or len(v) > limit:
        raise ViewError(f"{what} must be text of at most {limit} characters")
    return v


@dataclass
class Sql:
    """SQL with values: `parts` are SQL text (str) or values (`Val`), rendered with parameters or literals."""
    parts: list = field(default_factory=list)

    def add(self, *parts: Any) -> "Sql":
        self.parts.extend(parts)
        return self

    def render(self, params: dict | None) -> str:
        out = []
        for p in self.parts:
            if isinstance(p, Val):
                if params is None:
                    out.append(literal(p.value))
                else:
                    name = f"p{len(params)}"
                    params[name] = p.value
                    out.append("$" + name)
            elif isinstance(p, Sql):
                out.append(p.render(params))
            else:
                out.append(p)
        return "".join(out)


@dataclass(frozen=True)
class Val:
    value: Any


# --------------------------------------------------------------------------- the view
@dataclass
class Cond:
    sql: Sql
    brush: str | None = None     # the column of a histogram brush
    paren: bool = False          # the WHERE box's text goes in parentheses

    def render(self, params: dict | None) -> str:
        text = self.sql.render(params)
        return f"({text})" if self.paren else text


@dataclass
class View:
    base: Sql                    # the grid's rows
    conds: list[Cond]            # conditions over the base's columns (AND)
    columns: set[str]            # base columns the conditions and the order need
    order: Sql | None            # ORDER BY text (None: the base's own order)
    sort_column: str | None = None
    where_text: str = ""
    brush_columns: dict[str, tuple[float, float]] = field(default_factory=dict)

    def base_sql(self, params: dict | None = None) -> str:
        return self.base.render(params)

    def conditions(self, params: dict | None, skip_brush: str | None = None, sep: str = " AND ") -> str:
        """The conditions joined by AND ('' when none); `skip_brush`: leave that column's brush out."""
        return sep.join(c.render(params) for c in self.conds if skip_brush is None or c.brush != skip_brush)

    def display_sql(self, select_list: str = "*") -> str:
        """The SQL of the grid as it is shown and exported: values as literals."""
        where = self.conditions(None, sep="\n  AND ")
        sql = f"SELECT {select_list} FROM (\n{self.base_sql(None)}\n) AS q"
        if where:
            sql += "\nWHERE " + where
        if self.order is not None:
            sql += "\nORDER BY " + self.order.render(None)
        return sql


def default_sql(st: Any, samples_cols: list[str]) -> str:
    """The default view: the `scores` view of the default model, with the samples' metadata columns."""
    models = st.list_models()
    if not models:
        return "SELECT * EXCLUDE (metadata) FROM samples"
    rec = st.model()
    skip = {"id", "uri", "caption", "metadata"}
    meta = ", ".join(f"s.{quote_ident(c)}" for c in samples_cols if c not in skip)
    return ("SELECT sc.id, sc.uri, sc.caption, sc.* EXCLUDE (id, model, uri, caption)"
            + (f", {meta}" if meta else "")
            + f"\nFROM scores sc JOIN samples s USING (id)\nWHERE sc.model = {quote_literal(rec.model_id)}")


@dataclass
class Search:
    """A search: the query vector's SQL, k and the model; `sql` is the grid's query it stands for."""
    vector: Sql
    k: int
    model: str
    sql: Sql


def search_of(st: Any, search: dict, k: int = SEARCH_K) -> Search:
    """A text prompt (text → image) or an id (image → image): the `nearest` query, best first."""
    rec = st.model()
    m = Val(rec.model_id)
    if "text" in search:
        prompt = _text(search["text"], "the search prompt", 2000).strip()
        if not prompt:
            raise ViewError("type a prompt to search")
        vector = Sql().add("text_embedding(", Val(prompt), ", ", m, ")")
    elif "like" in search:
        vector = Sql().add("(SELECT image_embedding FROM embeddings WHERE id = ",
                           Val(_text(search["like"], "the id", 1000)), " AND model = ", m, ")")
    else:
        raise ViewError("a search is {\"text\": prompt} or {\"like\": id}")
    sql = Sql().add("SELECT n.id, n.score AS similarity, s.* EXCLUDE (id, metadata)\nFROM nearest(", vector,
                    f", {int(k)}, model := ", m, ") n JOIN samples s USING (id)\nORDER BY n.score DESC, n.id")
    return Search(vector, int(k), rec.model_id, sql)


def build_view(con: Any, st: Any, state: dict, schema: dict[str, str] | None, default: str) -> tuple[View, Any]:
    """(View, the base's Sql) of a view state. `schema`: {column: type} of the base's result, or None
    to parse the base only (the caller binds it, then calls again with the schema)."""
    if not isinstance(state, dict):
        raise ViewError("the view state must be a JSON object")
    search = state.get("search")
    if search:
        if not isinstance(search, dict):
            raise ViewError("a search is {\"text\": prompt} or {\"like\": id}")
        base = search_of(st, search).sql
    else:
        sql = state.get("sql")
        base = Sql().add(check_select(con, _text(sql, "the grid's SQL", MAX_SQL_CHARS) if sql else default))
    view = View(base=base, conds=[], columns=set(), order=None)
    if schema is None:
        return view, base
    cols = dict(schema)

    def column(name: Any, what: str, numeric: bool = False) -> str:
        if not isinstance(name, str) or name not in cols:
            raise ViewError(f"{what}: {name!r} is not a column of the grid's rows")
        if numeric and not is_numeric(cols[name]):
            raise ViewError(f"{what}: column {name} is {cols[name]}, not a number")
        if not is_scalar(cols[name]):
            raise ViewError(f"{what}: column {name} holds {cols[name]} values")
        view.columns.add(name)
        return quote_ident(name)

    brushes = state.get("brushes") or {}
    if not isinstance(brushes, dict):
        raise ViewError("brushes must map a column to [low, high]")
    for name, rng in sorted(brushes.items()):
        if not isinstance(rng, (list, tuple)) or len(rng) != 2:
            raise ViewError(f"the brush on {name!r} must be [low, high]")
        lo, hi = sorted((_number(rng[0], "a brush bound"), _number(rng[1], "a brush bound")))
        view.conds.append(Cond(Sql().add(column(name, "brush", numeric=True), " BETWEEN ", Val(lo), " AND ", Val(hi)),
                               brush=name))
        view.brush_columns[name] = (lo, hi)
    filters = state.get("filters") or []
    if not isinstance(filters, list):
        raise ViewError("filters must be a list")
    for f in filters:
        if not isinstance(f, dict):
            raise ViewError("a filter is {column, op, value}")
        op = f.get("op", "=")
        if op not in OPS:
            raise ViewError(f"a filter's op is one of {', '.join(OPS)}; got {op!r}")
        ident = column(f.get("column"), "filter")
        value = f.get("value")
        if op == "contains":
            c = Sql().add("contains(lower(CAST(", ident, " AS VARCHAR)), lower(", Val(_text(value, "a filter value")),
                          "))")
        elif value is None:
            if op not in ("=", "!="):
                raise ViewError("a NULL filter value takes = or !=")
            c = Sql().add(ident, " IS NULL" if op == "=" else " IS NOT NULL")
        else:
            if isinstance(value, float):
                value = _number(value, "a filter value")
            elif not isinstance(value, (str, int, bool)):
                raise ViewError(f"a filter value is text, a number or true/false; got {value!r}")
            if isinstance(value, str):
                _text(value, "a filter value")
            c = Sql().add(ident, f" {op} ", Val(value))
        view.conds.append(Cond(c))
    where = state.get("where") or ""
    if where.strip() if isinstance(where, str) else where:
        text, names = check_where(con, _text(where, "the WHERE box", MAX_SQL_CHARS))
        view.columns |= {n for n in names if n in cols and is_scalar(cols[n])}
        view.conds.append(Cond(Sql().add(text), paren=True))
        view.where_text = text
    tag = state.get("tag")
    if tag:
        view.conds.append(Cond(Sql().add("id IN (SELECT id FROM tags WHERE tag = ", Val(_text(tag, "the tag", 200)),
                                         ")")))
    sort = state.get("sort")
    if sort:
        if not isinstance(sort, dict):
            raise ViewError("sort is {column, desc}")
        ident = column(sort.get("column"), "sort")
        view.sort_column = sort["column"]
        view.order = Sql().add(ident, " DESC" if sort.get("desc") else " ASC", " NULLS LAST, id")
    return view, base


def is_numeric(sql_type: str) -> bool:
    t = sql_type.upper()
    return t in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                 "UBIGINT", "FLOAT", "DOUBLE", "REAL") or t.startswith("DECIMAL")


def is_scalar(sql_type: str) -> bool:
    t = sql_type.upper()
    return not (t.endswith("]") or t.startswith(("STRUCT", "MAP", "UNION", "BLOB")))
