"""Offline curves: every target against a brute-force recomputation, caching, bad input, and (real)
the open-loop error against the same layer sparsified inside the running model."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from actsparse import CollectConfig, collect
from actsparse.analyze import rules as R
from actsparse.analyze.critical import critical_point
from actsparse.analyze.curves import compute_curves, critical_sparsity
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import TARGETS
from actsparse.pipeline.ffn import ffn_recompute
from actsparse.pipeline.reader import StoreReader
from tests.helpers import run_cli

ALL_SITES = ("input", "gate", "act", "up", "intermediate", "output")


@pytest.fixture(scope="module")
def tiny_store(tiny_llama, text_corpus, tmp_path_factory):
    store = tmp_path_factory.mktemp("curves")
    res = collect(CollectConfig(model=str(tiny_llama), corpus=str(text_corpus), max_tokens=600, seq_len=64,
                                batch_size=2, chunk_tokens=128, sites=ALL_SITES, dtype="float32"),
                  store, progress=False, log=lambda m: None)
    return store, res.run_id


def _brute(run, layer: int, target: str, p: float, include_special=False):
    """Mean sparsity and mean relative FFN-output error by masking and recomputing, one p at a time."""
    keep = ~run.special_mask() if not include_special else np.ones(run.n_tokens, bool)
    x = run.read("input", layer)[torch.from_numpy(keep)]
    w = run.weights(layer)
    dense = ffn_recompute(w, run.activation, x)
    y = dense["output"]
    if target == "intermediate":
        m = R.topp_mask(dense["intermediate"], p)
        h2 = dense["intermediate"] * m
        s = R.sparsity(m)
    elif target in ("gate", "up"):
        site = "act" if target == "gate" else "up"
        m = R.topp_mask(dense[site], p)
        h2 = dense["intermediate"] * m
        s = R.sparsity(m)
    else:
        m = R.topp_mask(x, p)
        h2 = ffn_recompute(w, run.activation, x * m)["intermediate"]
        s = R.sparsity(m)
        if target == "all-inputs":
            mh = R.topp_mask(h2, p)
            d_model, d_ff = x.shape[1], h2.shape[1]
            s = (s * d_model + R.sparsity(mh) * d_ff) / (d_model + d_ff)
            h2 = h2 * mh
    y2 = h2 @ w["down"].T
    rel = (y - y2).norm(dim=1) / y.norm(dim=1)
    return float(s.mean()), float(rel.double().mean())


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_matches_brute_force(tiny_store, target):
    store, run_id = tiny_store
    df = compute_curves(store, run_id, targets=(target,), grids={"top-p": (1.0, 0.9, 0.6)}, use_cache=False)
    run = StoreReader(str(store)).run(run_id)
    for layer in (0, 2):
        for p in (0.9, 0.6):
            s, e = _brute(run, layer, target, p)
            row = df.filter((pl.col("layer") == layer) & (pl.col("value") == p))
            if target == "all-inputs":
                # model/layer sparsity of all-inputs = both hooks weighted by width (paper §1.4)
                lvl = df.filter((pl.col("layer") == -1) & (pl.col("value") == p))
                assert lvl.height == 1
            else:
                assert row["sparsity_mean"][0] == pytest.approx(s, abs=1e-9)
            assert row["rel_err_mean"][0] == pytest.approx(e, rel=1e-4, abs=1e-6)
    dense = df.filter(pl.col("value") == 1.0)
    assert (dense["rel_err_mean"] < 1e-5).all()


def test_model_level_is_dimension_weighted_for_all_inputs(tiny_store):
    store, run_id = tiny_store
    df = compute_curves(store, run_id, targets=("all-inputs",), grids={"top-p": (0.7,)}, use_cache=False)
    run = StoreReader(str(store)).run(run_id)
    num = den = 0.0
    for layer in range(run.n_layers):
        s, _ = _brute(run, layer, "all-inputs", 0.7)
        num += s
        den += 1
    model = df.filter(pl.col("layer") == -1)["sparsity_mean"][0]
    assert model == pytest.approx(num / den, abs=1e-9)  # equal token counts per layer: mean of layer values


def test_special_tokens_are_excluded_by_default(tiny_store):
    store, run_id = tiny_store
    run = StoreReader(str(store)).run(run_id)
    a = compute_curves(store, run_id, grids={"top-p": (0.8,)}, use_cache=False)
    b = compute_curves(store, run_id, grids={"top-p": (0.8,)}, include_special=True, use_cache=False)
    n_special = int(run.special_mask().sum())
    assert n_special > 0
    assert a.filter(pl.col("layer") == 0)["n_tokens"][0] == run.n_tokens - n_special
    assert b.filter(pl.col("layer") == 0)["n_tokens"][0] == run.n_tokens


def test_other_rules_and_threshold_calibration(tiny_store):
    store, run_id = tiny_store
    df = compute_curves(store, run_id, rules=("top-k", "max-p", "threshold"), use_cache=False)
    topk = df.filter((pl.col("rule") == "top-k") & (pl.col("layer") == 1) & (pl.col("value") == 0.5))
    assert topk["sparsity_mean"][0] == pytest.approx(0.5, abs=0.02)  # ties aside, top-k keeps k = W/2
    thr = df.filter((pl.col("rule") == "threshold") & (pl.col("layer") >= 0))
    # tau calibrated on other windows reaches the target sparsity on the evaluated ones (TEAL-style)
    err = (thr["sparsity_mean"] - thr["value"]).abs().max()
    assert err < 0.08
    maxp = df.filter((pl.col("rule") == "max-p") & (pl.col("layer") == -1)).sort("value")
    assert maxp["sparsity_mean"].is_sorted()
    # asking for threshold too changes nothing for the other rules: they keep every window
    alone = compute_curves(store, run_id, rules=("top-k", "max-p"), use_cache=False)
    both = df.filter(pl.col("rule") != "threshold")
    assert both.drop("analysis_id").equals(alone.drop("analysis_id"))
    assert topk["n_tokens"][0] > thr.filter(pl.col("layer") == 1)["n_tokens"][0]


def test_threshold_needs_windows_left_after_calibration(tiny_llama, text_corpus, tmp_path):
    res = collect(CollectConfig(model=str(tiny_llama), corpus=str(text_corpus), max_tokens=60, seq_len=64),
                  tmp_path, progress=False, log=lambda m: None)
    with pytest.raises(ActsparseError, match="1 window\\(s\\), all of them calibrating tau"):
        compute_curves(tmp_path, res.run_id, rules=("threshold",), use_cache=False)


def test_results_are_cached_in_the_store_by_config_hash(tiny_store):
    store, run_id = tiny_store
    a = compute_curves(store, run_id, grids={"top-p": (0.95, 0.5)})
    files = sorted((store / "runs" / run_id / "analysis").glob("curves-*.parquet"))
    assert len(files) == 1 and files[0].stem == f"curves-{a['analysis_id'][0]}"
    mtime = files[0].stat().st_mtime_ns
    b = compute_curves(store, run_id, grids={"top-p": (0.95, 0.5)})
    assert a.equals(b) and files[0].stat().st_mtime_ns == mtime
    compute_curves(store, run_id, grids={"top-p": (0.95, 0.4)})
    assert len(list((store / "runs" / run_id / "analysis").glob("curves-*.parquet"))) == 2
    checks = json.loads((store / "runs" / run_id / "checksums.json").read_text())
    assert any("analysis/curves-" in k for k in json.dumps(checks).split('"'))
    # each cached analysis stores its critical sparsity at the default tolerance: the SQL table
    from actsparse.queries import Store

    with Store(store) as st:
        stored = st.sql("SELECT * FROM critical_sparsity WHERE analysis_id = $a", a=a["analysis_id"][0])
    want = critical_sparsity(a)
    assert stored.height == want.height == 1 and stored["tolerance"][0] == 0.1
    assert stored["critical_sparsity_interp"][0] == pytest.approx(want["critical_sparsity_interp"][0], nan_ok=True)


def test_critical_point_interpolation():
    s = [0.0, 0.2, 0.4, 0.6]
    e = [0.0, 0.05, 0.09, 0.2]
    grid_s, grid_v, interp = critical_point(s, e, [1.0, 0.9, 0.8, 0.7], 0.1, higher_is_better=False)
    assert (grid_s, grid_v) == (0.4, 0.8)
    assert interp == pytest.approx(0.4 + (0.1 - 0.09) / (0.2 - 0.09) * 0.2)
    assert all(math.isnan(v) for v in critical_point([0.1], [0.5], [0.9], 0.1, higher_is_better=False))
    assert critical_point(s, [0, 0, 0, 0], [1, 1, 1, 1], 0.1, higher_is_better=False)[2] == 0.6


def test_critical_sparsity_table(tiny_store):
    store, run_id = tiny_store
    df = compute_curves(store, run_id, use_cache=False)
    crit = critical_sparsity(df, 0.05)
    row = crit.row(0, named=True)
    model = df.filter(pl.col("layer") == -1).sort("sparsity_mean")
    ok = model.filter(pl.col("rel_err_mean") <= 0.05)
    assert row["critical_sparsity_grid"] == pytest.approx(ok["sparsity_mean"].max())
    assert row["critical_sparsity_grid"] <= row["critical_sparsity_interp"] and row["label"] == "open-loop"


def test_missing_site_is_named(tiny_llama, text_corpus, tmp_path):
    res = collect(CollectConfig(model=str(tiny_llama), corpus=str(text_corpus), max_tokens=200, seq_len=64,
                                sites=("gate",)), tmp_path, progress=False, log=lambda m: None)
    with pytest.raises(ActsparseError, match="needs site\\(s\\) intermediate"):
        compute_curves(tmp_path, res.run_id, targets=("intermediate",))


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["--run", "ffffffff"], "unknown run"),
    (["--target", "outputs"], "unknown target"),
    (["--rule", "top-q"], "unknown rule"),
    (["--grid", "0.5,1.2"], "[0, 1]"),
    (["--grid", "0.5,x"], "comma-separated numbers"),
    (["--grid", ","], "--grid has no values"),  # never silently the default grid
    (["--rule", "top-p,foo", "--grid", "0.5"], "unknown rule 'foo'"),  # the unknown name, not "one --rule"
    (["--rule", "top-p,top-k", "--grid", "0.5"], "--grid needs exactly one --rule"),
    (["--tolerance", "-1"], "--tolerance must be a finite number >= 0"),
    (["--tolerance", "nan"], "--tolerance must be a finite number >= 0"),
    # usage errors: typer's own click (typer._click) must be caught too, not left as a traceback
    (["--bogus"], "No such option: --bogus (see actsparse curves --help)"),
    (["--tolerance", "abc"], "Invalid value for '--tolerance'"),
    (["--run"], "requires an argument"),
])
def test_cli_bad_input(tiny_store, args, words):
    store, _ = tiny_store
    r = run_cli("curves", str(store), *args)
    assert r.returncode == 2 and r.stderr.startswith("error:") and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_says_when_no_grid_value_meets_the_tolerance(tiny_store):
    store, _ = tiny_store
    r = run_cli("curves", str(store), "--grid", "0.1", "--tolerance", "0", "--no-cache")
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())  # rich wraps long lines
    assert "(rel err <= 0): no grid value keeps the error within the tolerance" in out and "nan" not in out


@pytest.mark.slow
def test_cli_prints_targets_in_the_order_given(tiny_store):
    store, _ = tiny_store
    r = run_cli("curves", str(store), "--target", "up,gate", "--grid", "0.5", "--no-cache", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.index("up / top-p") < r.stdout.index("gate / top-p")
    assert r.stdout.index("critical sparsity up/top-p") < r.stdout.index("critical sparsity gate/top-p")


@pytest.mark.slow
def test_cli_newer_format_and_nan_are_reported(tiny_store, tmp_path):
    import shutil

    store, run_id = tiny_store
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    import zarr

    w = zarr.open_array(copy / "runs" / run_id / "activations.zarr" / "intermediate", mode="r+")
    block = w[1, 128:256]
    block[5, 7] = np.nan
    w[1, 128:256] = block
    r = run_cli("curves", str(copy), "--no-cache")
    assert r.returncode != 0 and "non-finite value in site intermediate, layer 1, token 133, feature 7" in r.stderr, r.stderr
    meta = copy / "actsparse-store.json"
    meta.write_text(json.dumps({"format": "actsparse-store", "format_version": 99}))
    r = run_cli("curves", str(copy))
    assert r.returncode != 0 and "newer than this actsparse reads" in r.stderr


@pytest.mark.slow
@pytest.mark.real
def test_real_open_loop_error_equals_in_model_hook(smollm2_store):
    """Intermediate and input targets: the offline error at three p equals the error of the same layer's
    FFN sparsified inside the running model (top-p hook), within the stored bf16 tolerance."""
    from transformers import AutoModelForCausalLM

    from actsparse.pipeline.models import resolve_model

    store, res = smollm2_store
    run = StoreReader(str(store)).run(res.run_id)
    layer, ps = 7, (0.95, 0.8, 0.5)
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m").path).eval()
    mlp = model.model.layers[layer].mlp
    tok = run.tokens()
    keep = ~tok["special"].to_numpy()
    for target in ("intermediate", "input"):
        df = compute_curves(store, res.run_id, targets=(target,), grids={"top-p": ps}, layers=[layer], use_cache=False)
        for p in ps:
            dense, sparse = [], []

            def pre_hook(mod, args, target=target, dense=dense, p=p):
                a = args[0]
                if target == "intermediate":
                    dense.append(torch.nn.functional.linear(a, mod.weight))
                else:
                    dense.append(mlp.down_proj(mlp.act_fn(mlp.gate_proj(a)) * mlp.up_proj(a)))
                return (a * R.topp_mask(a, p),)  # the model itself runs on the sparsified tensor

            target_mod = mlp.down_proj if target == "intermediate" else mlp
            handles = [target_mod.register_forward_pre_hook(pre_hook),
                       target_mod.register_forward_hook(lambda mod, args, out, sparse=sparse: sparse.append(out))]
            try:
                with torch.inference_mode():
                    for _, seq in tok.group_by("sequence", maintain_order=True):
                        model(torch.tensor(seq["token_id"].to_list())[None])
            finally:
                for h in handles:
                    h.remove()
            y, y2 = torch.cat(dense, 1)[0], torch.cat(sparse, 1)[0]
            errs = [(y - y2).norm(dim=-1) / y.norm(dim=-1)]
            live = float(torch.cat(errs)[torch.from_numpy(keep)].double().mean())
            offline = df.filter((pl.col("layer") == layer) & (pl.col("value") == p))["rel_err_mean"][0]
            assert offline == pytest.approx(live, rel=0.02), (target, p, offline, live)


@pytest.mark.slow
def test_a_damaged_shard_is_one_line_naming_it(tiny_llama, text_corpus, tmp_path):
    """A truncated shard file: zarr's checksum refuses it; curves says which array, not a traceback."""
    res = collect(CollectConfig(model=str(tiny_llama), corpus=str(text_corpus), max_tokens=200, seq_len=64,
                                chunk_tokens=128), tmp_path, progress=False, log=lambda m: None)
    shard = res.path / "activations.zarr" / "gate" / "c" / "0" / "0" / "0"
    with open(shard, "r+b") as f:
        f.truncate(10)
    r = run_cli("curves", str(tmp_path), "--target", "gate", "--grid", "0.9", "--no-cache")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"run {res.run_id}: cannot read gate layer 0 tokens 0:" in r.stderr and "actsparse verify" in r.stderr
