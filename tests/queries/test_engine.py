"""The query layer (``actsparse.queries.engine``): the views over every run, Polars scans, read-only stores,
remote stores, refused writes and the CLI's output formats."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from actsparse.core import format as fmt
from actsparse.core.checksums import update_checksums
from actsparse.core.errors import ActsparseError
from actsparse.core.format import TOPP_VALUES
from actsparse.pipeline.reader import StoreReader
from actsparse.queries import Store
from actsparse.queries.named import get, load
from tests.helpers import run_cli, tmpfs

SITES = ("input", "gate", "intermediate")


@pytest.fixture
def store(two_model_store):
    return two_model_store


def _tree_digest(root: Path) -> str:
    """One hash over every path and file content under root (lock files included)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _all_queries(st: Store, a: str, b: str) -> dict[str, pl.DataFrame]:
    """Every named query, with its RUN parameters set (compare_runs gets both runs)."""
    out = {}
    for name, q in load().items():
        runs = [p.name for p in q.params if p.type == "RUN"]
        out[name] = st.query(name, **dict(zip(runs, (a, b))))
    return out


def _with_analysis(src: Path, dst: Path, rid: str) -> Path:
    """A copy of the store with one analysis file of each kind for run ``rid`` (documented columns),
    recorded in the run's checksums as the analysis writer does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(src, dst)
    adir = dst / "runs" / rid / "analysis"
    adir.mkdir()
    grid = [0.5, 0.9, 0.99]
    curves = dict(run_id=[rid] * 3, target=["intermediate"] * 3, rule=["top-p"] * 3, value=grid, layer=[-1] * 3,
                  width=[64] * 3, n_tokens=[580] * 3, sparsity_mean=[0.8, 0.5, 0.1], sparsity_p10=[0.7, 0.4, 0.05],
                  sparsity_p50=[0.8, 0.5, 0.1], sparsity_p90=[0.9, 0.6, 0.2], kept_l1_mean=grid,
                  rel_err_mean=[0.3, 0.1, 0.01], rel_err_p90=[0.4, 0.2, 0.02], cos_mean=[0.9, 0.99, 1.0],
                  err_vs_input_mean=[0.2, 0.1, 0.0], analysis_id=["a1"] * 3)
    critical = dict(run_id=[rid] * 2, target=["intermediate"] * 2, rule=["top-p"] * 2, tolerance=[0.01, 0.05],
                    metric=["rel_err"] * 2, critical_sparsity_grid=[0.1, 0.5], critical_value_grid=[0.99, 0.9],
                    critical_sparsity_interp=[0.12, 0.52], analysis_id=["a1"] * 2, label=["open-loop"] * 2)
    evaluate = dict(run_id=[rid], target=["intermediate"], rule=["top-p"], value=[0.9], sparsity=[0.5], nll=[3.2],
                    ppl=[24.5], top1_acc=[0.3], kl=[0.05], n_tokens=[580], eval_id=["e1"])
    written = []
    for prefix, cols in (("curves", curves), ("critical", critical), ("evaluate", evaluate)):
        path = adir / f"{prefix}-0123456789abcdef.parquet"
        pq.write_table(pa.table(cols), path)
        written.append(path)
    assert update_checksums(dst / "runs" / rid, written)
    # a store-level evaluation (a model that was never collected): no run, so run_id is null
    (dst / "evaluations").mkdir()
    pq.write_table(pa.table({**evaluate, "run_id": pa.array([None], pa.string()), "ppl": [30.0]}),
                   dst / "evaluations" / "evaluate-fedcba9876543210.parquet")
    return dst


# ---------------------------------------------------------------------------------------------
# tables and named queries


def test_tables_cover_every_run_of_every_model(store):
    path, a, b = store
    with Store(path) as st:
        runs = st.runs()
        assert sorted(runs["run_id"]) == sorted([a, b]) and runs["architecture"].n_unique() == 2
        layers = st.sql("SELECT run_id, site, count(*) AS n, min(width) AS w, sum(n_tokens) AS t FROM layers "
                        "GROUP BY ALL ORDER BY ALL")
        want = []
        for rid in sorted([a, b]):
            m = st.manifests[rid]
            for site in sorted(SITES):
                ffn = m.ffn
                specials = int(StoreReader(str(path)).run(rid).special_mask().sum())
                want.append((rid, site, ffn.n_layers, m.arrays[site].width, ffn.n_layers * (m.n_tokens - specials)))
        assert layers.rows() == want
        # one query across both models
        both = st.sql("SELECT r.architecture, avg(t.sparsity_p90) AS s FROM token_stats t JOIN runs r USING (run_id) "
                      "WHERE NOT t.special GROUP BY ALL ORDER BY ALL")
        assert both.height == 2 and both["s"].is_between(0, 1).all()
        assert st.sql("SELECT run_id, count(*) AS n FROM tokens GROUP BY ALL ORDER BY ALL").rows() == \
            sorted([(a, 600), (b, 300)])
        for table, kind in fmt.RESULT_KINDS.items():
            empty = st.sql(f"SELECT * FROM {table}")
            assert empty.height == 0 and empty.columns == [c for c, _ in kind.columns]


# Named queries over results this store has none of (each is tested with rows where its results are made:
# tests/analyze/test_moe_curves.py, test_deploy.py, tasks/, test_steps.py and test_named.py).
EMPTY_HERE = {"critical_sparsity": "no curves", "expert_profile": "no mixture-of-experts run",
              "neuron_extremes": "no deployment result", "task_critical_sparsity": "no task evaluation",
              "mask_stability": "no diffusion run", "size_scaling": "no critical sparsity to plot",
              "sparsity_by_step": "no per-step analysis"}


def test_every_named_query_runs(store, tmp_path):
    path, a, b = store
    with Store(path) as st:
        results = _all_queries(st, a, b)
    for name, df in results.items():
        declared = get(name).columns
        assert all(c in declared for c in df.columns if not c.endswith("_mean")), (name, df.columns)
        assert df.height > 0 or name in EMPTY_HERE, name
    curve = results["sparsity_curve"]
    assert curve["source"].unique().to_list() == ["token_stats"] and curve["value"].to_list() == list(TOPP_VALUES)
    assert curve["sparsity_mean"].is_sorted(descending=True)
    ext = results["extreme_tokens"]
    assert ext.filter(kind="most sparse")["sparsity"].min() >= ext.filter(kind="least sparse")["sparsity"].max()
    assert all(f"[{t}]" in c for t, c in zip(ext["token"], ext["context"]))
    assert results["compare_runs"].height == 3  # llama has 3 layers, gpt2 has 2: a full outer join
    assert results["special_tokens"]["n_special"].min() > 0

    with Store(_with_analysis(path, tmp_path / "A", a)) as st:
        curve = st.query("sparsity_curve", run=a)
        crit = st.query("critical_sparsity", tolerance=0.05)
        ev = st.sql("SELECT * FROM evaluations ORDER BY ppl")
    assert curve["source"].unique().to_list() == ["curves"] and curve["value"].to_list() == [0.5, 0.9, 0.99]
    assert crit["critical_sparsity_interp"].to_list() == [0.52] and crit["label"].to_list() == ["open-loop"]
    assert crit["model_name"].to_list() == [st.manifests[a].model.name] and ev["ppl"].to_list() == [24.5, 30.0]
    assert ev["run_id"].to_list() == [a, None]


def test_sparsity_curve_reads_one_analysis_and_the_site_of_the_target(store, tmp_path):
    path, a, b = store
    dst = _with_analysis(path, tmp_path / "A", a)
    adir = dst / "runs" / a / "analysis"
    # a second analysis of the same run, target and rule with fewer grid values
    other = pl.read_parquet(adir / "curves-0123456789abcdef.parquet").head(2).with_columns(
        analysis_id=pl.lit("b2"), n_tokens=pl.lit(900, pl.Int64))
    other.write_parquet(adir / "curves-fedcba9876543210.parquet")
    update_checksums(dst / "runs" / a, [adir / "curves-fedcba9876543210.parquet"])
    with Store(dst) as st:
        chosen = st.query("sparsity_curve", run=a)  # never rows of two analyses mixed
        named = st.query("sparsity_curve", run=a, analysis="b")
        sites = set(st.sql("SELECT DISTINCT site FROM token_stats WHERE run_id = $r", r=a)["site"])
        gate = st.query("sparsity_curve", run=a, target="gate")
    assert chosen["analysis_id"].unique().to_list() == ["a1"] and chosen.height == 3
    assert named["analysis_id"].unique().to_list() == ["b2"] and named["n_tokens"].to_list() == [900, 900]
    # the gate target is the activation output: token_stats of the site act, never the pre-activation gate
    assert "gate" in sites and (gate.height == 0) == ("act" not in sites)


def test_one_damaged_manifest_leaves_the_other_runs_readable(store, tmp_path):
    path, a, b = store
    dst = tmp_path / "S"
    shutil.copytree(path, dst)
    (dst / "runs" / "deadbeefdeadbeef").mkdir()
    (dst / "runs" / "deadbeefdeadbeef" / "manifest.json").write_text("{not json")
    with Store(dst) as st:
        assert sorted(st.sql("SELECT run_id FROM runs")["run_id"]) == sorted([a, b])
    narrow, wide = run_cli("runs", str(dst), env={"COLUMNS": "80"}), run_cli("runs", str(dst), env={"COLUMNS": "400"})
    assert narrow.returncode == wide.returncode == 0, narrow.stderr
    assert all(i in narrow.stdout for i in (a, b, "deadbeefdeadbeef"))  # whole ids, even 80 columns wide
    assert "damaged: manifest is not valid JSON" in wide.stdout
    with pytest.raises(ActsparseError, match="manifest is not valid JSON"):
        StoreReader(str(dst)).run("deadbeef")


def test_polars_scans_match_sql(store):
    path, a, b = store
    with Store(path) as st:
        for table in ("runs", "tokens", "token_stats", "layers", "curves"):
            sql = st.sql(f"SELECT * FROM {table}")
            lazy = st.scan(table)
            assert isinstance(lazy, pl.LazyFrame)
            scanned = lazy.collect()
            assert scanned.columns == sql.columns, table
            keys = [c for c in ("run_id", "site", "layer", "token_index") if c in sql.columns]
            if keys:
                left, right = scanned.sort(keys), sql.sort(keys)
                assert left.equals(right.cast(left.schema)), table
        with pytest.raises(ActsparseError, match="unknown table"):
            st.scan("nope")


# ---------------------------------------------------------------------------------------------
# portability and read-only guarantees


def test_copied_and_read_only_stores_answer_identically(store, tmp_path):
    path, a, b = store
    with Store(path) as st:
        ref = _all_queries(st, a, b)
    moved = Path(shutil.copytree(path, tmp_path / "elsewhere" / "S2"))
    with Store(moved) as st:
        assert all(df.equals(ref[n]) for n, df in _all_queries(st, a, b).items())
    with tmpfs(tmp_path / "ro", size="64m") as ro:
        shutil.copytree(path, ro / "S")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with Store(ro / "S") as st:
            assert all(df.equals(ref[n]) for n, df in _all_queries(st, a, b).items())
        r = run_cli("query", "layer_profile", str(ro / "S"), "--param", f"run={a}", "--format", "csv")
        assert r.returncode == 0 and r.stdout.count("\n") == 4


@pytest.mark.slow
def test_remote_http_store_answers_identically(store, tmp_path, serve):  # noqa: F811
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp (pip install 'actsparse[http]')")
    path, a, b = store
    local = _with_analysis(path, tmp_path / "H" / "S", a)
    with Store(local) as st:
        ref = _all_queries(st, a, b) | {"crit": st.query("critical_sparsity")}
        stats = st.sql("SELECT * FROM token_stats ORDER BY run_id, site, layer, token_index")
    url = serve(local.parent) + "/S/"
    with Store(url) as st:
        got = _all_queries(st, a, b) | {"crit": st.query("critical_sparsity")}
        assert all(df.equals(ref[n]) for n, df in got.items())
        assert st.sql("SELECT * FROM token_stats ORDER BY run_id, site, layer, token_index").equals(stats)
        assert st.scan("token_stats").select(pl.len()).collect().item() == stats.height
        with pytest.raises(ActsparseError, match="read-only"):
            st.sql("COPY (SELECT 1) TO 'actsparse://runs/x.csv'")


WRITES = [
    "COPY (SELECT * FROM runs) TO '{store}/runs/x.parquet'",
    "COPY runs TO '{store}/x.csv'",
    "CREATE TABLE t AS SELECT 1",
    "INSERT INTO runs SELECT * FROM runs",
    "ATTACH '{store}/x.duckdb' AS x",
    "EXPORT DATABASE '{store}/export'",
    "SET enable_external_access = true",
    "PRAGMA enable_profiling",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{store}/y.csv'",
    "SELECT 1; COPY (SELECT 1) TO '{store}/z.csv'",
    "SELECT * FROM query('COPY (SELECT 1) TO ''{store}/w.csv''')",
]


@pytest.mark.parametrize("statement", WRITES)
def test_writes_are_refused_and_leave_the_store_unchanged(store, tmp_path, statement):
    path = Path(shutil.copytree(store[0], tmp_path / "W"))
    before = _tree_digest(path)
    sql = statement.format(store=path)
    with Store(path) as st, pytest.raises(ActsparseError):
        st.sql(sql)
    r = run_cli("sql", str(path), sql)
    assert r.returncode != 0 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    assert _tree_digest(path) == before


def test_a_refused_statement_is_named_by_its_own_keyword(store):
    with Store(store[0]) as st:
        for sql, word in (("INSTALL httpfs", "INSTALL"), ("EXPLAIN ANALYZE DELETE FROM runs", "DELETE"),
                          ("  pragma enable_profiling", "PRAGMA")):
            with pytest.raises(ActsparseError, match=f"read-only \\({word} statement refused\\)"):
                st.sql(sql)


def test_an_empty_named_query_says_what_the_run_holds(store):
    path, a, _ = store
    r = run_cli("query", "layer_profile", str(path), "--param", f"run={a}", "--param", "site=act")
    assert r.returncode == 0 and "(0 rows)" in r.stdout
    m = StoreReader(str(path)).manifest(a)
    assert r.stderr.strip() == (f"note: no rows; run {a} holds sites {', '.join(m.sites)} "
                                f"and layers 0-{m.n_layers - 1}")
    assert "act" not in m.arrays
    full = run_cli("query", "layer_profile", str(path), "--param", f"run={a}", "--param", "site=gate")
    assert full.returncode == 0 and full.stderr == ""


@pytest.mark.slow
def test_cli_formats_errors_and_out_file(store, tmp_path):
    path, a, _ = store
    with Store(path) as st:
        ref = st.sql("SELECT run_id, model_name, sites, n_tokens FROM runs ORDER BY run_id")
    query = "SELECT run_id, model_name, sites, n_tokens FROM runs ORDER BY run_id"
    csv = run_cli("sql", str(path), query, "--format", "csv")
    assert csv.returncode == 0 and csv.stdout.splitlines()[0] == "run_id,model_name,sites,n_tokens"
    assert csv.stdout.splitlines()[1].endswith('"input,gate,intermediate",' + str(ref["n_tokens"][0]))
    js = run_cli("sql", str(path), query, "--format", "json")
    assert json.loads(js.stdout) == ref.to_dicts()
    pq_out = tmp_path / "r.parquet"
    run_cli("sql", str(path), query, "--format", "parquet", "--out", str(pq_out))
    assert pl.read_parquet(pq_out).equals(ref)
    table = run_cli("query", "layer_profile", str(path), "-p", f"run={a}", "-p", "site=gate")
    assert table.returncode == 0 and "| layer |" in table.stdout and "(3 rows)" in table.stdout

    errors = {
        ("sql", str(path), "SELEC 1"): "SQL error: Parser Error",
        ("sql", str(path), "SELECT * FROM nope"): "Table with name nope does not exist",
        ("sql", str(path), "SELECT 1", "--format", "parquet"): "--format parquet needs --out",
        ("sql", str(path), "SELECT 1", "--format", "csv", "--out", str(path / "x.csv")): "inside the store",
        ("query", "nope", str(path)): "unknown query 'nope'; available: compare_runs",
        ("query", "compare_runs", str(path), "-p", f"run_a={a}"): "needs parameter run_b",
        ("query", "layer_profile", str(path), "-p", "run"): "--param takes NAME=VALUE",
        ("query", "layer_profile"): "needs a STORE",
        ("sql", str(tmp_path), "SELECT 1"): "is not an actsparse store",
    }
    for args, message in errors.items():
        r = run_cli(*args)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (args, r.stderr)
        assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1 and message in r.stderr, (args, r.stderr)
    assert not (path / "x.csv").exists()
    listing = run_cli("query", "list")
    assert listing.returncode == 0 and all(name in listing.stdout for name in load())


def test_api_exported_lazily():
    code = ("import sys, actsparse; assert 'duckdb' not in sys.modules; "
            "from actsparse import Store; import actsparse.queries.engine as m; assert Store is m.Store; "
            "assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# hostile queries and damaged stores (issue: "Hostile stores, archives and queries")


def _one_line(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr and all(w in lines[0] for w in words), r.stderr


def test_a_write_inside_a_cte_is_refused_and_the_store_is_unchanged(store, tmp_path):
    """The issue's examples: `WITH x AS (COPY ... TO '<manifest>') SELECT * FROM x` overwrote a manifest (exit 0),
    and `WITH d AS (DELETE FROM runs RETURNING *) SELECT * FROM d` emptied `runs` for the Store's lifetime."""
    path = Path(shutil.copytree(store[0], tmp_path / "W"))
    a = store[1]
    before = _tree_digest(path)
    for target in (f"{path}/runs/{a}/manifest.json", f"actsparse://runs/{a}/manifest.json"):
        _one_line(run_cli("sql", str(path), f"WITH x AS (COPY (SELECT 'x' AS a) TO '{target}' (FORMAT csv)) "
                                            "SELECT * FROM x"), "read-only (COPY inside the query refused)")
    with Store(path) as st:
        n = st.sql("SELECT count(*) AS n FROM runs")["n"][0]
        with pytest.raises(ActsparseError, match=r"read-only \(DELETE inside the query refused\)"):
            st.sql("WITH d AS (DELETE FROM runs RETURNING *) SELECT * FROM d")
        assert st.sql("SELECT count(*) AS n FROM runs")["n"][0] == n == 2
    assert _tree_digest(path) == before


