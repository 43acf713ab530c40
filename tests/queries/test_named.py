"""Named queries (``actsparse.queries.named``): typed parameters, defaults, headers checked."""

from __future__ import annotations

import numpy as np
import pytest

from actsparse.core.errors import ActsparseError
from actsparse.queries import Store
from actsparse.queries.named import get, load, parse

SITES = ("input", "gate", "intermediate")


@pytest.fixture
def store(two_model_store):
    return two_model_store


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


def test_queries_of_generation_and_diffusion_runs(decoded_store, two_model_store, tmp_path):
    """sparsity_by_phase, sparsity_by_step and mask_stability against the tables they summarise; the tokens view
    shows phase and step for runs of text too."""
    import shutil

    import polars as pl

    from actsparse.analyze.steps import StepConfig, analyze_steps, stability_summary

    src, ids = decoded_store
    path = shutil.copytree(src, tmp_path / "S")
    res = analyze_steps(path, ids["llada"], StepConfig())
    with Store(path) as st:
        phases = st.query("sparsity_by_phase", run=ids["generation"], layer=1)
        manual = st.sql("SELECT k.phase, avg(s.sparsity_p90) AS s, count(*) AS n FROM token_stats s JOIN tokens k "
                        "USING (run_id, token_index) WHERE s.run_id = $run AND s.site = 'intermediate' AND s.layer = 1 "
                        "AND NOT s.special GROUP BY ALL", run=ids["generation"])
        assert phases["phase"].to_list() == ["prefill", "generation", "total"]
        for phase, s, n in manual.iter_rows():
            row = phases.filter(pl.col("phase") == phase).row(0, named=True)
            assert row["sparsity_mean"] == pytest.approx(s) and row["n_tokens"] == n
        assert phases.filter(pl.col("phase") == "total")["n_tokens"].item() == manual["n"].sum()
        by_step = st.query("sparsity_by_step", run=ids["llada"])
        model = res.sparsity.filter(pl.col("layer") == -1).sort("step")
        assert by_step["step"].to_list() == model["step"].to_list()
        np.testing.assert_allclose(by_step["sparsity"].to_numpy(), model["sparsity"].to_numpy(), rtol=1e-12)
        pooled = st.query("mask_stability", run=ids["llada"])
        for kind, delta, g, t in pooled.select("kind", "delta", "global_jaccard", "token_jaccard").iter_rows():
            assert (g, t) == pytest.approx(stability_summary(res.stability)[(kind, delta)])
        assert st.query("mask_stability", run=ids["llada"], by_step=True)["step"].null_count() == 0
        assert st.query("sparsity_by_step", run=ids["llada"], rule="top-k").height == 0  # not analysed
        with pytest.raises(ActsparseError, match="unknown step_rule 'flat'"):
            st.query("sparsity_by_step", run=ids["llada"], rule="flat")
        kinds = st.sql("SELECT run_id, min(phase) AS phase, max(step) AS step, count(cfg_half) AS halves FROM tokens "
                       "GROUP BY ALL")
        assert dict(kinds.select("run_id", "phase").iter_rows()) == {
            ids["generation"]: "generation", ids["llada"]: "denoising", ids["dgemma"]: "denoising"}
    with Store(two_model_store[0]) as st:
        text = st.sql("SELECT DISTINCT phase, step, block FROM tokens")
        assert text.rows() == [("prefill", 0, None)]
