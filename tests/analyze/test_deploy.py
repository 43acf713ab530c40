"""Deployment-shaped sparsity: batch union, N:M masks, the per-neuron table, its view and named query."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from actsparse.analyze import rules as R
from actsparse.analyze.deploy import batch_union_sparsity, compute_deployment, exact_topk_mask, nm_mask
from actsparse.core.errors import ActsparseError
from actsparse.queries.engine import Store
from tests.helpers import run_cli


def masks():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 64, generator=g)
    return a, R.topp_mask(a, 0.8)


def test_batch_union_at_one_is_per_token_sparsity_and_falls_with_batch_size():
    a, keep = masks()
    u1, n1 = batch_union_sparsity(keep, 1)
    assert n1 == 200 and u1 == pytest.approx(float(R.sparsity(keep).mean()), abs=1e-12)
    prev = u1
    for b in (2, 4, 8, 16, 64):
        u, n = batch_union_sparsity(keep, b, torch.randperm(200, generator=torch.Generator().manual_seed(b)))
        assert n == 200 // b and u <= prev + 1e-12
        prev = u
    # a reference union for one batch
    ref = 1.0 - np.mean(np.any(keep[:8].numpy(), axis=0))
    u8, _ = batch_union_sparsity(keep[:8], 8)
    assert u8 == pytest.approx(ref)
    with pytest.raises(ActsparseError, match="outside"):
        batch_union_sparsity(keep, 500)


@pytest.mark.parametrize("n, m", [(2, 4), (8, 16), (1, 4), (4, 4)])
def test_nm_masks_keep_exactly_n_per_group_of_m(n, m):
    a, _ = masks()
    a[0] = 0.0  # all ties
    a[1, :8] = 1.0
    mask = nm_mask(a, n, m)
    groups = mask.reshape(a.shape[0], -1, m)
    assert (groups.sum(-1) == n).all()
    # the kept entries are the largest of their group
    g = a.abs().reshape(a.shape[0], -1, m)
    kept_min = torch.where(groups, g, torch.inf).amin(-1)
    dropped_max = torch.where(groups, -torch.inf, g).amax(-1)
    assert (kept_min >= dropped_max).all()
    with pytest.raises(ActsparseError, match="divisible"):
        nm_mask(a[:, :10], 2, 4)
    u = exact_topk_mask(a, 64 * n // m)
    assert (u.sum(-1) == 64 * n // m).all()


@pytest.fixture
def store(analysis_store):
    return analysis_store


def test_deployment_tables_views_and_named_query(store):
    path, run_id = store
    batch, nm, neurons = compute_deployment(path, run_id, value=0.8, n_tokens=256, batch_sizes=(1, 4, 16))
    from actsparse.pipeline.reader import StoreReader

    run = StoreReader(str(path)).run(run_id)
    rows = np.nonzero(~run.special_mask())[0][:256]
    a = run.read("intermediate", 1, to="native")[torch.from_numpy(rows)]
    keep = R.topp_mask(a, 0.8)
    b1 = batch.filter((pl.col("layer") == 1) & (pl.col("batch_size") == 1) & (pl.col("batching") == "contiguous"))
    assert b1["union_sparsity"][0] == pytest.approx(float(R.sparsity(keep).mean()), abs=1e-12)
    assert b1["token_sparsity"][0] == pytest.approx(b1["union_sparsity"][0])
    n1 = neurons.filter(pl.col("layer") == 1).sort("neuron")
    assert np.allclose(n1["keep_rate"].to_numpy(), keep.double().mean(0).numpy())
    assert np.allclose(n1["mean_abs"].to_numpy(), a.float().abs().double().mean(0).numpy())
    two = nm.filter((pl.col("layer") == 1) & (pl.col("pattern") == "2:4"))
    assert two["sparsity"][0] == 0.5
    # unstructured top-k at the same sparsity never loses more of the vector than 2:4 (it is the optimum)
    assert (nm["rel_err_unstructured"] <= nm["rel_err_nm"] + 1e-9).all()
    assert nm["out_err_nm"].is_not_null().all()
    st = Store(str(path))
    ident = neurons["analysis_id"][0]
    assert st.sql("SELECT count(*) AS n FROM neurons WHERE analysis_id = $id", id=ident)["n"][0] == neurons.height
    assert st.sql("SELECT count(*) AS n FROM batch_union WHERE analysis_id = $id", id=ident)["n"][0] == batch.height
    ext = st.query("neuron_extremes", run=run_id[:6], on=0.9, off=0.1)
    assert set(ext["kind"].to_list()) <= {"always-on", "never-on"}
    want = int(((neurons["keep_rate"] >= 0.9) | (neurons["keep_rate"] <= 0.1)).sum())
    assert ext.height == want
    with pytest.raises(ActsparseError, match="per-token rule"):
        compute_deployment(path, run_id, rule="threshold", value=0.5)


@pytest.mark.slow
def test_cli_deployment(store):
    path, _ = store
    r = run_cli("deployment", str(path), "--tokens", "128", "--batch-sizes", "1,8", "--patterns", "2:4", "-q")
    assert r.returncode == 0, r.stderr
    assert "batch-union sparsity" in r.stdout and "2:4" in r.stdout
    r = run_cli("deployment", str(path), "--patterns", "2-4", "--no-cache")
    assert r.returncode == 2 and "N:M pairs" in r.stderr