def test_the_engine_itself_writes_nothing_whatever_statement_reaches_it(store, tmp_path):
    """The second barrier, tried past the statement check: no path DuckDB may touch is writable, the tables are
    views over Arrow data, and the configuration is locked."""
    import duckdb

    path = Path(shutil.copytree(store[0], tmp_path / "W"))
    before = _tree_digest(path)
    with Store(path) as st:
        for sql in (f"COPY (SELECT 1 AS a) TO '{path}/runs/x.csv'", "COPY (SELECT 1 AS a) TO 'actsparse://runs/y.csv'",
                    f"COPY (SELECT 1 AS a) TO '{tmp_path}/outside.csv'", f"ATTACH '{path}/x.duckdb' AS x",
                    "DELETE FROM runs", "INSERT INTO runs SELECT * FROM runs", "UPDATE _runs_arrow SET n_tokens = 0",
                    "WITH d AS (DELETE FROM runs RETURNING *) SELECT * FROM d",
                    "SET allowed_directories = ['/']", "SET enable_external_access = true"):
            with pytest.raises(duckdb.Error):
                st._con.sql(sql).fetchall()
        assert st.sql("SELECT count(*) AS n FROM runs")["n"][0] == 2
        assert st.sql("SELECT count(*) AS n FROM tokens")["n"][0] == 900  # reads go through the wrapper
    assert _tree_digest(path) == before and not (tmp_path / "outside.csv").exists()


