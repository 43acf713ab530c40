"""The query layer: DuckDB SQL and Polars over a whole store, local or remote, strictly read-only.

``Store(path_or_url)`` opens a store (any fsspec URL, as :class:`actsparse.pipeline.reader.StoreReader`) and
defines the views of :mod:`actsparse.queries.views` over all of its complete runs: ``runs``, ``layers``,
``tokens``, ``token_stats`` and one per result kind (``curves``, ``critical_sparsity``, ``evaluations``,
``evaluation_layers``, ``evaluation_critical``). The result views exist (empty, with their documented
columns) before any analysis has run.

Read-only, by construction rather than by convention: only single ``SELECT`` statements (and
``EXPLAIN`` of one) are executed; DuckDB's external access is switched off except for the store's own
directory, and the configuration is then locked, so a query can neither write a file (``COPY ... TO``,
``ATTACH``, ``EXPORT``) nor change those settings. Memory is bounded (``memory_limit``, ``threads``)
and DuckDB's spill files go to a private temporary directory outside the store (docs/pitfalls.md P10).

Remote stores: DuckDB's own httpfs is not used; the store's fsspec filesystem is registered with
DuckDB behind a read-only wrapper (protocol ``actsparse://``).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.queries import views

DEFAULT_MEMORY_LIMIT = "2GB"
_REMOTE = "actsparse"  # protocol of the read-only wrapper a remote store is registered under


def one_line(e: BaseException) -> str:
    """DuckDB's error message on one line: the caret and ``LINE n:`` context lines are dropped."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    return " ".join(ln for ln in lines if ln and not ln.startswith("LINE ") and set(ln) - set("^ "))


def _read_only_fs(fs, root: str):
    """A read-only fsspec filesystem over ``root`` of ``fs``, for registering with DuckDB.

    DuckDB sees paths ``actsparse://<store-relative path>``; opening one for anything but reading fails.
    """
    from fsspec import AbstractFileSystem

    class ReadOnlyStoreFS(AbstractFileSystem):
        protocol = _REMOTE
        cachable = False  # one instance per Store: never shared through fsspec's instance cache

        def _url(self, path: str) -> str:
            return f"{root}/{str(path).removeprefix(f'{_REMOTE}://').lstrip('/')}"

        def _open(self, path, mode="rb", **kwargs):
            if mode != "rb":
                raise PermissionError(f"the store is read-only (open {path!r} mode {mode!r} refused)")
            return fs.open(self._url(path), "rb")

        def info(self, path, **kwargs):
            return {**fs.info(self._url(path)), "name": str(path)}

        def modified(self, path):
            try:
                return fs.modified(self._url(path))
            except NotImplementedError:  # HTTP has no modification times; a session never sees changes
                return dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

    return ReadOnlyStoreFS()


