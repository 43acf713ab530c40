"""The read-only check on DuckDB's parse of a query (``actsparse.queries.guard``): every statement form that could
write is refused wherever it hides, and reading queries pass. No store is needed: the check only parses."""

from __future__ import annotations

import duckdb
import pytest

from actsparse.core.errors import ActsparseError
from actsparse.queries.guard import check_read_only, one_line


@pytest.fixture(scope="module")
def con():
    c = duckdb.connect(":memory:")
    c.execute("CREATE TABLE runs AS SELECT 1 AS a")
    yield c
    c.close()


READS = [
    "SELECT * FROM runs",
    "WITH x AS (SELECT a FROM runs) SELECT * FROM x",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
    "SELECT a FROM runs UNION ALL SELECT a FROM runs",
    "SELECT * FROM range(3), generate_series(1, 2)",
    "SELECT * FROM read_parquet('actsparse://runs/x/tokens/part-000000.parquet')",
    "SELECT (SELECT max(a) FROM runs) AS m, list_sum([1, 2]) AS s",
    "EXPLAIN SELECT * FROM runs",
    "EXPLAIN ANALYZE SELECT * FROM runs",
    "SELECT * FROM runs WHERE a = $run",
    "FROM runs",
    "SUMMARIZE runs",
    "DESCRIBE runs",
    "SELECT * FROM duckdb_settings() WHERE name = 'memory_limit'",
]

WRITES = [
    # the examples: a write inside a CTE has statement type SELECT
    ("WITH x AS (COPY (SELECT 'x' AS a) TO '/tmp/m.json' (FORMAT csv)) SELECT * FROM x", "COPY inside the query"),
    ("WITH d AS (DELETE FROM runs RETURNING *) SELECT * FROM d", "DELETE inside the query"),
    ("WITH i AS (INSERT INTO runs VALUES (2) RETURNING *) SELECT * FROM i", "INSERT inside the query"),
    ("WITH u AS (UPDATE runs SET a = 2 RETURNING *) SELECT * FROM u", "UPDATE inside the query"),
    ("SELECT * FROM (WITH d AS (DELETE FROM runs RETURNING *) SELECT * FROM d)", "DELETE inside the query"),
    ("SELECT (WITH d AS (DELETE FROM runs RETURNING a) SELECT count(*) FROM d) AS n", "DELETE inside the query"),
    ("SELECT * FROM runs UNION ALL (WITH d AS (DELETE FROM runs RETURNING *) SELECT * FROM d)",
     "DELETE inside the query"),
    # SQL text run by a table function is never seen by the check
    ("SELECT * FROM query('COPY (SELECT 1) TO ''/tmp/q.csv''')", "table function query()"),
    ("SELECT * FROM query_table('runs')", "table function query_table()"),
    ("SELECT * FROM json_execute_serialized_sql('{}')", "table function json_execute_serialized_sql()"),
    ("SELECT * FROM enable_logging()", "table function enable_logging()"),
    ("SELECT * FROM checkpoint()", "table function checkpoint()"),
    ("SELECT write_log('x')", "function write_log()"),
    # statements of another type, EXPLAIN ANALYZE of one included
    ("COPY runs TO '/tmp/x.csv'", "COPY statement"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '/tmp/y.csv'", "COPY statement"),
    ("EXPLAIN ANALYZE WITH d AS (DELETE FROM runs RETURNING *) SELECT * FROM d", "DELETE inside the query"),
    ("EXPLAIN (FORMAT json) DELETE FROM runs", "DELETE statement"),
    ("PREPARE p AS DELETE FROM runs", "PREPARE statement"),
    ("EXECUTE p", "EXECUTE statement"),
    ("CREATE OR REPLACE VIEW runs AS SELECT 2 AS a", "CREATE statement"),
    ("ATTACH '/tmp/x.duckdb' AS x", "ATTACH statement"),
    ("SET VARIABLE v = 1", "SET statement"),
    ("CALL checkpoint()", "CALL statement"),
    ("INSTALL httpfs", "INSTALL statement"),
    ("SELECT * FROM (PIVOT runs ON a)", "a query DuckDB runs as a MULTI statement"),
]


@pytest.mark.parametrize("query", READS)
def test_reading_queries_pass(con, query):
    check_read_only(con, query)


@pytest.mark.parametrize("query, what", WRITES)
def test_every_write_form_is_refused_by_name(con, query, what):
    with pytest.raises(ActsparseError, match=r"^only SELECT queries are allowed; the store is read-only \((.+)\)$") as e:
        check_read_only(con, query)
    assert f"({what} refused)" in str(e.value)
    assert con.sql("SELECT count(*) FROM runs").fetchall() == [(1,)]  # nothing ran


def test_more_than_one_statement_and_syntax_errors(con):
    with pytest.raises(ActsparseError, match="exactly one SQL statement \\(got 2\\)"):
        check_read_only(con, "SELECT 1; COPY runs TO '/tmp/z.csv'")
    with pytest.raises(ActsparseError, match="^SQL error: Parser Error"):
        check_read_only(con, "SELEC 1")


def test_duckdb_messages_are_one_line():
    e = duckdb.OutOfMemoryException("Out of Memory Error: failed to allocate 512 KiB\n\nPossible solutions:\n* more")
    assert one_line(e) == "Out of Memory Error: failed to allocate 512 KiB"
    e = duckdb.ParserException('Parser Error: syntax error at or near "SELEC"\n\nLINE 1: SELEC 1\n        ^')
    assert one_line(e) == 'Parser Error: syntax error at or near "SELEC"'