@pytest.mark.slow
def test_a_missing_part_leaves_its_run_out_and_says_so(store, tmp_path):
    """A missing tokens part made `sql` and `query` fail with a 47-line traceback, even for the intact runs; a
    missing token_stats part silently shrank every result."""
    path, a, b = store
    dst = Path(shutil.copytree(path, tmp_path / "D"))
    with Store(path) as st:
        stats_a = st.sql("SELECT count(*) AS n FROM token_stats WHERE run_id = $r", r=a)["n"][0]
    stats = f"runs/{b}/token_stats/site=gate/{fmt.part_name(1)}"
    (dst / stats).unlink()
    note_b = f"note: run {b} left out: {stats} is missing (`actsparse verify` checks the store)"
    r = run_cli("sql", str(dst), "SELECT run_id, count(*) AS n FROM token_stats GROUP BY ALL", "--format", "csv")
    assert r.returncode == 0 and r.stderr.splitlines() == [note_b], r.stderr
    assert r.stdout.splitlines() == ["run_id,n", f"{a},{stats_a}"]  # the intact run, whole
    r = run_cli("query", "layer_profile", str(dst), "-p", f"run={a}", "-p", "site=gate")
    assert r.returncode == 0 and r.stderr.splitlines() == [note_b] and "(3 rows)" in r.stdout, r.stderr
    with pytest.warns(UserWarning, match=f"run {b} left out"), Store(dst) as st:
        assert st.run_ids == [a] and st.left_out.keys() == {b}
        assert st.sql("SELECT count(*) AS n FROM token_stats")["n"][0] == stats_a  # nothing silently shrunk
        assert st.sql("SELECT list(run_id) AS r FROM runs")["r"][0].to_list() == [a]
    tokens = f"runs/{a}/tokens/{fmt.part_name(2)}"
    (dst / tokens).unlink()
    r = run_cli("query", "layer_profile", str(dst), "-p", f"run={a}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and sorted(lines[:2]) == sorted([
        f"note: run {a} left out: {tokens} is missing (`actsparse verify` checks the store)", note_b]), r.stderr
    assert lines[2:] == [f"error: run {a} is left out of the tables: {tokens} is missing (`actsparse verify` "
                         "checks the store)"]


