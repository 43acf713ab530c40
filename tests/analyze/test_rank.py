"""Effective rank: the Gram-eigenvalue path against numpy's SVD, its bounds, the stored result, view and command."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from actsparse.analyze.rank import compute_rank, effective_rank, effective_rank_of, gram_singular_values
from actsparse.core.errors import ActsparseError
from actsparse.queries.engine import Store
from tests.helpers import run_cli


def svd_erank(a: torch.Tensor) -> float:
    """docs/paper-notes.md §1.6 written out with numpy's float64 SVD."""
    sv = np.linalg.svd(a.double().numpy(), compute_uv=False)
    p = (sv + 1e-10) / (sv + 1e-10).sum()
    return math.exp(-(p * np.log(p)).sum())


def block(kind: str, t: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(t, w, generator=g)
    if kind == "heavy":
        a = a / torch.rand(t, w, generator=g).clamp_min(0.05)  # heavy tails
    elif kind == "outlier":
        a[:, 3] *= 1000.0  # one massive-activation feature
    elif kind == "decay":
        a = a * torch.logspace(0, -4, w)
    elif kind == "bf16":
        a = a.bfloat16()
    return a


@pytest.mark.parametrize("kind", ["gauss", "heavy", "outlier", "decay", "bf16"])
@pytest.mark.parametrize("t, w", [(400, 96), (64, 160)])
def test_matches_numpy_svd(kind, t, w):
    a = block(kind, t, w)
    assert effective_rank(a) == pytest.approx(svd_erank(a), rel=1e-3)
    assert len(gram_singular_values(a)) == min(t, w)


def test_bounds_and_exact_cases():
    # orthogonal rows of equal norm: every singular value equal, erank = their count
    q = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))[0].float()
    assert effective_rank(q[:20]) == pytest.approx(20, rel=1e-4)
    assert effective_rank(torch.ones(30, 8)) == pytest.approx(1.0, abs=0.03)  # rank one (float32 noise)
    assert effective_rank_of(np.zeros(5)) == pytest.approx(5.0)  # eps makes the all-zero block uniform
    a = torch.randn(300, 40)
    assert 1.0 <= effective_rank(a) <= 40 and effective_rank(a[:10]) <= 10 + 1e-6
    with pytest.raises(ActsparseError, match="NaN or inf"):
        effective_rank(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ActsparseError, match="non-empty"):
        effective_rank(torch.zeros(0, 4))


@pytest.fixture
def store(analysis_store):
    return analysis_store


def test_rank_of_a_run_is_stored_and_queryable(store):
    path, run_id = store
    df = compute_rank(path, run_id, token_counts=(32, 128, 100000))
    run = Store(str(path))
    assert set(df["n_tokens"].to_list()) == {32, 128}  # counts above the run's tokens are dropped
    from actsparse.pipeline.reader import StoreReader

    r = StoreReader(str(path)).run(run_id)
    keep = np.nonzero(~r.special_mask())[0][:128]
    a = r.read("intermediate", 2)[torch.from_numpy(keep)]
    row = df.filter((pl.col("site") == "intermediate") & (pl.col("layer") == 2) & (pl.col("n_tokens") == 128))
    assert row["erank"][0] == pytest.approx(svd_erank(a), rel=1e-3)
    assert row["erank_norm"][0] == pytest.approx(row["erank"][0] / a.shape[1])
    assert (df["erank"] <= df["max_rank"] + 1e-6).all()
    # more tokens, higher (or equal) rank: it is bounded by the count
    wide = df.pivot(on="n_tokens", index=["site", "layer"], values="erank")
    assert (wide["128"] >= wide["32"]).all()
    view = run.sql("SELECT count(*) AS n FROM effective_rank WHERE analysis_id = $id", id=df["analysis_id"][0])
    assert view["n"][0] == df.height
    again = compute_rank(path, run_id, token_counts=(32, 128, 100000))
    assert again.equals(df)  # read back from the store
    with pytest.raises(ActsparseError, match="fewer than every requested count"):
        compute_rank(path, run_id, token_counts=(10**7,))


@pytest.mark.slow
def test_cli_rank(store):
    path, run_id = store
    r = run_cli("rank", str(path), "--tokens", "64", "--site", "input", "-q")
    assert r.returncode == 0, r.stderr
    assert "effective rank" in r.stdout and "input" in r.stdout
    r = run_cli("rank", str(path), "--site", "output")
    assert r.returncode == 2 and "has no site 'output'" in r.stderr
