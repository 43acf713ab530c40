"""Size scaling and the authors' numerics: the parameter count, the size_scaling query, the report figures, the
dtype thresholds are compared in, and counting special tokens in closed loop."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from actsparse.analyze import rules as R
from actsparse.analyze.curves import compute_curves
from actsparse.analyze.curves.blocks import SiteBlock
from actsparse.analyze.curves.targets import ranked_dtype
from actsparse.pipeline.reader import StoreReader
from actsparse.queries.engine import Store


def test_parameter_count_is_recorded_and_scaling_is_queryable(analysis_store, tiny_llama):
    from transformers import AutoModelForCausalLM

    path, run_id = analysis_store
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    run = StoreReader(str(path)).run(run_id)
    assert run.manifest.model.n_params == sum(p.numel() for p in model.parameters())
    st = Store(str(path))
    row = st.sql("SELECT n_params, model_type FROM runs WHERE run_id = $r", r=run_id)
    assert row["n_params"][0] == run.manifest.model.n_params and row["model_type"][0] == "llama"
    compute_curves(path, run_id, targets=("intermediate",))
    got = Store(str(path)).query("size_scaling")  # a new Store sees the result files written since
    assert got.filter(pl.col("run_id") == run_id)["family"].to_list() == ["llama"]
    assert got["open_critical"].is_not_null().all()


def test_older_manifests_without_the_count_still_read():
    import dataclasses

    from actsparse.core import format as fmt

    m = fmt.ModelInfo(spec="m", name="m", weights_sha256="x", weights_id="0123456789abcdef",
                      ffn=fmt.FFNInfo("glu", "silu", 8, 16, 2))
    d = dataclasses.asdict(m)
    d.pop("n_params")
    assert fmt.ModelInfo.from_dict(d, "test").n_params is None


@pytest.mark.slow
def test_report_draws_rank_and_size_figures(analysis_store, tmp_path):
    from actsparse.analyze.rank import compute_rank
    from actsparse.analyze.report import build_report

    path, run_id = analysis_store
    compute_rank(path, run_id, sites=("intermediate",), token_counts=(64,))
    out = build_report(path, tmp_path / "report", log=lambda m: None)
    html = out.read_text()
    assert (tmp_path / "report" / "fig-effective-rank.png").is_file() and "fig-effective-rank" in html
    assert (tmp_path / "report" / "fig-size-scaling.svg").is_file() and "Across runs" in html


def test_max_p_is_compared_in_the_stored_dtype(two_model_store):
    """curves' max-p threshold p * max|a| is rounded to bf16 like the authors' (not compared in float32)."""
    path, run_id, _ = two_model_store
    run = StoreReader(str(path)).run(run_id)
    assert run.manifest.arrays["intermediate"].logical_dtype == "bfloat16"
    grid = (0.03, 0.1, 0.3, 0.7)
    df = compute_curves(path, run_id, rules=("max-p",), grids={"max-p": grid}, use_cache=False, with_error=False)
    keep = torch.from_numpy(~run.special_mask())
    differs = False
    for layer in range(run.n_layers):
        a = run.read("intermediate", layer, to="native")[keep]
        for p in grid:
            want = float(R.sparsity(R.maxp_mask(a, p)).mean())
            got = df.filter((pl.col("layer") == layer) & (pl.col("value") == p))["sparsity_mean"][0]
            assert got == pytest.approx(want, abs=1e-12)
            differs |= want != float(R.sparsity(R.maxp_mask(a.float(), p)).mean())
    assert differs  # on this data float32 thresholds would give other counts


def test_recomputed_sites_are_ranked_in_a_16_bit_compute_dtype(analysis_store):
    path, run_id = analysis_store
    run = StoreReader(str(path)).run(run_id)
    sites = SiteBlock(run, 0, 0, 8, None, run.weights(0))
    sites.cache["gate"] = torch.tensor([[1.00390625, 3.0]])  # not stored in this run: a recomputed value
    assert ranked_dtype(sites, "gate").dtype == torch.float32  # the run computed in float32
    assert ranked_dtype(sites, "intermediate").dtype == torch.float32  # stored float32: as stored
    bf = type("M", (), {"compute_dtype": "bfloat16"})()
    sites.run = type("R", (), {"sites": run.sites, "manifest": bf})()
    got = ranked_dtype(sites, "gate")
    assert got.dtype == torch.bfloat16 and got.float().tolist() == [[1.0, 3.0]]


def test_evaluate_can_count_special_tokens(tiny_llama, text_corpus):
    from actsparse.analyze.evaluate import EvalConfig, evaluate

    def run(include):
        cfg = EvalConfig(model=str(tiny_llama), corpus=str(text_corpus), grid=(0.9,), max_tokens=256, seq_len=64,
                         batch_size=4, include_special=include)
        return evaluate(cfg, None, n_boot=5, log=lambda m: None)

    plain, special = run(False), run(True)
    n0 = plain.layers.filter(pl.col("layer") == 0)["n_positions"][0]
    n1 = special.layers.filter(pl.col("layer") == 0)["n_positions"][0]
    assert n1 == 256 and n0 <= 256 - 4  # every real token, against those less BOS (one per window) and others
    assert plain.eval_id != special.eval_id
    assert special.summary["nll"][0] == pytest.approx(plain.summary["nll"][0])  # predictions are unchanged
