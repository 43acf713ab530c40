"""The query layer: DuckDB SQL and Polars over a whole store, local or remote, strictly read-only.

``Store(path_or_url)`` opens a store (any fsspec URL, as :class:`actsparse.pipeline.reader.StoreReader`) and
defines the views of :mod:`actsparse.queries.views` over all of its complete runs: ``runs``, ``layers``,
``tokens``, ``token_stats`` and one per result kind (``curves``, ``critical_sparsity``, ``evaluations``,
``evaluation_layers``, ``evaluation_critical``). The result views exist (empty, with their documented
columns) before any analysis has run. A run whose listed parts are missing is left out of every view, and
said so (:attr:`Store.left_out`), so a damaged run neither breaks the queries of the others nor shrinks
their results silently.

Read-only, by two barriers (docs/pitfalls.md P10, "hostile stores"):

* the statement: exactly one SELECT (or EXPLAIN of one) whose parse holds no write anywhere, nested ones
  included (:mod:`actsparse.queries.guard`);
* the engine: every store, local or remote, is registered with DuckDB behind a read-only filesystem wrapper
  (protocol ``actsparse://``, which refuses to open anything for writing), DuckDB's external access is switched
  off except for that protocol, and the configuration is then locked, so no path DuckDB may touch is writable
  and ``COPY ... TO``, ``ATTACH`` or ``EXPORT`` cannot write a file whatever statement got through. The
  ``runs`` and ``layers`` tables are views over Arrow data, which no statement can change.

Work is bounded: memory (``memory_limit``, ``threads``), spill (``max_spill``: DuckDB's
``max_temp_directory_size``, in a private directory outside the store that is removed on every exit,
:mod:`actsparse.queries.spill`), and a running query stops at Ctrl-C (DuckDB's ``interrupt``).
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import warnings
from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError, Interrupted
from actsparse.core.files import NotRegularFile, open_regular
from actsparse.core.parsing import byte_size
from actsparse.queries import views
from actsparse.queries.guard import check_read_only, one_line
from actsparse.queries.spill import SpillDir

DEFAULT_MEMORY_LIMIT = "2GB"
DEFAULT_MAX_SPILL = "20GB"
MIN_MEMORY = 64 * 2**20  # DuckDB cannot run the views' queries below this
CLOSE_WAIT_S = 30.0
PROTOCOL = "actsparse"  # what DuckDB sees: actsparse://<store-relative path>, through the read-only wrapper


class SharedReader:
    """One read-only file that several DuckDB threads read through a single handle.

    DuckDB's Python filesystem reads a row group by ``seek(location)`` then ``read(n)``, and its Parquet reader
    shares one handle between the threads scanning a file's row groups: on a plain file object the threads'
    seeks and reads interleave, and a query fails with "ZSTD Decompression failure" or garbled metadata (or
    worse, reads wrong bytes) once a file has several row groups. Here each thread has its own position; a
    local file is read with ``os.pread`` (no shared offset), a remote one under a lock.
    """

    def __init__(self, f, size: int):
        self._f, self._size = f, size
        self._lock = threading.Lock()
        self._where = threading.local()
        self._fd = f.fileno() if hasattr(f, "fileno") and not hasattr(f, "fs") else None

    def _pos(self) -> int:
        return getattr(self._where, "pos", 0)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos(), os.SEEK_END: self._size}[whence]
        self._where.pos = max(base + offset, 0)
        return self._where.pos

    def tell(self) -> int:
        return self._pos()

    def read(self, n: int | None = -1) -> bytes:
        pos = self._pos()
        if n is None or n < 0:
            n = max(self._size - pos, 0)
        if self._fd is not None:
            data = os.pread(self._fd, n, pos)
        else:
            with self._lock:
                self._f.seek(pos)
                data = self._f.read(n)
        self._where.pos = pos + len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_only_fs(fs, root: str, local: bool):
    """A read-only fsspec filesystem over ``root`` of ``fs``, for registering with DuckDB.

    DuckDB sees paths ``actsparse://<store-relative path>``; opening one for anything but reading fails, and
    local files are opened as regular files only (a FIFO would block the query forever).
    """
    from fsspec import AbstractFileSystem

    class ReadOnlyStoreFS(AbstractFileSystem):
        protocol = PROTOCOL
        cachable = False  # one instance per Store: never shared through fsspec's instance cache

        def _url(self, path: str) -> str:
            return f"{root}/{str(path).removeprefix(f'{PROTOCOL}://').lstrip('/')}"

        def _open(self, path, mode="rb", **kwargs):
            if mode != "rb":
                raise PermissionError(f"the store is read-only (open {path!r} mode {mode!r} refused)")
            if local:
                try:
                    f = open_regular(self._url(path))
                except NotRegularFile as e:
                    raise PermissionError(f"{path} is {e.what}; a store holds regular files only") from None
                return SharedReader(f, os.fstat(f.fileno()).st_size)
            f = fs.open(self._url(path), "rb")
            return SharedReader(f, f.size)

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
        memory_limit: DuckDB's memory limit (e.g. ``"2GB"``, at least 64MiB); larger results spill to a
            temporary directory outside the store.
        threads: DuckDB worker threads (default: the number of CPUs, at most 4).
        max_spill: the most a query may spill to disk (``"20GB"``); beyond it the query fails.

    Attributes:
        left_out: ``{run id: why}`` of complete runs left out of every view because a part their records list
            is missing or unreadable (``actsparse verify`` names every problem); also given as a warning.
        notes: other things the views leave out (a listed result file that is missing), one line each.

    Raises:
        ActsparseError: not an actsparse store, a newer format, a bad memory or spill limit.
    """

    def __init__(self, path_or_url: str | Path, *, memory_limit: str = DEFAULT_MEMORY_LIMIT,
                 threads: int | None = None, max_spill: str = DEFAULT_MAX_SPILL):
        from actsparse.pipeline.reader import StoreReader

        byte_size(memory_limit, "--memory-limit", MIN_MEMORY)
        byte_size(max_spill, "--max-spill")
        if threads is not None and not 1 <= int(threads) <= 1024:
            raise ActsparseError(f"--threads must be in [1, 1024] (got {threads})")
        self._con = None
        self.reader = StoreReader(str(path_or_url))
        self.url = self.reader.url
        self.local = self.reader.is_local
        found = self.reader.manifests()
        self._files = views.StoreFiles(self.reader, found)
        self.left_out: dict[str, str] = dict(self._files.left_out)
        self.notes: list[str] = list(self._files.notes)
        self.manifests = {rid: m for rid, m in found.items() if rid not in self.left_out}
        for rid, why in self.left_out.items():
            warnings.warn(f"run {rid} left out: {why}", stacklevel=2)
        self._max_spill = max_spill
        self._spill = SpillDir()
        try:
            self._connect(memory_limit, threads, max_spill)
        except BaseException:
            self._spill.remove()
            raise

    @property
    def run_ids(self) -> list[str]:
        """Ids of the complete runs the tables cover, sorted."""
        return sorted(self.manifests)

    def _location(self, rel: str) -> str:
        """What DuckDB opens for a store-relative path: always through the read-only wrapper."""
        return f"{PROTOCOL}://{rel}"

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

    def _connect(self, memory_limit: str, threads: int | None, max_spill: str) -> None:
        import duckdb

        config = dict(memory_limit=str(memory_limit), threads=int(threads or min(4, os.cpu_count() or 1)),
                      temp_directory=self._spill.spill, max_temp_directory_size=str(max_spill),
                      # httpfs cannot be downloaded here, and nothing may be installed behind the user's back
                      autoinstall_known_extensions=False, autoload_known_extensions=False)
        try:
            con = duckdb.connect(":memory:", config=config)
        except duckdb.Error as e:
            raise ActsparseError(f"cannot start DuckDB: {one_line(e)}") from None
        try:
            con.register_filesystem(_read_only_fs(self.reader.fs, self.reader.root, self.local))
            # views over Arrow data: no statement can delete from, insert into or update them
            for name, arrow in (("runs", views.runs_table(self.manifests)),
                                ("_layer_base", views.layer_base_table(self.manifests))):
                con.register(f"_{name}_arrow", arrow)
                con.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}_arrow")
            for view in views.FILE_VIEWS:
                con.execute(f"CREATE VIEW {view} AS {views.file_view_sql(view, self._files, self._location)}")
            con.execute(f"CREATE VIEW layers AS {views.layers_sql()}")
            con.execute(f"SET allowed_directories = [{views.lit(f'{PROTOCOL}://')}]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        except duckdb.Error as e:
            con.close()
            raise ActsparseError(f"cannot open {self.url} for queries: {one_line(e)}") from None
        self._con = con

    # ------------------------------------------------------------ queries

    def arrow(self, query: str, **params):
        """Run one ``SELECT`` like :meth:`sql` and return its rows as a pyarrow Table (never via pandas).

        The query runs on a worker thread while this one waits, so that Ctrl-C (or SIGTERM, which the
        command line turns into the same) interrupts it: DuckDB stops, and nothing it spilled remains.

        Raises:
            ActsparseError: a write or non-SELECT statement, more than one statement, or any DuckDB error
                (message on one line).
            Interrupted: the query was interrupted.
        """
        import duckdb

        if self._con is None:
            raise ActsparseError("the store has been closed")
        check_read_only(self._con, query)
        done: dict = {}

        def run() -> None:
            rel = None
            try:
                rel = self._con.sql(query, params=params or None)
                done["table"] = rel.to_arrow_table()
            except BaseException as e:  # handed to the waiting thread, without the frames that hold `rel`
                done["error"] = e.with_traceback(None)
            finally:
                del rel  # a live relation keeps the connection busy: close() would refuse

        worker = threading.Thread(target=run, name="actsparse-query", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.2)
        except KeyboardInterrupt:
            self._con.interrupt()
            worker.join()
            raise Interrupted("query interrupted; nothing was written") from None
        error = done.get("error")
        if isinstance(error, duckdb.Error):
            if "max_temp_directory_size" in str(error):
                raise ActsparseError(f"SQL error: the query needs more than --max-spill {self._max_spill} of disk "
                                     "to spill its intermediate results; raise --max-spill or --memory-limit") from None
            hint = "; raise --memory-limit" if isinstance(error, duckdb.OutOfMemoryException) else ""
            raise ActsparseError(f"SQL error: {one_line(error)}{hint}") from None
        if error is not None:
            raise error
        return done["table"]

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
            ActsparseError: no run or several runs match, or the run is left out (naming why).
        """
        left = [rid for rid in self.left_out if ref and rid.startswith(str(ref))]
        if left and not [rid for rid in self.run_ids if rid.startswith(str(ref))]:
            raise ActsparseError(f"run {left[0]} is left out of the tables: {self.left_out[left[0]]}")
        return fmt.match_run(ref, self.run_ids)

    def _scan_tokens(self, run_id: str, paths: list[str]):
        """One run's token parts with every column of the tokens view (``views.TOKEN_DEFAULTS`` where its kind has
        none), as the SQL view shows them."""
        import polars as pl

        have = {c for c, _ in fmt.token_columns(self._files.kinds[run_id])}
        schema = pl.from_arrow(fmt.arrow_schema(fmt.ALL_TOKEN_COLUMNS).empty_table()).schema
        missing = [pl.lit(views.TOKEN_DEFAULTS.get(c), dtype=schema[c]).alias(c) for c, _ in fmt.ALL_TOKEN_COLUMNS
                   if c not in have]
        return self._scan_files(paths).with_columns(*missing, run_id=pl.lit(run_id)).select(
            "run_id", *(c for c, _ in fmt.ALL_TOKEN_COLUMNS))

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
            frames = [self._scan_tokens(rid, p) for rid, p in self._files.by_view["tokens"].items() if p]
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
            # the files were checked to be regular when the store was opened (views.StoreFiles)
            return pl.scan_parquet([self.reader.path(p) for p in paths], hive_partitioning=False)
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

    def close(self) -> None:
        """Close the DuckDB connection and remove its spill directory.

        After an interrupt, DuckDB's worker threads finish the interrupted query's tasks in the background and
        the connection refuses to close until they have (``ResourceInUseException``): it is retried for up to
        ``CLOSE_WAIT_S`` seconds.
        """
        import duckdb

        if self._con is not None:
            deadline = time.monotonic() + CLOSE_WAIT_S
            while True:
                try:
                    self._con.close()
                    break
                except duckdb.Error:
                    if time.monotonic() > deadline:
                        break  # the process is ending anyway; its spill directory goes below
                    time.sleep(0.05)
            self._con = None
        self._spill.remove()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r}, runs={len(self.manifests)})"
