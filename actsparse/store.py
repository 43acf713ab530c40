"""The query layer: DuckDB SQL and Polars over a whole store, local or remote, strictly read-only.

``Store(path_or_url)`` opens a store (any fsspec URL, as :class:`pipeline.reader.StoreReader`) and
defines these tables over all of its complete runs:

==================  ===========================================================================
runs                one row per complete run (``catalogue.parquet``'s schema, from the manifests)
layers              one row per run x site x layer: width, relative depth, and the mean per-token
                    statistics of that layer over non-special tokens (from ``token_stats``)
tokens              every run's token table (``tokens/part-*.parquet``) with a ``run_id`` column
token_stats         one row per run x site x layer x token (``analyze.token_stats``)
curves              ``runs/<id>/analysis/curves-*.parquet``; sparsity/error curves per rule value
critical_sparsity   ``runs/<id>/analysis/critical-*.parquet``; critical sparsity per tolerance
evaluations         ``runs/<id>/analysis/evaluate-*.parquet`` and the store-level
                    ``evaluations/evaluate-*.parquet``; closed-loop evaluations
==================  ===========================================================================

The analysis tables exist (empty, with their documented columns) before any analysis has run.

Read-only, by construction rather than by convention: only single ``SELECT`` statements (and
``EXPLAIN`` of one) are executed; DuckDB's external access is switched off except for the store's own
directory, and the configuration is then locked, so a query can neither write a file (``COPY ... TO``,
``ATTACH``, ``EXPORT``) nor change those settings. Memory is bounded (``memory_limit``, ``threads``)
and DuckDB's spill files go to a private temporary directory outside the store (pitfall P10).

Remote stores: DuckDB's own httpfs is not used; the store's fsspec filesystem is registered with
DuckDB behind a read-only wrapper (protocol ``actsparse://``). File lists of runs never depend on
directory listings: token parts are named by the manifest, derived files come from each run's
``checksums.json`` (or are probed by name); only store-level evaluations need a listing.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path

from actsparse.errors import ActsparseError
from pipeline import store as fmt

TABLES = ("runs", "layers", "tokens", "token_stats", "curves", "critical_sparsity", "evaluations")

# Analysis outputs: table -> (file prefix in runs/<id>/analysis/, documented columns with DuckDB types).
ANALYSIS_TABLES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "curves": ("curves", (
        ("run_id", "VARCHAR"), ("target", "VARCHAR"), ("rule", "VARCHAR"), ("value", "DOUBLE"),
        ("layer", "INTEGER"), ("width", "INTEGER"), ("n_tokens", "BIGINT"), ("sparsity_mean", "DOUBLE"),
        ("sparsity_p10", "DOUBLE"), ("sparsity_p50", "DOUBLE"), ("sparsity_p90", "DOUBLE"),
        ("kept_l1_mean", "DOUBLE"), ("rel_err_mean", "DOUBLE"), ("rel_err_p90", "DOUBLE"), ("cos_mean", "DOUBLE"),
        ("err_vs_input_mean", "DOUBLE"), ("analysis_id", "VARCHAR"))),
    "critical_sparsity": ("critical", (
        ("run_id", "VARCHAR"), ("target", "VARCHAR"), ("rule", "VARCHAR"), ("tolerance", "DOUBLE"),
        ("metric", "VARCHAR"), ("critical_sparsity_grid", "DOUBLE"), ("critical_value_grid", "DOUBLE"),
        ("critical_sparsity_interp", "DOUBLE"), ("analysis_id", "VARCHAR"), ("label", "VARCHAR"))),
    "evaluations": ("evaluate", (
        ("run_id", "VARCHAR"), ("target", "VARCHAR"), ("rule", "VARCHAR"), ("value", "DOUBLE"),
        ("sparsity", "DOUBLE"), ("nll", "DOUBLE"), ("ppl", "DOUBLE"), ("top1_acc", "DOUBLE"), ("kl", "DOUBLE"),
        ("n_tokens", "BIGINT"), ("eval_id", "VARCHAR"))),
}

DEFAULT_MEMORY_LIMIT = "2GB"
_REMOTE = "actsparse"  # protocol of the read-only wrapper a remote store is registered under
_ARROW_TO_DUCKDB = {"string": "VARCHAR", "large_string": "VARCHAR", "int32": "INTEGER", "int64": "BIGINT",
                    "float": "FLOAT", "double": "DOUBLE", "bool": "BOOLEAN"}


def _lit(s: str) -> str:
    """A SQL string literal (paths may hold quotes)."""
    return "'" + s.replace("'", "''") + "'"


def _empty_select(columns) -> str:
    """A zero-row SELECT with typed columns: the view of a table that has no files yet."""
    return "SELECT " + ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in columns) + " LIMIT 0"


def one_line(e: BaseException) -> str:
    """DuckDB's error message on one line: the caret and ``LINE n:`` context lines are dropped."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    return " ".join(ln for ln in lines if ln and not ln.startswith("LINE ") and set(ln) - set("^ "))


