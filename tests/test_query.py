"""The query layer: per-token statistics, DuckDB SQL, named queries, Polars scans, read-only guarantees.

Mechanics run on a store with two tiny models (a Llama and a GPT-2: different depths and widths); the
statistics are checked against values computed here from the dense arrays (``Run.read``) with
``analyze.rules``. One ``real`` test checks them on the SmolLM2 run of ``smollm2_store``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from actsparse import share
from actsparse.errors import ActsparseError
from actsparse.store import ANALYSIS_TABLES, Store
from analyze.rules import sparsity, topp_mask
from analyze.token_stats import STAT_COLUMNS, THRESHOLDS, TOPP_VALUES, token_stats
from pipeline.reader import StoreReader
from queries import get, load, parse
from tests.conftest import build_tiny, run_cli, tmpfs
from tests.test_share import serve  # noqa: F401  (fixture: a byte-range HTTP server on loopback)

SITES = ("input", "gate", "intermediate")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama, text_corpus):
    """Two complete runs of two tiny models in one store: ``(path, llama_run_id, gpt2_run_id)``."""
    from pipeline.collect import CollectConfig, collect

    gpt2 = build_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")
    path = tmp_path_factory.mktemp("query") / "S"
    ids = [collect(CollectConfig(model=str(model), corpus=str(text_corpus), max_tokens=n, seq_len=64, batch_size=2,
                                 chunk_tokens=128), path, progress=False, log=lambda m: None).run_id
           for model, n in ((tiny_llama, 600), (gpt2, 300))]
    return path, ids[0], ids[1]


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
    assert share.update_checksums(dst / "runs" / rid, written)
    # a store-level evaluation (a model that was never collected): no run, so run_id is null
    (dst / "evaluations").mkdir()
    pq.write_table(pa.table({**evaluate, "run_id": pa.array([None], pa.string()), "ppl": [30.0]}),
                   dst / "evaluations" / "evaluate-fedcba9876543210.parquet")
    return dst


# ---------------------------------------------------------------------------------------------
# per-token statistics


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_token_stats_equal_the_rules_on_awkward_blocks(dtype):
    """Ties, zero rows, a single-entry max, an inf and a NaN row, in every stored dtype."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(40, 96, generator=g) * 3).round() / 4  # coarse values: many ties
    a[3] = 0.0
    a[4, 7] = 50.0
    a[5] = torch.randn(96, generator=g) * 1e-3
    a = a.to(dtype)
    a[6, 0] = math.inf
    a[7, 5] = math.nan
    s = token_stats(a)
    assert set(s) == set(STAT_COLUMNS) and all(v.dtype == np.float32 and v.shape == (40,) for v in s.values())
    ok = torch.ones(40, dtype=torch.bool)
    ok[7] = False
    assert all(np.isnan(s[c][7]) for c in STAT_COLUMNS)
    f = a.float()[ok]
    for p in TOPP_VALUES:
        np.testing.assert_array_equal(s[f"sparsity_p{round(p * 100)}"][ok.numpy()], sparsity(topp_mask(a[ok], p)).float().numpy())
    for t in THRESHOLDS:
        col = f"frac_below_1e_{round(-math.log10(t))}"
        np.testing.assert_array_equal(s[col][ok.numpy()], (f.abs() < t).double().mean(1).float().numpy())
    finite = ok.clone()
    finite[6] = False
    ff = a.float()[finite]
    np.testing.assert_allclose(s["l1"][finite.numpy()], ff.abs().double().sum(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(s["l2"][finite.numpy()], ff.double().norm(dim=1).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(s["max_abs"][finite.numpy()], ff.abs().amax(1).numpy())
    assert np.isnan(s["top1_share"][3]) and s["sparsity_p90"][3] == 0.0 and s["frac_below_1e_3"][3] == 1.0
    assert s["l1"][6] == math.inf


def test_token_stats_match_dense_arrays(store):
    """Rows of the token_stats table equal values computed here from Run.read, for a few tokens."""
    path, a, b = store
    reader = StoreReader(str(path))
    with Store(path) as st:
        for rid in (a, b):
            run = reader.run(rid)
            counts = st.sql("SELECT site, count(*) AS n FROM token_stats WHERE run_id = $r GROUP BY site", r=rid)
            assert dict(counts.iter_rows()) == {s: run.n_tokens * run.n_layers for s in SITES}
            for site, layer in (("intermediate", run.n_layers - 1), ("input", 0), ("gate", 1)):
                dense = run.read(site, layer)
                picks = [0, 1, 129, run.n_tokens - 1]
                rows = st.sql("SELECT * FROM token_stats WHERE run_id = $r AND site = $s AND layer = $l "
                              "AND token_index IN (0, 1, 129, $last) ORDER BY token_index",
                              r=rid, s=site, l=layer, last=run.n_tokens - 1)
                assert rows["token_index"].to_list() == picks
                x = dense[picks]
                np.testing.assert_allclose(rows["l1"].to_numpy(), x.abs().sum(1).numpy(), rtol=1e-5)
                np.testing.assert_allclose(rows["l2"].to_numpy(), x.norm(dim=1).numpy(), rtol=1e-5)
                np.testing.assert_array_equal(rows["max_abs"].to_numpy(), x.abs().amax(1).numpy())
                for p in (0.5, 0.9, 0.99):
                    np.testing.assert_array_equal(rows[f"sparsity_p{round(p * 100)}"].to_numpy(),
                                                  sparsity(topp_mask(x, p)).float().numpy())
                tok = run.tokens()[picks]
                assert rows["position"].to_list() == tok["position"].to_list()
                assert rows["special"].to_list() == tok["special"].to_list()


def test_collection_records_stats_in_checksums_and_index_rebuilds_them(store, tmp_path):
    path, a, b = store
    listed = share.parse_checksums((path / "runs" / a / share.CHECKSUMS).read_bytes(), "x")
    parts = sorted(p.relative_to(path / "runs" / a).as_posix() for p in (path / "runs" / a).glob("token_stats/*/*.parquet"))
    assert len(parts) == 5 * len(SITES) and set(parts) <= set(listed)
    assert share.verify(path).ok

    copy = Path(shutil.copytree(path, tmp_path / "C"))
    before = {p: p.read_bytes() for p in copy.glob("runs/*/token_stats/*/*.parquet")}
    removed = [copy / "runs" / a / parts[0], copy / "runs" / b / "token_stats" / "site=gate" / "part-000002.parquet"]
    for p in removed:
        p.unlink()
    shutil.rmtree(copy / "runs" / b / "token_stats" / "site=input")
    r = run_cli("index", str(copy))
    assert r.returncode == 0, r.stderr
    assert "indexed 2 run(s), 5 part(s) written" in r.stdout
    import pyarrow.parquet as pq

    for p, data in before.items():
        assert pq.read_table(p).equals(pq.read_table(io.BytesIO(data))), p
    assert share.verify(copy).ok  # the rebuilt parts were recorded in checksums.json
    again = run_cli("index", str(copy), "--run", a[:6])
    assert again.returncode == 0 and "0 token_stats part(s) written (all present)" in again.stdout


def test_index_refuses_read_only_and_remote_stores(store, tmp_path, serve):  # noqa: F811
    path, a, _ = store
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp (pip install 'actsparse[http]')")
    r = run_cli("index", serve(path.parent) + f"/{path.name}/")
    assert r.returncode != 0 and "not a local directory" in r.stderr
    with tmpfs(tmp_path / "ro", size="64m") as ro:
        shutil.copytree(path, ro / "S")
        shutil.rmtree(ro / "S" / "runs" / a / "token_stats")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        r = run_cli("index", str(ro / "S"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "read-only" in r.stderr


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
                ffn = m["model"]["ffn"]
                specials = int(StoreReader(str(path)).run(rid).special_mask().sum())
                want.append((rid, site, ffn["n_layers"], m["arrays"][site]["width"],
                             ffn["n_layers"] * (m["n_tokens"] - specials)))
        assert layers.rows() == want
        # one query across both models
        both = st.sql("SELECT r.architecture, avg(t.sparsity_p90) AS s FROM token_stats t JOIN runs r USING (run_id) "
                      "WHERE NOT t.special GROUP BY ALL ORDER BY ALL")
        assert both.height == 2 and both["s"].is_between(0, 1).all()
        assert st.sql("SELECT run_id, count(*) AS n FROM tokens GROUP BY ALL ORDER BY ALL").rows() == \
            sorted([(a, 600), (b, 300)])
        for table, (_, columns) in ANALYSIS_TABLES.items():
            empty = st.sql(f"SELECT * FROM {table}")
            assert empty.height == 0 and empty.columns == [c for c, _ in columns]


def test_every_named_query_runs(store, tmp_path):
    path, a, b = store
    with Store(path) as st:
        results = _all_queries(st, a, b)
    for name, df in results.items():
        declared = get(name).columns
        assert all(c in declared for c in df.columns if not c.endswith("_mean")), (name, df.columns)
        assert df.height > 0 or name == "critical_sparsity", name
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
    assert crit["model_name"].to_list() == [st.manifests[a]["model"]["name"]] and ev["ppl"].to_list() == [24.5, 30.0]
    assert ev["run_id"].to_list() == [a, None]


def test_sparsity_curve_reads_one_analysis_and_the_site_of_the_target(store, tmp_path):
    path, a, b = store
    dst = _with_analysis(path, tmp_path / "A", a)
    adir = dst / "runs" / a / "analysis"
    # a second analysis of the same run, target and rule with fewer grid values
    other = pl.read_parquet(adir / "curves-0123456789abcdef.parquet").head(2).with_columns(
        analysis_id=pl.lit("b2"), n_tokens=pl.lit(900, pl.Int64))
    other.write_parquet(adir / "curves-fedcba9876543210.parquet")
    share.update_checksums(dst / "runs" / a, [adir / "curves-fedcba9876543210.parquet"])
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


def test_named_query_parameters(store):
    path, a, b = store
    with Store(path) as st:
        by_layer = st.query("sparsity_by_position", run=a[:5], layer="2", bucket="8", p="0.5")
        assert by_layer["position_from"].to_list() == list(range(0, 64, 8))
        with pytest.raises(ActsparseError, match="needs parameter run .*parameters: run RUN"):
            st.query("layer_profile")  # two runs: no default
        with pytest.raises(ActsparseError, match="unknown query 'nope'; available: .*layer_profile"):
            st.query("nope")
        with pytest.raises(ActsparseError, match="has no parameter colour"):
            st.query("layer_profile", run=a, colour="red")
        with pytest.raises(ActsparseError, match="parameter n must be INTEGER"):
            st.query("extreme_tokens", run=a, n="ten")
        with pytest.raises(ActsparseError, match="unknown run"):
            st.query("layer_profile", run="ffffff")
        with pytest.raises(ActsparseError, match="p must be one of"):
            st.query("special_tokens", run=a, p=0.85)
        # a misspelt site, target or rule is an error, not an empty result
        with pytest.raises(ActsparseError, match=r"parameter site: unknown site 'intermediat' \(choose input, gate"):
            st.query("layer_profile", run=a, site="intermediat")
        with pytest.raises(ActsparseError, match="parameter target: unknown target 'all'"):
            st.query("sparsity_curve", run=a, target="all")
        with pytest.raises(ActsparseError, match="parameter rule: unknown rule 'topp'"):
            st.query("critical_sparsity", rule="topp")
        assert st.query("layer_profile", run=a, site="gate").height > 0
        # values are bound, never pasted into the SQL
        assert st.query("critical_sparsity", metric="x' OR '1'='1").height == 0
    # one complete run: a query's only RUN parameter defaults to it; two RUN parameters never do
    assert get("layer_profile").bind({}, resolve_run=str.upper, only_run="abc")["run"] == "ABC"
    assert get("layer_profile").bind({"run": "x"}, resolve_run=str.upper, only_run="abc")["run"] == "X"
    with pytest.raises(ActsparseError, match="needs parameter run_a"):
        get("compare_runs").bind({}, resolve_run=str.upper, only_run="abc")


def test_query_headers_are_checked():
    assert parse("ok", "-- purpose: x\n-- param a INTEGER = 3: n\nSELECT $a").params[0].default == 3
    with pytest.raises(ActsparseError, match="differ from those declared"):
        parse("bad", "-- purpose: x\n-- param a INTEGER: n\nSELECT $b")
    with pytest.raises(ActsparseError, match="bad parameter line"):
        parse("bad", "-- purpose: x\n-- param a NUMBER: n\nSELECT $a")
    with pytest.raises(ActsparseError, match="unknown site 'mlp'"):  # a default outside the vocabulary
        parse("bad", "-- purpose: x\n-- param s SITE = 'mlp': n\nSELECT $s")
    for q in load().values():  # every shipped query documents itself
        assert q.purpose and q.columns and all(p.doc for p in q.params)


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
    with Store(path) as st:
        with pytest.raises(ActsparseError):
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
    assert r.stderr.strip() == (f"note: no rows; run {a} holds sites {', '.join(m['arrays'])} "
                                f"and layers 0-{m['model']['ffn']['n_layers'] - 1}")
    assert "act" not in m["arrays"]
    full = run_cli("query", "layer_profile", str(path), "--param", f"run={a}", "--param", "site=gate")
    assert full.returncode == 0 and full.stderr == ""


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
            "from actsparse import Store; import actsparse.store as m; assert Store is m.Store")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# real model


@pytest.mark.real
def test_real_smollm2_token_stats(smollm2_store):
    store, res = smollm2_store
    run = StoreReader(str(store)).run(res.run_id)
    with Store(store) as st:
        assert st.sql("SELECT count(*) AS n FROM token_stats").item() == 6 * run.n_layers * run.n_tokens
        for site, layer in (("intermediate", 0), ("input", 15), ("output", 29)):
            rows = st.sql("SELECT * FROM token_stats WHERE site = $s AND layer = $l AND token_index IN (0, 5, 600, 1023) "
                          "ORDER BY token_index", s=site, l=layer)
            x = run.read(site, layer)[[0, 5, 600, 1023]]
            np.testing.assert_allclose(rows["l1"].to_numpy(), x.abs().sum(1).numpy(), rtol=1e-5)
            np.testing.assert_array_equal(rows["max_abs"].to_numpy(), x.abs().amax(1).numpy())
            for p in TOPP_VALUES:
                np.testing.assert_array_equal(rows[f"sparsity_p{round(p * 100)}"].to_numpy(),
                                              sparsity(topp_mask(x, p)).float().numpy())
        special = st.query("special_tokens", run=res.run_id, site="input")
        assert special["n_special"].min() > 0 and special["max_abs_ratio"].max() > 1  # BOS has massive activations