def test_a_fifo_or_a_huge_manifest_ends_at_once(store, tmp_path):
    """A FIFO in place of a store file blocked readers forever; a manifest with a 400-digit n_tokens made `sql`
    loop with memory growing ~270 MB/s."""
    import os

    path, a, b = store
    dst = Path(shutil.copytree(path, tmp_path / "F"))
    part = dst / "runs" / a / "tokens" / fmt.part_name(0)
    part.unlink()
    os.mkfifo(part)
    m = json.loads((dst / "runs" / b / "manifest.json").read_text())
    (dst / "runs" / b / "manifest.json").write_text(json.dumps(m | {"n_tokens": 10**400}))
    r = run_cli("sql", str(dst), "SELECT count(*) AS n FROM runs", timeout=60)
    assert r.returncode == 0 and "(1 row)" in r.stdout and "| 0 " in r.stdout, r.stdout + r.stderr
    assert f"note: run {a} left out: runs/{a}/tokens/{fmt.part_name(0)} is a FIFO" in r.stderr


def test_limits_and_parameters_that_make_no_sense_are_one_line(store, tmp_path):
    path, a, _ = store
    _one_line(run_cli("sql", str(path), "SELECT 1", "--memory-limit", "1KB"), "--memory-limit 1KB is below")
    _one_line(run_cli("sql", str(path), "SELECT 1", "--max-spill", "lots"), "--max-spill must be a size")
    _one_line(run_cli("query", "extreme_tokens", str(path), "-p", f"run={a}", "-p", "n=-3"),
              "parameter n must be in [1, 100000], got -3")
    _one_line(run_cli("query", "sparsity_by_position", str(path), "-p", f"run={a}", "-p", "layer=-7"),
              "parameter layer must be in [-1, 4095], got -7")