def _layer_stats():
    """``[(output column, token_stats column)]`` of the per-layer means in the ``layers`` table."""
    from analyze.token_stats import STAT_COLUMNS

    return [(f"{c}_mean", c) for c in STAT_COLUMNS]


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
                return dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

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

    def __init__(self, path_or_url: str | Path, *, memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int | None = None):
        from pipeline.reader import StoreReader

        self.reader = StoreReader(str(path_or_url))
        self.url = self.reader.url
        self.local = self.reader.is_local
        self.manifests = self.reader.manifests()
        self._files = {t: self._discover(t) for t in ("tokens", "token_stats", *ANALYSIS_TABLES)}
        self._tmp = tempfile.mkdtemp(prefix="actsparse-duckdb-")
        self._con = None
        self._finalizer = weakref.finalize(self, Store._cleanup, self._tmp)
        self._connect(memory_limit, threads)

    # ------------------------------------------------------------ files

    @property
    def run_ids(self) -> list[str]:
        """Ids of the complete runs the tables cover, sorted."""
        return sorted(self.manifests)

    def _location(self, rel: str) -> str:
        """What DuckDB and Polars open for a store-relative path."""
        return self.reader.path(rel) if self.local else f"{_REMOTE}://{rel}"

    def _checksummed(self, rid: str) -> list[str] | None:
        """Files of a run listed in its ``checksums.json`` (run-relative), or None without one."""
        from actsparse.share import CHECKSUMS, parse_checksums

        try:
            raw = self.reader.fs.cat_file(self.reader.path("runs", rid, CHECKSUMS))
        except FileNotFoundError:
            return None
        return sorted(parse_checksums(raw, f"runs/{rid}/{CHECKSUMS}"))

    def _run_files(self, rid: str, pattern: str, expected: list[str]) -> list[str]:
        """Store-relative paths of one run's files matching ``pattern`` (run-relative glob).

        Local: a directory glob. Remote: the run's ``checksums.json`` (every derived file is recorded
        there), else ``expected`` names probed one by one, plus whatever a listing offers.
        """
        base = f"runs/{rid}"
        if self.local:
            root = Path(self.reader.path(base))
            return sorted(f"{base}/{p.relative_to(root).as_posix()}" for p in root.glob(pattern) if p.is_file())
        listed = self._checksummed(rid)
        if listed is not None:
            found = {r for r in listed if fnmatch.fnmatchcase(r, pattern)}
        else:
            found = {r for r in expected if self.reader.fs.exists(self.reader.path(base, r))}
        try:
            globbed = self.reader.fs.glob(self.reader.path(base, pattern))
        except Exception:  # noqa: BLE001 - listings are optional on remote stores (403, no index pages)
            globbed = []
        prefix = self.reader.path(base) + "/"
        # a listing adds files not recorded yet; percent-quoted names (site%3Dgate) are left to the above
        found |= {g[len(prefix):] for g in globbed if g.startswith(prefix) and "%" not in g}
        return [f"{base}/{r}" for r in sorted(found)]

    def _discover(self, table: str) -> dict[str, list[str]]:
        """``{run_id: [store-relative paths]}`` of a file-backed table."""
        out = {}
        for rid, m in sorted(self.manifests.items()):
            n_parts = -(-int(m["n_tokens"]) // int(m["chunk_tokens"]))
            if table == "tokens":
                out[rid] = [f"runs/{rid}/tokens/{fmt.part_name(k)}" for k in range(n_parts)]
            elif table == "token_stats":
                expected = [f"token_stats/site={s}/{fmt.part_name(k)}" for s in m["arrays"] for k in range(n_parts)]
                out[rid] = self._run_files(rid, "token_stats/site=*/part-*.parquet", expected)
            else:
                out[rid] = self._run_files(rid, f"analysis/{ANALYSIS_TABLES[table][0]}-*.parquet", [])
        if table == "evaluations":
            out[""] = self._store_evaluations()
        return out

    def _store_evaluations(self) -> list[str]:
        """Store-level evaluations (``evaluations/evaluate-*.parquet``: models or corpora never collected).

        Remote stores list them only where the server offers directory listings.
        """
        pattern = "evaluations/evaluate-*.parquet"
        if self.local:
            return sorted(p.relative_to(self.reader.root).as_posix() for p in Path(self.reader.root).glob(pattern))
        try:
            found = self.reader.fs.glob(self.reader.path(pattern))
        except Exception:  # noqa: BLE001 - listings are optional on remote stores
            return []
        prefix = self.reader.path("")
        return sorted(f[len(prefix):] for f in found if f.startswith(prefix))

    def files(self, table: str) -> list[str]:
        """Store-relative paths of the Parquet files behind a file-backed table, sorted by run."""
        if table not in self._files:
            raise ActsparseError(f"table {table!r} is not backed by files (file-backed: {', '.join(self._files)})")
        return [p for paths in self._files[table].values() for p in paths]

    # ------------------------------------------------------------ tables

    def runs(self):
        """The ``runs`` table as a polars DataFrame (one row per complete run)."""
        import polars as pl

        return pl.from_arrow(self._runs_arrow())

    def _runs_arrow(self):
        import pyarrow as pa

        return pa.Table.from_pylist([fmt.catalogue_row(m) for _, m in sorted(self.manifests.items())],
                                    schema=fmt.CATALOGUE_SCHEMA())

    def _layer_base_arrow(self):
        """One row per run x site x layer with the shape facts the manifests hold."""
        import pyarrow as pa

        rows = []
        for rid, m in sorted(self.manifests.items()):
            n_layers = int(m["model"]["ffn"]["n_layers"])
            for site, spec in m["arrays"].items():
                for layer in range(n_layers):
                    rows.append(dict(run_id=rid, model=m["config"]["model"], site=site, layer=layer, n_layers=n_layers,
                                     depth=layer / max(n_layers - 1, 1), width=int(spec["width"])))
        schema = pa.schema([("run_id", pa.string()), ("model", pa.string()), ("site", pa.string()),
                            ("layer", pa.int32()), ("n_layers", pa.int32()), ("depth", pa.float64()),
                            ("width", pa.int32())])
        return pa.Table.from_pylist(rows, schema=schema)

    def _view_sql(self, table: str) -> str:
        from analyze.token_stats import TOKEN_STATS_SCHEMA

        def files(paths):
            return "[" + ", ".join(_lit(self._location(p)) for p in paths) + "]"

        if table == "tokens":
            parts = [f"SELECT {_lit(rid)} AS run_id, * FROM read_parquet({files(p)})"
                     for rid, p in self._files["tokens"].items() if p]
            empty = [("run_id", "VARCHAR"), ("token_index", "BIGINT"), ("sequence", "BIGINT"), ("position", "INTEGER"),
                     ("token_id", "INTEGER"), ("token_text", "VARCHAR"), ("document_id", "INTEGER"), ("special", "BOOLEAN")]
            return " UNION ALL ".join(parts) if parts else _empty_select(empty)
        if table == "token_stats":
            paths = self.files("token_stats")
            if not paths:
                return _empty_select((f.name, _ARROW_TO_DUCKDB[str(f.type)]) for f in TOKEN_STATS_SCHEMA())
            # site is a column of every file too, so the site=<site> directories need no hive parsing
            return f"SELECT * FROM read_parquet({files(paths)}, hive_partitioning=false)"
        columns = ANALYSIS_TABLES[table][1]
        paths = self.files(table)
        if not paths:
            return _empty_select(columns)
        # BY NAME against the documented (empty) table: every documented column exists, extra ones are kept
        return f"({_empty_select(columns)}) UNION ALL BY NAME (SELECT * FROM read_parquet({files(paths)}, union_by_name=true))"

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
        for name, arrow in (("runs", self._runs_arrow()), ("_layer_base", self._layer_base_arrow())):
            con.register("_arrow", arrow)
            con.execute(f"CREATE TABLE {name} AS SELECT * FROM _arrow")
            con.unregister("_arrow")
        for table in ("tokens", "token_stats", *ANALYSIS_TABLES):
            con.execute(f"CREATE VIEW {table} AS {self._view_sql(table)}")
        means = ", ".join(f"avg({src}) AS {out}" for out, src in _layer_stats())
        con.execute(f"""CREATE VIEW layers AS
            SELECT b.run_id, b.model, b.site, b.layer, b.n_layers, b.depth, b.width,
                   coalesce(s.n_tokens, 0) AS n_tokens, s.* EXCLUDE (run_id, site, layer, n_tokens)
            FROM _layer_base b LEFT JOIN (
                SELECT run_id, site, layer, count(*) AS n_tokens, {means}
                FROM token_stats WHERE NOT special GROUP BY run_id, site, layer
            ) s USING (run_id, site, layer)""")
        allowed = [self.reader.root.rstrip("/") + "/"] if self.local else [f"{_REMOTE}://"]
        con.execute(f"SET allowed_directories = [{', '.join(map(_lit, allowed))}]")
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
        from queries import get

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
                      for rid, p in self._files["tokens"].items() if p]
            return pl.concat(frames) if frames else self.sql("SELECT * FROM tokens").lazy()
        if table == "token_stats":
            paths = self.files(table)
            return self._scan_files(paths) if paths else self.sql("SELECT * FROM token_stats").lazy()
        if table in ANALYSIS_TABLES:
            empty = self.sql(f"SELECT * FROM {table} LIMIT 0").lazy()
            paths = self.files(table)
            return pl.concat([empty, *(self._scan_files([p]) for p in paths)], how="diagonal_relaxed")
        raise ActsparseError(f"unknown table {table!r} (tables: {', '.join(TABLES)})")

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

        base = pl.from_arrow(self._layer_base_arrow()).lazy()
        stats = (self.scan("token_stats").filter(~pl.col("special")).group_by("run_id", "site", "layer")
                 .agg(pl.len().cast(pl.Int64).alias("n_tokens"),
                      *(pl.col(src).cast(pl.Float64).mean().alias(out) for out, src in _layer_stats())))
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

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r}, runs={len(self.manifests)})"
