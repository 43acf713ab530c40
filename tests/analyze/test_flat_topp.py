"""The authors' flattened diffusion top-p (``actsparse.analyze.flat_topp``): hand-made cases, both paths equal to the
authors' loop (``_topp_sparsify_with_mask``) in every dtype, ragged samples, and bad values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actsparse.analyze.flat_topp import flat_topp_mask, flat_topp_segments
from actsparse.analyze.rules import rule_mask
from actsparse.core.errors import ActsparseError


def authors_flat_topp(tensor: torch.Tensor, p: float, cumsum_dtype=torch.float64) -> torch.Tensor:
    """``_topp_sparsify_with_mask`` of the authors' llada_top_p_at_diff_int.py per sample (p as a fraction), with a
    stable sort."""
    flat = tensor.reshape(tensor.shape[0], -1)
    masks = []
    for i in range(flat.shape[0]):
        abs_vals = flat[i].abs()
        sorted_vals, sorted_indices = torch.sort(abs_vals, descending=True, stable=True)
        cum_sum = torch.cumsum(sorted_vals, dim=0, dtype=cumsum_dtype)
        if cum_sum[-1] > 0:
            cum_sum = cum_sum / cum_sum[-1]
        keep_mask_sorted = cum_sum <= p
        if not keep_mask_sorted.any():
            keep_mask_sorted[0] = True
        mask = torch.zeros_like(abs_vals, dtype=torch.bool)
        mask[sorted_indices[keep_mask_sorted]] = True
        masks.append(mask)
    return torch.stack(masks).view(tensor.shape)


def test_the_sample_shares_one_budget():
    a = torch.tensor([[4.0, -3.0], [2.0, 1.0]])  # sorted 4 3 2 1, normalised cumsum .4 .7 .9 1
    assert flat_topp_mask(a, 0.75).tolist() == [[True, True], [False, False]]
    assert flat_topp_mask(a, 0.9).tolist() == [[True, True], [True, False]]
    assert flat_topp_mask(a, 1.0).all()
    assert flat_topp_mask(a, 0.1).tolist() == [[True, False], [False, False]]  # none within: the largest alone
    assert rule_mask("top-p", a, 0.75).all()  # the per-token rule keeps >= p of each token instead
    assert flat_topp_mask(torch.zeros(2, 2), 0.5).all()  # an all-zero sample keeps everything
    assert flat_topp_mask(torch.ones(2, 2), 0.5).tolist() == [[True, True], [False, False]]  # ties in index order
    two = torch.tensor([[[4.0, 3.0], [2.0, 1.0]], [[1.0, 1.0], [1.0, 97.0]]])  # one budget per leading index
    keep = flat_topp_mask(two, 0.75)
    assert keep[0].tolist() == [[True, True], [False, False]] and keep[1].tolist() == [[False, False], [False, True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.9, 0.999, 1.0])
def test_equal_to_the_authors_loop(dtype, p):
    """The histogram path (16-bit, float64 running sum) and the sort path (else) give the authors' masks."""
    g = torch.Generator().manual_seed(int(p * 1000))
    a = (torch.randn(4, 12, 40, generator=g) * torch.logspace(-6, 2, 40)).to(dtype)
    a[1, :6] = a[1, 0, 0]  # many ties
    a[2] = 0.0  # an all-zero sample
    a[3, 0, 0] = 1e4  # one entry over any budget
    assert torch.equal(flat_topp_mask(a, p), authors_flat_topp(a, p))
    assert torch.equal(flat_topp_mask(a, p, cumsum_dtype=None), authors_flat_topp(a, p, cumsum_dtype=None))


def test_a_wide_dynamic_range_takes_the_entry_by_entry_sum():
    """Magnitudes spanning far more than float64's 53 bits: the running sum rounds, and is added entry by entry
    in the sorted order as torch.cumsum does."""
    a = torch.cat([torch.full((1, 4000), 1e-30), torch.full((1, 10), 3.0), torch.rand(1, 2000)], dim=1).bfloat16()
    for p in (0.5, 0.999999, 1.0):
        assert torch.equal(flat_topp_mask(a[None], p), authors_flat_topp(a[None], p))


def test_non_finite_samples_go_through_the_sort():
    a = torch.randn(2, 8, 16).bfloat16()
    a[0, 3, 3] = float("inf")
    assert torch.equal(flat_topp_mask(a, 0.8), authors_flat_topp(a, 0.8))


def test_the_authors_dtype_cumsum_differs_from_float64():
    a = torch.rand(1, 64, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    exact, authors = flat_topp_mask(a, 0.5), flat_topp_mask(a, 0.5, cumsum_dtype=None)
    assert exact.sum() != authors.sum()  # bf16 accumulation rounds the running sum
    assert abs(int(exact.sum()) - int(authors.sum())) < 0.1 * int(exact.sum())


def test_ragged_segments():
    rows = torch.randn(10, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    starts, stops = np.array([0, 3, 7]), np.array([3, 7, 9])  # row 9 in no sample
    keep = flat_topp_segments(rows, starts, stops, 0.8)
    for a, b in zip(starts, stops):
        assert torch.equal(keep[a:b], flat_topp_mask(rows[a:b], 0.8))
    assert not keep[9].any()


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "x"])
def test_a_value_outside_0_1_is_refused(p):
    with pytest.raises(ActsparseError, match="top-p-flat value"):
        flat_topp_mask(torch.ones(2, 2), p)
    with pytest.raises(ActsparseError, match=r"\[\.\.\., tokens, width\]"):
        flat_topp_mask(torch.ones(3), 0.5)
