"""Flight SQL's metadata calls (what BI tools and JDBC's DatabaseMetaData ask first): server
information, catalogs, schemas, tables and table types, and empty key lists (views have none).

Result schemas follow format/FlightSql.proto. Names come from DuckDB's information_schema of a
prepared connection (catalog `memory`, schema `main`, the store's views); the connection's own
registrations (names starting with `_`, in the `temp` catalog) are not listed. Client filter
patterns (SQL LIKE: % and _) are passed to DuckDB as parameters.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from clipsql import __version__

CATALOG, SCHEMA = "memory", "main"

# SqlInfo ids (format/FlightSql.proto, enum SqlInfo)
SERVER_NAME, SERVER_VERSION, SERVER_ARROW_VERSION, SERVER_READ_ONLY = 0, 1, 2, 3
SERVER_SQL, SERVER_SUBSTRAIT, SERVER_TRANSACTION, SERVER_CANCEL = 4, 5, 8, 9
SERVER_STATEMENT_TIMEOUT, SERVER_TRANSACTION_TIMEOUT = 100, 101
SQL_DDL_CATALOG, SQL_DDL_SCHEMA, SQL_DDL_TABLE, SQL_IDENTIFIER_CASE = 500, 501, 502, 503
SQL_IDENTIFIER_QUOTE_CHAR, SQL_QUOTED_IDENTIFIER_CASE, SQL_ALL_TABLES_ARE_SELECTABLE = 504, 505, 506
SQL_NULL_ORDERING, SQL_SCHEMA_TERM, SQL_CATALOG_TERM, SQL_CATALOG_AT_START = 507, 529, 531, 532
SQL_TRANSACTIONS_SUPPORTED = 555

TRANSACTION_SUPPORT_TRANSACTION = 1            # SqlSupportedTransaction
CASE_INSENSITIVE = 1                           # SqlSupportedCaseSensitivity
NULLS_SORTED_AT_END = 3                        # SqlNullOrdering (DuckDB: NULLS LAST by default)

_VALUE_TYPE = pa.union([
    pa.field("string_value", pa.utf8()),
    pa.field("bool_value", pa.bool_()),
    pa.field("bigint_value", pa.int64()),
    pa.field("int32_bitmask", pa.int32()),
    pa.field("string_list", pa.list_(pa.field("item", pa.utf8()))),
    pa.field("int32_to_int32_list_map", pa.map_(pa.int32(), pa.list_(pa.field("item", pa.int32())))),
], mode="dense", type_codes=[0, 1, 2, 3, 4, 5])

SQL_INFO_SCHEMA = pa.schema([pa.field("info_name", pa.uint32(), nullable=False),
                             pa.field("value", _VALUE_TYPE, nullable=False)])
CATALOGS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8(), nullable=False)])
DB_SCHEMAS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8()),
                               pa.field("db_schema_name", pa.utf8(), nullable=False)])
TABLES_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8()), pa.field("db_schema_name", pa.utf8()),
                           pa.field("table_name", pa.utf8(), nullable=False),
                           pa.field("table_type", pa.utf8(), nullable=False)])
TABLES_WITH_SCHEMA = TABLES_SCHEMA.append(pa.field("table_schema", pa.binary(), nullable=False))
TABLE_TYPES_SCHEMA = pa.schema([pa.field("table_type", pa.utf8(), nullable=False)])
PRIMARY_KEYS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8()), pa.field("db_schema_name", pa.utf8()),
                                 pa.field("table_name", pa.utf8(), nullable=False),
                                 pa.field("column_name", pa.utf8(), nullable=False),
                                 pa.field("key_name", pa.utf8()),
                                 pa.field("key_sequence", pa.int32(), nullable=False)])
FOREIGN_KEYS_SCHEMA = pa.schema([
    pa.field("pk_catalog_name", pa.utf8()), pa.field("pk_db_schema_name", pa.utf8()),
    pa.field("pk_table_name", pa.utf8(), nullable=False), pa.field("pk_column_name", pa.utf8(), nullable=False),
    pa.field("fk_catalog_name", pa.utf8()), pa.field("fk_db_schema_name", pa.utf8()),
    pa.field("fk_table_name", pa.utf8(), nullable=False), pa.field("fk_column_name", pa.utf8(), nullable=False),
    pa.field("key_sequence", pa.int32(), nullable=False), pa.field("fk_key_name", pa.utf8()),
    pa.field("pk_key_name", pa.utf8()), pa.field("update_rule", pa.uint8(), nullable=False),
    pa.field("delete_rule", pa.uint8(), nullable=False)])

SCHEMAS = {
    "CommandGetSqlInfo": SQL_INFO_SCHEMA,
    "CommandGetCatalogs": CATALOGS_SCHEMA,
    "CommandGetDbSchemas": DB_SCHEMAS_SCHEMA,
    "CommandGetTables": TABLES_SCHEMA,
    "CommandGetTableTypes": TABLE_TYPES_SCHEMA,
    "CommandGetPrimaryKeys": PRIMARY_KEYS_SCHEMA,
    "CommandGetExportedKeys": FOREIGN_KEYS_SCHEMA,
    "CommandGetImportedKeys": FOREIGN_KEYS_SCHEMA,
    "CommandGetCrossReference": FOREIGN_KEYS_SCHEMA,
}
NEEDS_CONNECTION = {"CommandGetTables"}


def schema_for(name: str, cmd: dict[str, Any]) -> pa.Schema:
    if name == "CommandGetTables" and cmd.get("include_schema"):
        return TABLES_WITH_SCHEMA
    return SCHEMAS[name]


def server_info(transaction_timeout_s: float) -> dict[int, Any]:
    return {
        SERVER_NAME: "clipsql",
        SERVER_VERSION: __version__,
        SERVER_ARROW_VERSION: pa.__version__,
        SERVER_READ_ONLY: True,
        SERVER_SQL: True,
        SERVER_SUBSTRAIT: False,
        SERVER_TRANSACTION: ("int32", TRANSACTION_SUPPORT_TRANSACTION),
        SERVER_CANCEL: True,
        SERVER_STATEMENT_TIMEOUT: ("int32", 0),
        SERVER_TRANSACTION_TIMEOUT: ("int32", int(transaction_timeout_s * 1000)),
        SQL_DDL_CATALOG: False,
        SQL_DDL_SCHEMA: False,
        SQL_DDL_TABLE: False,
        SQL_IDENTIFIER_CASE: ("int32", CASE_INSENSITIVE),
        SQL_IDENTIFIER_QUOTE_CHAR: '"',
        SQL_QUOTED_IDENTIFIER_CASE: ("int32", CASE_INSENSITIVE),
        SQL_ALL_TABLES_ARE_SELECTABLE: True,
        SQL_NULL_ORDERING: ("int32", NULLS_SORTED_AT_END),
        SQL_SCHEMA_TERM: "schema",
        SQL_CATALOG_TERM: "catalog",
        SQL_CATALOG_AT_START: True,
        SQL_TRANSACTIONS_SUPPORTED: True,
    }


def sql_info_table(requested: list[int], info: dict[int, Any]) -> pa.Table:
    """One row per requested id the server knows (all of them when none is requested)."""
    ids = [i for i in (requested or sorted(info)) if i in info]
    children: list[list[Any]] = [[] for _ in range(6)]
    types, offsets = [], []
    for i in ids:
        value = info[i]
        if isinstance(value, tuple) and value[0] == "int32":
            code, value = 3, value[1]
        elif isinstance(value, bool):
            code = 1
        elif isinstance(value, int):
            code = 2
        elif isinstance(value, (list, tuple)):
            code, value = 4, list(value)
        else:
            code, value = 0, str(value)
        types.append(code)
        offsets.append(len(children[code]))
        children[code].append(value)
    arrays = [pa.array(children[k], type=_VALUE_TYPE.field(k).type) for k in range(6)]
    union = pa.UnionArray.from_dense(pa.array(types, pa.int8()), pa.array(offsets, pa.int32()), arrays,
                                     [_VALUE_TYPE.field(k).name for k in range(6)], list(range(6)))
    return pa.Table.from_arrays([pa.array(ids, pa.uint32()), union], schema=SQL_INFO_SCHEMA)


def catalogs_table() -> pa.Table:
    return pa.Table.from_pylist([{"catalog_name": CATALOG}], schema=CATALOGS_SCHEMA)


def db_schemas_table(cmd: dict[str, Any]) -> pa.Table:
    rows = []
    if cmd.get("catalog") in (None, CATALOG) and _like(SCHEMA, cmd.get("db_schema_filter_pattern")):
        rows.append({"catalog_name": CATALOG, "db_schema_name": SCHEMA})
    return pa.Table.from_pylist(rows, schema=DB_SCHEMAS_SCHEMA)


def table_types_table() -> pa.Table:
    return pa.Table.from_pylist([{"table_type": "TABLE"}, {"table_type": "VIEW"}], schema=TABLE_TYPES_SCHEMA)


def tables_table(con: Any, cmd: dict[str, Any]) -> pa.Table:
    """The store's views (and any table), filtered as asked; with their Arrow schemas on request."""
    sql = ("SELECT table_catalog, table_schema, table_name, table_type FROM information_schema.tables "
           "WHERE table_catalog = ? AND NOT starts_with(table_name, '_')")
    params: list[Any] = [CATALOG]
    if cmd.get("catalog") is not None:
        sql += " AND table_catalog = ?"
        params.append(cmd["catalog"])
    if cmd.get("db_schema_filter_pattern") is not None:
        sql += " AND table_schema LIKE ?"
        params.append(cmd["db_schema_filter_pattern"])
    if cmd.get("table_name_filter_pattern") is not None:
        sql += " AND table_name LIKE ?"
        params.append(cmd["table_name_filter_pattern"])
    rows = con.execute(sql + " ORDER BY 1, 2, 3", params).fetchall()
    kinds = {t.upper() for t in cmd.get("table_types") or []}
    out = []
    for catalog, schema, name, kind in rows:
        kind = "TABLE" if kind == "BASE TABLE" else kind
        if kinds and kind not in kinds:
            continue
        row = {"catalog_name": catalog, "db_schema_name": schema, "table_name": name, "table_type": kind}
        if cmd.get("include_schema"):
            row["table_schema"] = _table_schema(con, name).serialize().to_pybytes()
        out.append(row)
    return pa.Table.from_pylist(out, schema=schema_for("CommandGetTables", cmd))


def _table_schema(con: Any, name: str) -> pa.Schema:
    return con.table(name).limit(0).to_arrow_table().schema


def empty_table(name: str) -> pa.Table:
    return SCHEMAS[name].empty_table()


def _like(value: str, pattern: str | None) -> bool:
    if pattern is None:
        return True
    import re
    rx = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, re.S) is not None