def test_sql_out_is_written_whole_or_not_at_all(store, tmp_path):
    """`sql --out` left a truncated file on a full disk."""
    path, _, _ = store
    with tmpfs(tmp_path / "small", size="64k") as small:
        out = small / "r.csv"
        out.write_text("previous result\n")
        r = run_cli("sql", str(path), "SELECT * FROM token_stats", "--format", "csv", "--out", str(out))
        _one_line(r, "disk full while writing", str(out))
        assert out.read_text() == "previous result\n" and [p.name for p in small.iterdir()] == ["r.csv"]


def test_threads_sharing_one_file_handle_read_their_own_bytes(tmp_path):
    """DuckDB's threads share one handle per Parquet file and each seeks then reads: on a plain file object they
    interleaved, and queries over files of several row groups failed ("ZSTD Decompression failure") or read
    garbled metadata. Each thread of a SharedReader reads at its own position."""
    import random
    import threading

    from actsparse.queries.engine import SharedReader

    data = random.Random(0).randbytes(1 << 20)
    (tmp_path / "f").write_bytes(data)
    reader = SharedReader((tmp_path / "f").open("rb"), len(data))  # closed at the end: checked
    wrong = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            start, n = rng.randrange(len(data)), rng.randrange(1, 4096)
            reader.seek(start)
            if reader.read(n) != data[start:start + n]:
                wrong.append((seed, start, n))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.seek(-10, 2)
    assert wrong == [] and reader.read() == data[-10:] and reader.tell() == len(data)
    reader.close()
    assert reader.closed
