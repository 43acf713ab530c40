"""The SQL views of a store: which Parquet files back each one, and the SQL that defines it.

Views (``actsparse.core.format.VIEWS``): ``runs`` (the manifests' catalogue rows) and ``layers`` (one row per
run x site x layer, with the mean per-token statistics) are built in memory; ``tokens``, ``token_stats`` and
one view per result kind (``actsparse.core.format.RESULT_KINDS``) read the store's Parquet files. Every view
exists with its documented columns before any file of it has been written.

The token and statistics parts of a run are the ones its manifest names (never a directory listing), and a run
with one of them missing is left out of every view and said so (:class:`StoreFiles`). On remote stores, results
come from each run's ``checksums.json`` (or a listing where the server offers one); only store-level
evaluations need a listing.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.checksums import parse_checksums
from actsparse.core.errors import ActsparseError

FILE_VIEWS = ("tokens", "token_stats", *fmt.RESULT_KINDS)


def lit(s: str) -> str:
    """A SQL string literal (paths may hold quotes)."""
    return "'" + s.replace("'", "''") + "'"


def empty_select(columns) -> str:
    """A zero-row SELECT with typed columns: the view of a table that has no files yet."""
    return "SELECT " + ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in columns) + " LIMIT 0"


class StoreFiles:
    """The Parquet files behind each file-backed view of a store's complete runs: ``{view: {run_id: [paths]}}``
    (store-relative paths; store-level evaluations under the run id ``""``).

    A run's token parts and statistics parts are the ones its records name (``ceil(n_tokens / chunk_tokens)``
    parts from the manifest, for every stored site), never what a directory listing happens to show: a
    missing part would otherwise silently shrink every result. A run is left out of every view, with the
    reason in ``left_out``, when one of those parts is missing or is not a regular file (locally; remote stores
    are checked against the run's ``checksums.json``). Statistics are all or nothing: a run that has none of
    them (collected before they existed; ``actsparse index`` adds them) stays in, without rows in
    ``token_stats``.
    """

    def __init__(self, reader, manifests: dict[str, fmt.Manifest]):
        self.reader, self.local = reader, reader.is_local
        self.kinds = {rid: m.kind for rid, m in manifests.items()}  # text | generation | diffusion
        self.left_out: dict[str, str] = {}
        self.notes: list[str] = []
        self._listed = {rid: self._checksummed(rid) for rid in manifests}
        parts = {}
        for rid, m in sorted(manifests.items()):
            try:
                parts[rid] = self._run_parts(rid, m)
            except _Missing as e:
                self.left_out[rid] = str(e)
        self.by_view = {view: self._discover(view, parts) for view in FILE_VIEWS}

    def paths(self, view: str) -> list[str]:
        """Store-relative paths of the files behind a file-backed view, sorted by run.

        Raises:
            ActsparseError: a view that is not backed by files.
        """
        if view not in self.by_view:
            raise ActsparseError(f"table {view!r} is not backed by files (file-backed: {', '.join(self.by_view)})")
        return [p for paths in self.by_view[view].values() for p in paths]

    def _is_file(self, rel: str) -> str | None:
        """None if a store file is a regular file, else what it is (``missing``, ``a FIFO``, ...)."""
        try:
            mode = os.lstat(self.reader.path(rel)).st_mode
        except FileNotFoundError:
            return "missing"
        except OSError as e:
            return f"unreadable ({e.strerror})"
        if stat.S_ISREG(mode):
            return None
        return ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file")

    def _run_parts(self, rid: str, m: fmt.Manifest) -> dict[str, list[str]]:
        """``{"tokens": [...], "token_stats": [...]}``: the store-relative parts a run's records name.

        Raises:
            _Missing: a named part is missing or not a regular file (locally), or not in the run's
                ``checksums.json`` (remote).
        """
        tokens = [fmt.token_part(k) for k in range(m.n_parts)]
        stats = [fmt.stats_part(s, k) for s in m.sites for k in range(m.n_parts)]
        listed = self._listed[rid]
        base = fmt.run_path(rid)
        if self.local:
            any_stats = any(self._is_file(f"{base}/{r}") is None for r in stats) or (
                listed is not None and any(r.startswith(f"{fmt.TOKEN_STATS}/") for r in listed))
            for rel in tokens + (stats if any_stats else []):
                why = self._is_file(f"{base}/{rel}")
                if why is not None:
                    raise _Missing(f"{base}/{rel} is {why} (`actsparse verify` checks the store)")
        elif listed is not None:
            unlisted = [r for r in tokens if r not in listed]
            if unlisted:
                raise _Missing(f"{base}/{unlisted[0]} is not in its {fmt.CHECKSUMS}")
            any_stats = any(r in listed for r in stats)
            if any_stats and (gap := [r for r in stats if r not in listed]):
                raise _Missing(f"{base}/{gap[0]} is not in its {fmt.CHECKSUMS}")
        else:
            any_stats = all(self.reader.fs.exists(self.reader.path(base, r)) for r in stats)
        return {"tokens": [f"{base}/{r}" for r in tokens],
                "token_stats": [f"{base}/{r}" for r in stats] if any_stats else []}

    def _discover(self, view: str, parts: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
        out = {}
        for rid in sorted(parts):
            if view in parts[rid]:
                out[rid] = parts[rid][view]
            else:
                out[rid] = self._run_files(rid, f"{fmt.ANALYSIS}/{fmt.RESULT_KINDS[view].glob}")
        if view in fmt.RESULT_KINDS and fmt.RESULT_KINDS[view].store_level:
            out[""] = self._store_results(fmt.RESULT_KINDS[view])
        return out

    def _checksummed(self, rid: str) -> list[str] | None:
        """Files of a run listed in its ``checksums.json`` (run-relative), or None without a readable one."""
        rel = fmt.run_path(rid, fmt.CHECKSUMS)
        try:
            return sorted(parse_checksums(self.reader.read(rel, fmt.MAX_CHECKSUMS_BYTES, "checksum list"), rel))
        except (FileNotFoundError, ActsparseError):
            return None

    def _run_files(self, rid: str, pattern: str) -> list[str]:
        """Store-relative paths of one run's result files matching ``pattern`` (run-relative glob).

        Local: the regular files a directory glob finds (a result written by a store without checksums
        still counts); a result its ``checksums.json`` lists but that is gone is noted. Remote: the run's
        ``checksums.json``, plus whatever a listing offers.
        """
        base = fmt.run_path(rid)
        # as a directory glob: `*` stays within one folder (evaluate-<id>/value-*.parquet parts are not results)
        listed = {r for r in self._listed[rid] or ()
                  if fnmatch.fnmatchcase(r, pattern) and r.count("/") == pattern.count("/")}
        if self.local:
            root = Path(self.reader.path(base))
            found = {p.relative_to(root).as_posix() for p in root.glob(pattern)}
            regular = {r for r in found if self._is_file(f"{base}/{r}") is None}
            for r in sorted((listed - regular) | (found - regular)):
                self.notes.append(f"{base}/{r} is {self._is_file(f'{base}/{r}')}; left out of the results")
            return [f"{base}/{r}" for r in sorted(regular)]
        try:
            globbed = self.reader.fs.glob(self.reader.path(base, pattern))
        except Exception:  # noqa: BLE001 - listings are optional on remote stores (403, no index pages)
            globbed = []
        prefix = self.reader.path(base) + "/"
        # a listing adds files not recorded yet; percent-quoted names (site%3Dgate) are left to the above
        listed |= {g[len(prefix):] for g in globbed if g.startswith(prefix) and "%" not in g}
        return [f"{base}/{r}" for r in sorted(listed)]

    def _store_results(self, kind: fmt.ResultKind) -> list[str]:
        """Store-level results of a kind (``evaluations/``: models or corpora never collected); remote stores
        list them only where the server offers directory listings."""
        pattern = f"{fmt.result_base(None)}/{kind.glob}"
        if self.local:
            root = Path(self.reader.root)
            found = (p.relative_to(root).as_posix() for p in root.glob(pattern))
            return sorted(rel for rel in found if self._is_file(rel) is None)
        try:
            found = self.reader.fs.glob(self.reader.path(pattern))
        except Exception:  # noqa: BLE001 - listings are optional on remote stores
            return []
        prefix = self.reader.path("")
        return sorted(f[len(prefix):] for f in found if f.startswith(prefix))


class _Missing(Exception):
    """A part a run's records name cannot be read: the run is left out of the views."""


def runs_table(manifests: dict[str, fmt.Manifest]):
    """The ``runs`` view as a pyarrow table: one catalogue row per complete run."""
    import pyarrow as pa

    return pa.Table.from_pylist([m.catalogue_row() for _, m in sorted(manifests.items())],
                                schema=fmt.arrow_schema(fmt.CATALOGUE_COLUMNS))


LAYER_BASE_COLUMNS = fmt.LAYERS_COLUMNS[:7]  # the shape facts of a layer; the statistics come from token_stats


def layer_base_table(manifests: dict[str, fmt.Manifest]):
    """One row per run x site x layer with the shape facts the manifests hold (the base of the ``layers`` view)."""
    import pyarrow as pa

    rows = []
    for rid, m in sorted(manifests.items()):
        for site, spec in m.arrays.items():
            for layer in range(m.n_layers):
                rows.append(dict(run_id=rid, model=m.model_spec, site=site, layer=layer, n_layers=m.n_layers,
                                 depth=layer / max(m.n_layers - 1, 1), width=spec.width))
    return pa.Table.from_pylist(rows, schema=fmt.arrow_schema(LAYER_BASE_COLUMNS))


def layers_sql() -> str:
    """The ``layers`` view over the ``_layer_base`` table and ``token_stats``."""
    means = ", ".join(f"avg({c}) AS {c}_mean" for c in fmt.STAT_COLUMNS)
    return f"""SELECT b.run_id, b.model, b.site, b.layer, b.n_layers, b.depth, b.width,
               coalesce(s.n_tokens, 0) AS n_tokens, s.* EXCLUDE (run_id, site, layer, n_tokens)
        FROM _layer_base b LEFT JOIN (
            SELECT run_id, site, layer, count(*) AS n_tokens, {means}
            FROM token_stats WHERE NOT special GROUP BY run_id, site, layer
        ) s USING (run_id, site, layer)"""


TOKENS_VIEW_COLUMNS = (("run_id", "VARCHAR"), *fmt.ALL_TOKEN_COLUMNS)
# What the tokens view shows where a run's token parts lack a column: a run of text is all prefill at step 0
# (docs/paper-notes.md §1.4: a single forward pass counts as prefill); the diffusion columns are null elsewhere.
TOKEN_DEFAULTS = {"phase": "prefill", "step": 0}


def _token_select(kind: str) -> str:
    """The columns of the tokens view from the token parts of a run of ``kind``, in ``ALL_TOKEN_COLUMNS`` order."""
    have = {c for c, _ in fmt.token_columns(kind)}

    def default(c: str) -> str:
        v = TOKEN_DEFAULTS.get(c)
        return "NULL" if v is None else lit(v) if isinstance(v, str) else str(v)

    return ", ".join(c if c in have else f"CAST({default(c)} AS {t}) AS {c}" for c, t in fmt.ALL_TOKEN_COLUMNS)


def file_view_sql(view: str, files: StoreFiles, location) -> str:
    """The SQL of a file-backed view; ``location(rel)`` is what DuckDB opens for a store-relative path."""

    def listed(paths):
        return "[" + ", ".join(lit(location(p)) for p in paths) + "]"

    if view == "tokens":
        parts = [f"SELECT {lit(rid)} AS run_id, {_token_select(files.kinds[rid])} FROM read_parquet({listed(p)})"
                 for rid, p in files.by_view["tokens"].items() if p]
        return " UNION ALL ".join(parts) if parts else empty_select(TOKENS_VIEW_COLUMNS)
    paths = files.paths(view)
    if view == "token_stats":
        if not paths:
            return empty_select(fmt.TOKEN_STATS_COLUMNS)
        # site is a column of every file too, so the site=<site> directories need no hive parsing
        return f"SELECT * FROM read_parquet({listed(paths)}, hive_partitioning=false)"
    columns = fmt.RESULT_KINDS[view].columns
    if not paths:
        return empty_select(columns)
    # BY NAME against the documented (empty) table: every documented column exists, extra ones are kept
    return (f"({empty_select(columns)}) UNION ALL BY NAME "
            f"(SELECT * FROM read_parquet({listed(paths)}, union_by_name=true))")
