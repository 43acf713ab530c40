"""The weight-aware rules (WINA top-k / top-p, CETT) against plain references, in curves and in closed loop."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from actsparse.analyze import rules as R
from actsparse.analyze.curves import compute_curves
from actsparse.analyze.sparsifier import Sparsifier, per_hook
from actsparse.analyze.weighted import calibrate_cett, consumer_norms
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.ffn import ffn_recompute
from actsparse.pipeline.reader import StoreReader
from tests.helpers import run_cli


def ref_wina(a: np.ndarray, norms: np.ndarray, rule: str, value: float) -> np.ndarray:
    """WINA keep mask written from its definition, one row at a time (float32 score)."""
    out = np.zeros(a.shape, bool)
    for t, row in enumerate(a):
        s = (np.abs(row) * norms).astype(np.float32)
        srt = np.sort(s)[::-1]
        if rule == "wina-top-k":
            thr = srt[max(int(len(row) * value), 1) - 1]
        else:
            cum = np.cumsum(srt.astype(np.float64))
            hit = np.nonzero(cum >= cum[-1] * value)[0]
            thr = srt[hit[0] if len(hit) else 0]
        out[t] = s >= thr
    return out


def rows(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(64, 48, generator=g)
    if kind == "ties":
        a = torch.round(a * 2) / 2  # many equal magnitudes
    elif kind == "zeros":
        a[:, ::3] = 0.0
        a[5] = 0.0  # an all-zero row
    elif kind == "outlier":
        a[:, 7] *= 1e4
    return a


@pytest.mark.parametrize("kind", ["random", "ties", "zeros", "outlier"])
@pytest.mark.parametrize("rule, value", [("wina-top-k", 0.25), ("wina-top-k", 1.0), ("wina-top-p", 0.9),
                                         ("wina-top-p", 0.0), ("wina-top-p", 1.0)])
def test_wina_masks_match_a_plain_reference(kind, rule, value):
    a = rows(kind)
    norms = torch.rand(48, generator=torch.Generator().manual_seed(1)) + 0.1
    got = R.rule_mask(rule, a, value, norms=norms).numpy()
    assert (got == ref_wina(a.numpy(), norms.numpy(), rule, value)).all()


def test_wina_differs_from_magnitude_when_columns_differ():
    a = torch.ones(1, 4)
    norms = torch.tensor([1.0, 4.0, 2.0, 3.0])
    assert R.rule_mask("wina-top-k", a, 0.5, norms=norms).tolist() == [[False, True, False, True]]
    with pytest.raises(ActsparseError, match="column norms"):
        R.rule_mask("wina-top-k", a, 0.5)
    with pytest.raises(ActsparseError, match="shape"):
        R.rule_mask("wina-top-p", a, 0.5, norms=torch.ones(3))
    with pytest.raises(ActsparseError, match="calibrated"):
        R.rule_mask("cett", a, 0.1)


def test_consumer_norms_are_the_consuming_weights_columns():
    g = torch.Generator().manual_seed(0)
    w = {"gate": torch.randn(6, 4, generator=g), "up": torch.randn(6, 4, generator=g),
         "down": torch.randn(4, 6, generator=g)}
    for site in ("intermediate", "act", "up"):
        assert torch.allclose(consumer_norms(w, site), torch.tensor([w["down"][:, i].norm() for i in range(6)]))
    stacked = torch.cat([w["gate"], w["up"]])
    assert torch.allclose(consumer_norms(w, "input"), torch.tensor([stacked[:, i].norm() for i in range(4)]))


@pytest.fixture
def store(analysis_store):
    return analysis_store


def test_cett_calibration_reaches_the_target_error(store):
    path, run_id = store
    run = StoreReader(str(path)).run(run_id)
    w = run.weights(1)
    h = run.read("intermediate", 1)
    y = h @ w["down"].T
    targets = [0.0, 0.05, 0.2, 0.5]
    taus = calibrate_cett("intermediate", h, targets, weights=w, activation=run.activation)
    assert taus == sorted(taus)
    for e, tau in zip(targets, taus):
        dy = (h * ~R.threshold_mask(h, tau)) @ w["down"].T
        err = float((dy.norm(dim=1) / y.norm(dim=1)).mean())
        assert err <= e + 0.02  # interpolation between candidates: within a small step of the target
        if e >= 0.05:
            assert err >= e * 0.6
    x = run.read("input", 1)
    (tau,) = calibrate_cett("input", x, [0.1], weights=w, activation=run.activation)
    x = x[:256]
    y = ffn_recompute(w, run.activation, x, ("output",))["output"]
    y2 = ffn_recompute(w, run.activation, x * R.threshold_mask(x, tau), ("output",))["output"]
    assert float(((y - y2).norm(dim=1) / y.norm(dim=1)).mean()) == pytest.approx(0.1, abs=0.02)


def test_curves_with_weight_aware_rules(store):
    path, run_id = store
    df = compute_curves(path, run_id, targets=("intermediate", "input"), rules=("wina-top-k", "wina-top-p", "cett"),
                        grids=None, use_cache=False)
    run = StoreReader(str(path)).run(run_id)
    w = run.weights(2)
    keep = torch.from_numpy(~run.special_mask())
    h = run.read("intermediate", 2)[keep]
    m = R.rule_mask("wina-top-k", h, 0.3, norms=consumer_norms(w, "intermediate"))
    rel = ((h * ~m) @ w["down"].T).norm(dim=1) / (h @ w["down"].T).norm(dim=1)
    row = df.filter((pl.col("target") == "intermediate") & (pl.col("rule") == "wina-top-k") & (pl.col("layer") == 2)
                    & (pl.col("value") == 0.3))
    assert row["sparsity_mean"][0] == pytest.approx(float(R.sparsity(m).mean()), abs=1e-9)
    assert row["rel_err_mean"][0] == pytest.approx(float(rel.mean()), rel=1e-4)
    # WINA at equal kept fraction loses less output than plain magnitude top-k on the same data (its purpose)
    plain = compute_curves(path, run_id, targets=("intermediate",), rules=("top-k",), use_cache=False)
    p = plain.filter((pl.col("layer") == -1) & (pl.col("value") == 0.3))["rel_err_mean"][0]
    wina = df.filter((pl.col("target") == "intermediate") & (pl.col("rule") == "wina-top-k") & (pl.col("layer") == -1)
                     & (pl.col("value") == 0.3))["rel_err_mean"][0]
    assert wina < p
    cett = df.filter((pl.col("rule") == "cett") & (pl.col("layer") >= 0) & (pl.col("target") == "intermediate"))
    # calibrated on other windows, the evaluated error lands near its target
    near = cett.filter(pl.col("value").is_between(0.05, 0.3))
    assert ((near["rel_err_mean"] - near["value"]).abs() < 0.05).all()
    assert cett.filter(pl.col("value") == 0.0)["sparsity_mean"].max() < 0.05


def test_closed_loop_wina_and_per_layer_values(tiny_llama):
    from transformers import AutoModelForCausalLM

    from actsparse.pipeline.sites import resolve_ffn

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    arch = resolve_ffn(model)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = {}
    values = per_hook(arch, "intermediate", [0.9 - 0.1 * i for i in range(len(arch.layers))])
    with torch.inference_mode(), Sparsifier(arch, "intermediate", "wina-top-p", values) as sp:
        # registered after the Sparsifier's pre-hook, this one sees the sparsified h
        handle = arch.layers[1].down.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0].clone()))
        sp.begin_batch(torch.ones(2, 16, dtype=torch.bool))
        model(input_ids=ids)
        counts = sp.end_batch()
    handle.remove()
    h = seen["h"]
    assert values[1] == pytest.approx(0.8)
    assert int(counts[1].sum()) == int((h == 0).sum())
    with pytest.raises(ActsparseError, match="per hook point|one value per layer"):
        Sparsifier(arch, "intermediate", "cett", 0.1)
    with pytest.raises(ActsparseError, match="rule values for"):
        Sparsifier(arch, "intermediate", "top-p", [0.9])


@pytest.mark.slow
def test_cli_rules_are_listed_and_checked(store):
    path, _ = store
    r = run_cli("curves", str(path), "--rule", "wina-top-k", "--grid", "0.5", "--format", "csv")
    assert r.returncode == 0, r.stderr
    assert "wina-top-k" in r.stdout
    r = run_cli("curves", str(path), "--rule", "cett", "--grid", "1.5")
    assert r.returncode == 2 and "cett grid values are target relative errors" in r.stderr
