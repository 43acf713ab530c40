"""The read-only check of a query, made on DuckDB's own parse of it rather than on its keywords.

A query is accepted when it is exactly one statement, of type ``SELECT`` (or ``EXPLAIN [ANALYZE]`` of one), and
the parsed statement (``json_serialize_sql``: DuckDB's own serialization of its parse tree) holds

* only query nodes that read (``SELECT``, set operations, CTEs): a ``COPY``, ``DELETE``, ``INSERT``, ``UPDATE``
  or any other node kind nested anywhere, e.g. in a CTE (``WITH d AS (DELETE FROM runs RETURNING *) SELECT
  * FROM d``), is refused;
* only table functions that read (``read_parquet``, ``range``, ``glob``, DuckDB's catalogue functions, ...):
  ``query()`` and ``query_table()`` would run SQL text this check never sees, others change logging or
  checkpoints;
* no scalar function with an effect outside the query (``write_log``).

What DuckDB cannot serialize is refused too: the check fails closed. It is one of two barriers; the other is
the engine's configuration (``actsparse.queries.engine``): no writable path is reachable and the tables cannot
be changed, whatever statement got through.
"""

from __future__ import annotations

import json
import re

from actsparse.core.errors import ActsparseError

READING_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})
# Table functions a query may call: file readers (DuckDB's external access is locked to the store), generators,
# DuckDB's catalogue and the Parquet metadata readers.
READING_TABLE_FUNCTIONS = frozenset({
    "read_parquet", "parquet_scan", "parquet_metadata", "parquet_schema", "parquet_file_metadata",
    "parquet_kv_metadata", "parquet_bloom_probe", "read_csv", "read_csv_auto", "sniff_csv", "read_json",
    "read_json_auto", "read_json_objects", "read_ndjson", "read_ndjson_auto", "read_ndjson_objects", "read_text",
    "read_blob", "glob", "range", "generate_series", "unnest", "repeat", "repeat_row", "summary",
    "duckdb_columns", "duckdb_constraints", "duckdb_databases", "duckdb_dependencies", "duckdb_functions",
    "duckdb_indexes", "duckdb_keywords", "duckdb_schemas", "duckdb_settings", "duckdb_tables", "duckdb_types",
    "duckdb_views", "duckdb_temporary_files", "duckdb_memory", "pragma_table_info", "pragma_show",
    "pragma_version", "pragma_platform", "pragma_database_size", "test_all_types",
})
WRITING_FUNCTIONS = frozenset({"write_log", "json_execute_serialized_sql", "query", "query_table"})
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?(\([^)]*\)\s*)?", re.IGNORECASE)


def one_line(e: BaseException) -> str:
    """DuckDB's error message on one line: the caret and ``LINE n:`` context lines and the advice DuckDB
    appends after a blank line (``Possible solutions: ...``) are dropped."""
    lines = [ln.strip() for ln in str(e).split("\n\n")[0].splitlines()]
    return " ".join(ln for ln in lines if ln and not ln.startswith("LINE ") and set(ln) - set("^ "))


def _refuse(what: str) -> ActsparseError:
    return ActsparseError(f"only SELECT queries are allowed; the store is read-only ({what} refused)")


def _statements(con, text: str) -> list:
    import duckdb

    try:
        return con.extract_statements(text)
    except duckdb.Error as e:
        raise ActsparseError(f"SQL error: {one_line(e)}") from None


def check_read_only(con, query: str) -> None:
    """Refuse anything but one reading SELECT (or ``EXPLAIN [ANALYZE]`` of one), checked on its parse.

    Args:
        con: a DuckDB connection (used to parse; nothing is executed but ``json_serialize_sql``).
        query: the SQL text as given.

    Raises:
        ActsparseError: more than one statement, a statement of another type (named by its own first word),
            a writing node, table function or function anywhere inside it (named), or a SQL syntax error.
    """
    import duckdb

    stmts = _statements(con, query)
    if len(stmts) != 1:
        raise ActsparseError(f"give exactly one SQL statement (got {len(stmts)})")
    kind, text = stmts[0].type, stmts[0].query
    if kind == duckdb.StatementType.EXPLAIN:
        # EXPLAIN ANALYZE executes its statement, so what it explains must pass the same check
        text = _EXPLAIN.sub("", text)
        inner = _statements(con, text)
        kind = inner[0].type if len(inner) == 1 else None
    if kind != duckdb.StatementType.SELECT:
        # the statement's own first word: DuckDB's type names differ (INSTALL is a LOAD statement); a query that
        # reads like a SELECT but is run as several statements (a PIVOT creates a type first) says so
        word = (re.findall(r"[A-Za-z]+", text) or ["this"])[0].upper()
        raise _refuse(f"{word} statement" if word not in ("SELECT", "WITH", "FROM") else
                      f"a query DuckDB runs as a {str(kind).rsplit('.', 1)[-1]} statement")
    try:
        parsed = json.loads(con.execute("SELECT json_serialize_sql(?)", [text]).fetchall()[0][0])
    except (duckdb.Error, ValueError, RecursionError, TypeError):
        parsed = None
    if not isinstance(parsed, dict) or parsed.get("error") is not False:
        raise _refuse("a statement DuckDB cannot serialize for checking")
    _check_tree(parsed)


def _check_tree(tree: object) -> None:
    """Walk a serialized parse tree (iteratively: a deep query must not exhaust Python's stack)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        if isinstance(kind, str) and kind.endswith("_NODE") and kind not in READING_NODES:
            raise _refuse(f"{kind.removesuffix('_NODE').removesuffix('_QUERY').replace('_', ' ')} inside the query")
        if kind == "TABLE_FUNCTION":
            name = _function_name(node.get("function"))
            if name not in READING_TABLE_FUNCTIONS:
                raise _refuse(f"table function {name}()")
        if node.get("class") == "FUNCTION" and _function_name(node) in WRITING_FUNCTIONS:
            raise _refuse(f"function {_function_name(node)}()")
        stack.extend(node.values())


def _function_name(fn: object) -> str:
    name = fn.get("function_name") if isinstance(fn, dict) else None
    return str(name).lower() if name is not None else "?"