class Store:
    """A store opened for queries: DuckDB SQL, named queries and Polars lazy scans.

    Args:
        path_or_url: local directory or fsspec URL of the store root (``http(s)://``, ``s3://`` ...).
        memory_limit: DuckDB's memory limit (e.g. ``"2GB"``); larger results spill to a temporary
            directory outside the store.
        threads: DuckDB worker threads (default: the number of CPUs, at most 4).

    Raises:
        ActsparseError: not an actsparse store, a newer format, or an unreadable manifest.
    """

    def __init__(self, path_or_url: str | Path, *, memory_limit: str = DEFAULT_MEMORY_LIMIT,
                 threads: int | None = None):
        from actsparse.pipeline.reader import StoreReader

        self.reader = StoreReader(str(path_or_url))
        self.url = self.reader.url
        self.local = self.reader.is_local
        self.manifests = self.reader.manifests()
        self._files = views.StoreFiles(self.reader, self.manifests)
        self._tmp = tempfile.mkdtemp(prefix="actsparse-duckdb-")
        self._con = None
        self._finalizer = weakref.finalize(self, Store._cleanup, self._tmp)
        self._connect(memory_limit, threads)

    @property
    def run_ids(self) -> list[str]:
        """Ids of the complete runs the tables cover, sorted."""
        return sorted(self.manifests)

    def _location(self, rel: str) -> str:
        """What DuckDB and Polars open for a store-relative path."""
        return self.reader.path(rel) if self.local else f"{_REMOTE}://{rel}"

    def files(self, table: str) -> list[str]:
        """Store-relative paths of the Parquet files behind a file-backed table, sorted by run.

        Raises:
            ActsparseError: a table that is not backed by files.
        """
        return self._files.paths(table)

    def runs(self):
        """The ``runs`` table as a polars DataFrame (one row per complete run)."""
        import polars as pl

        return pl.from_arrow(views.runs_table(self.manifests))

    def _connect(self, memory_limit: str, threads: int | None) -> None:
        import duckdb

        config = dict(memory_limit=str(memory_limit), threads=int(threads or min(4, os.cpu_count() or 1)),
                      temp_directory=os.path.join(self._tmp, "spill"),
                      # httpfs cannot be downloaded here, and nothing may be installed behind the user's back
                      autoinstall_known_extensions=False, autoload_known_extensions=False)
        try:
            con = duckdb.connect(":memory:", config=config)
        except duckdb.Error as e:
            raise ActsparseError(f"cannot start DuckDB: {one_line(e)}") from None
        if not self.local:
            con.register_filesystem(_read_only_fs(self.reader.fs, self.reader.root))
        for name, arrow in (("runs", views.runs_table(self.manifests)),
                            ("_layer_base", views.layer_base_table(self.manifests))):
            con.register("_arrow", arrow)
            con.execute(f"CREATE TABLE {name} AS SELECT * FROM _arrow")
            con.unregister("_arrow")
        for view in views.FILE_VIEWS:
            con.execute(f"CREATE VIEW {view} AS {views.file_view_sql(view, self._files, self._location)}")
        con.execute(f"CREATE VIEW layers AS {views.layers_sql()}")
        allowed = [self.reader.root.rstrip("/") + "/"] if self.local else [f"{_REMOTE}://"]
        con.execute(f"SET allowed_directories = [{', '.join(map(views.lit, allowed))}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        self._con = con

    # ------------------------------------------------------------ queries

    def _check_read_only(self, query: str) -> None:
        """Refuse anything but one SELECT (or EXPLAIN [ANALYZE] of one): the store is read-only."""
        import duckdb

        def statements(text: str):
            try:
                return self._con.extract_statements(text)
            except duckdb.Error as e:
                raise ActsparseError(f"SQL error: {one_line(e)}") from None

        stmts = statements(query)
        if len(stmts) != 1:
            raise ActsparseError(f"give exactly one SQL statement (got {len(stmts)})")
        kind, text = stmts[0].type, stmts[0].query
        if kind == duckdb.StatementType.EXPLAIN:
            # EXPLAIN ANALYZE executes its statement, so what it explains must be a SELECT too.
            text = re.sub(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?", "", text, flags=re.IGNORECASE)
            inner_stmts = statements(text)
            kind = inner_stmts[0].type if len(inner_stmts) == 1 else None
        if kind != duckdb.StatementType.SELECT:
            # the statement's own first word: DuckDB's type names differ (INSTALL is a LOAD statement)
            what = (re.findall(r"[A-Za-z]+", text) or ["this"])[0].upper()
            raise ActsparseError(f"only SELECT queries are allowed; the store is read-only ({what} statement refused)")

    def arrow(self, query: str, **params):
        """Run one ``SELECT`` like :meth:`sql` and return its rows as a pyarrow Table (never via pandas).

        Raises:
            ActsparseError: a write or non-SELECT statement, more than one statement, or any DuckDB error
                (message on one line).
        """
        import duckdb

        if self._con is None:
            raise ActsparseError("the store has been closed")
        self._check_read_only(query)
        try:
            return self._con.sql(query, params=params or None).to_arrow_table()
        except duckdb.Error as e:
            raise ActsparseError(f"SQL error: {one_line(e)}") from None

    def sql(self, query: str, **params):
        """Run one ``SELECT`` over the store's tables; ``$name`` parameters are bound from ``params``.

        Returns:
            polars DataFrame.

        Raises:
            ActsparseError: as :meth:`arrow`.
        """
        import polars as pl

        return pl.from_arrow(self.arrow(query, **params))

    def query(self, name: str, **params):
        """Run a named query of ``queries/`` (``actsparse query list``); missing parameters take defaults.

        Parameters of type RUN accept a run id or a unique prefix; in a store of one complete run, a
        query's only RUN parameter defaults to that run.

        Raises:
            ActsparseError: unknown query (lists the available ones), a missing required parameter, an
                unknown parameter, a value of the wrong type, or a SQL error.
        """
        from actsparse.queries.named import get

        q = get(name)
        values = q.bind(params, resolve_run=self.resolve_run, only_run=self.only_run)
        return self.sql(q.sql, **values)

    @property
    def only_run(self) -> str | None:
        """The run id of a store holding exactly one complete run, else None."""
        return self.run_ids[0] if len(self.run_ids) == 1 else None

    def resolve_run(self, ref: str) -> str:
        """The complete run id a full id or unique prefix names.

        Raises:
            ActsparseError: no run or several runs match.
        """
        return fmt.match_run(ref, self.run_ids)

    def scan(self, table: str):
        """A polars LazyFrame over one table (file-backed tables are scanned lazily, not loaded).

        Raises:
            ActsparseError: unknown table.
        """
        import polars as pl

        if table == "runs":
            return self.runs().lazy()
        if table == "layers":
            return self._scan_layers()
        if table == "tokens":
            frames = [self._scan_files(p).with_columns(run_id=pl.lit(rid)).select("run_id", pl.exclude("run_id"))
                      for rid, p in self._files.by_view["tokens"].items() if p]
            return pl.concat(frames) if frames else self.sql("SELECT * FROM tokens").lazy()
        if table == "token_stats":
            paths = self.files(table)
            return self._scan_files(paths) if paths else self.sql("SELECT * FROM token_stats").lazy()
        if table in fmt.RESULT_KINDS:
            empty = self.sql(f"SELECT * FROM {table} LIMIT 0").lazy()
            paths = self.files(table)
            return pl.concat([empty, *(self._scan_files([p]) for p in paths)], how="diagonal_relaxed")
        raise ActsparseError(f"unknown table {table!r} (tables: {', '.join(fmt.VIEWS)})")

    def _scan_files(self, paths: list[str]):
        import polars as pl

        if self.local:
            return pl.scan_parquet([self._location(p) for p in paths], hive_partitioning=False)
        import pyarrow.dataset as ds
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        dataset = ds.dataset([self.reader.path(p) for p in paths], format="parquet",
                             filesystem=PyFileSystem(FSSpecHandler(self.reader.fs)))
        return pl.scan_pyarrow_dataset(dataset)

    def _scan_layers(self):
        import polars as pl

        base = pl.from_arrow(views.layer_base_table(self.manifests)).lazy()
        stats = (self.scan("token_stats").filter(~pl.col("special")).group_by("run_id", "site", "layer")
                 .agg(pl.len().cast(pl.Int64).alias("n_tokens"),
                      *(pl.col(c).cast(pl.Float64).mean().alias(f"{c}_mean") for c in fmt.STAT_COLUMNS)))
        return (base.join(stats, on=["run_id", "site", "layer"], how="left")
                .with_columns(pl.col("n_tokens").fill_null(0)))

    # ------------------------------------------------------------ lifetime

    @staticmethod
    def _cleanup(tmp: str) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def close(self) -> None:
        """Close the DuckDB connection and remove its temporary directory."""
        if self._con is not None:
            self._con.close()
            self._con = None
        self._finalizer()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r}, runs={len(self.manifests)})"
