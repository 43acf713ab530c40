"""Rules in analyze.rules against plain per-row reference implementations.

The references below are written from the rule definitions (docs/paper-notes.md §1.2-1.3, the
authors' get_topp_mask / get_topk_mask / get_maxp_mask) with Python loops over numpy
rows; they never call the code under test. bf16 inputs are handled by reproducing bf16
rounding on float32 bit patterns, so the bf16 threshold numerics are checked too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.analyze.rules import (
    DEFAULT_TOPP_GRID,
    RULES,
    calibrate_threshold,
    maxp_mask,
    rule_mask,
    sparsity,
    threshold_mask,
    topk_mask,
    topp_mask,
)
from actsparse.core.errors import ActsparseError

DTYPES = (torch.float32, torch.bfloat16)


# ----------------------------------------------------------------------------- references


def round_to(dtype: torch.dtype, x) -> np.ndarray:
    """Round float64/float32 values to ``dtype`` (float32 or bfloat16), as float32 numpy.

    float64 -> float32 is numpy's round-to-nearest-even; float32 -> bf16 keeps the top 16
    bits with round-to-nearest-even on the bit pattern (inf/overflow behave like torch).
    """
    with np.errstate(over="ignore"):  # overflow to inf is the intended rounding
        f = np.asarray(x, dtype=np.float64).astype(np.float32)
    if dtype == torch.float32:
        return f
    bits = f.view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32)


def ref_magnitude(row: np.ndarray, dtype: torch.dtype, power: float) -> np.ndarray:
    s = np.abs(row)
    if power != 1.0:
        # Only power 2 is used: the square of a float32 is exact in float64, so one
        # rounding to the dtype reproduces torch's in-dtype pow.
        s = round_to(dtype, s.astype(np.float64) ** power)
    return s


def ref_topp_row(row: np.ndarray, p: float, dtype: torch.dtype, power: float = 1.0) -> np.ndarray:
    s = ref_magnitude(row, dtype, power)
    srt = sorted(s.tolist(), reverse=True)
    cum, c = [], 0.0
    for v in srt:
        c += v
        cum.append(c)
    target = cum[-1] * p
    idx = next((i for i, v in enumerate(cum) if v >= target), 0)
    return s >= srt[idx]


def ref_topk_row(row: np.ndarray, fraction: float) -> np.ndarray:
    s = np.abs(row)
    k = max(int(len(s) * fraction), 1)
    return s >= sorted(s.tolist(), reverse=True)[k - 1]


def ref_maxp_row(row: np.ndarray, p: float, dtype: torch.dtype) -> np.ndarray:
    s = np.abs(row)
    # torch multiplies a tensor by a Python scalar in float32 and rounds to the dtype.
    thr = round_to(dtype, np.float32(s.max()) * np.float32(p))
    return s >= thr


def ref_threshold_row(row: np.ndarray, tau: float, dtype: torch.dtype) -> np.ndarray:
    return np.abs(row) >= round_to(dtype, tau)


def ref_mask(rule: str, a: torch.Tensor, value: float, power: float = 1.0) -> np.ndarray:
    rows = a.float().numpy()
    out = []
    for row in rows:
        if rule == "top-p":
            out.append(ref_topp_row(row, value, a.dtype, power))
        elif rule == "top-k":
            out.append(ref_topk_row(row, value))
        elif rule == "max-p":
            out.append(ref_maxp_row(row, value, a.dtype))
        else:
            out.append(ref_threshold_row(row, value, a.dtype))
    return np.stack(out)


# ----------------------------------------------------------------------------- strategies

# A small pool of magnitudes forces ties, zeros, sign flips and huge/tiny entries.
POOL = [0.0, 0.5, 1.0, 1.0, 2.0, 3.0, 0.001, 1e-30, 65504.0, 3e38, 1.00390625, 1.0078125]


@st.composite
def blocks(draw, max_tokens=5, max_width=24):
    tokens = draw(st.integers(1, max_tokens))
    width = draw(st.integers(1, max_width))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["pool", "float", "mixed"]))
    n = tokens * width
    if kind == "pool":
        mags = draw(st.lists(st.sampled_from(POOL), min_size=n, max_size=n))
    else:
        floats = st.floats(-1e4, 1e4, allow_nan=False, width=32)
        mags = draw(st.lists(floats if kind == "float" else st.one_of(floats, st.sampled_from(POOL)), min_size=n, max_size=n))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n, max_size=n))
    vals = torch.tensor([m * s for m, s in zip(mags, signs)], dtype=torch.float64).reshape(tokens, width)
    return vals.to(dtype)


P_VALUES = st.one_of(st.sampled_from(DEFAULT_TOPP_GRID), st.floats(0.0, 1.0))


def assert_same(mask: torch.Tensor, ref: np.ndarray) -> None:
    assert mask.dtype == torch.bool
    np.testing.assert_array_equal(mask.numpy(), ref)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(a=blocks(), p=P_VALUES)
def test_topp_matches_reference(a, p):
    assert_same(topp_mask(a, p), ref_mask("top-p", a, p))


@settings(max_examples=100, deadline=None)
@given(a=blocks(), p=P_VALUES)
def test_topp_power2_matches_reference(a, p):
    assert_same(topp_mask(a, p, power=2.0), ref_mask("top-p", a, p, power=2.0))


@settings(max_examples=200, deadline=None)
@given(a=blocks(), f=st.one_of(st.sampled_from([1.0, 0.5, 0.29, 1e-9]), st.floats(1e-6, 1.0)))
def test_topk_matches_reference(a, f):
    assert_same(topk_mask(a, f), ref_mask("top-k", a, f))


@settings(max_examples=200, deadline=None)
@given(a=blocks(), p=st.one_of(st.sampled_from([0.0, 1.0, 0.3, 0.5]), st.floats(0.0, 1.0)))
def test_maxp_matches_reference(a, p):
    assert_same(maxp_mask(a, p), ref_mask("max-p", a, p))


@settings(max_examples=200, deadline=None)
@given(a=blocks(), tau=st.one_of(st.sampled_from(POOL + [0.2995, 1.002]), st.floats(0.0, 1e4)))
def test_threshold_matches_reference(a, tau):
    assert_same(threshold_mask(a, tau), ref_mask("threshold", a, tau))


@settings(max_examples=100, deadline=None)
@given(a=blocks())
def test_sparsity_counts_zeroed_entries(a):
    mask = topp_mask(a, 0.9)
    expected = [(~m).sum() / len(m) for m in mask.numpy()]
    got = sparsity(mask)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("dtype", DTYPES)
def test_topp_edges(dtype):
    a = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # all zero: thr 0, everything kept
            [-5.0, 1.0, 1.0, 0.0],  # negative max
            [1e6, 1.0, 1.0, 1.0],  # one huge entry
            [2.0, 2.0, 2.0, 2.0],  # all tied
        ],
        dtype=dtype,
    )
    assert topp_mask(a, 0.5).tolist() == [
        [True] * 4,
        [True, False, False, False],
        [True, False, False, False],
        [True] * 4,
    ]
    # p = 0 keeps the max and its ties; p = 1 drops only zeros (counted as sparse).
    assert topp_mask(a, 0.0).sum(-1).tolist() == [4, 1, 1, 4]
    assert topp_mask(a, 1.0).sum(-1).tolist() == [4, 3, 4, 4]
    assert sparsity(topp_mask(a, 1.0)).tolist() == [0.0, 0.25, 0.0, 0.0]


def test_topp_p1_drops_entries_below_float64_resolution():
    # The authors' p = 1 is "first index where the float64 cumsum reaches the total":
    # 1e-30 does not change a float64 sum of 1e30, so it is dropped.
    a = torch.tensor([[1e30, 1e-30, 0.0]], dtype=torch.float32)
    assert topp_mask(a, 1.0).tolist() == [[True, False, False]]


def test_topp_ties_at_threshold_kept():
    # 60% of the mass is reached at the second 1.0; every 1.0 is kept.
    a = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.5]])
    assert topp_mask(a, 0.6).tolist() == [[True, True, True, True, False]]


def test_topp_bf16_threshold_is_bf16():
    # 1.001 rounds to 1.0 in bf16, tying with the 1.0 entry: ranking, threshold and ties
    # happen on the bf16 values, not on the float32 source.
    src = torch.tensor([[1.001, 1.0, 1.0078125, 0.5]])
    assert topp_mask(src, 0.3).tolist() == [[True, False, True, False]]
    assert topp_mask(src.to(torch.bfloat16), 0.3).tolist() == [[True, True, True, False]]
    assert topp_mask(src.to(torch.bfloat16), 0.2).tolist() == [[False, False, True, False]]


def test_width_one():
    for dtype in DTYPES:
        a = torch.tensor([[3.0], [0.0], [-2.0]], dtype=dtype)
        for rule, v in [("top-p", 0.0), ("top-p", 1.0), ("top-k", 0.01), ("max-p", 1.0)]:
            assert rule_mask(rule, a, v).all(), rule
        assert threshold_mask(a, 2.5).tolist() == [[True], [False], [False]]


def test_topk_keeps_at_least_one_and_ties():
    a = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    assert topk_mask(a, 0.01).tolist() == [[False, True, True, False]]  # k = max(0, 1)
    assert topk_mask(a, 0.75).sum().item() == 3


def test_maxp_product_is_torch_scalar_arithmetic():
    # float32 * Python scalar multiplies in float32 (p rounded to float32 first): the
    # threshold is 0.030974365..., above the float64 product 0.030974363..., which is the
    # second entry; a float64 threshold would keep it.
    a = torch.tensor([[0.10324788093566895, 0.030974363908171654]], dtype=torch.float32)
    assert maxp_mask(a, 0.3).tolist() == [[True, False]]


def test_maxp_all_zero_row_keeps_everything():
    assert maxp_mask(torch.zeros(2, 3), 0.5).all()


def test_infinite_entries_follow_authors():
    a = torch.tensor([[math.inf, 1.0, 2.0], [math.nan, 1.0, 2.0]])
    assert topp_mask(a, 0.5).tolist() == [[True, False, False], [False, False, False]]


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("target", [0.0, 0.1, 0.37, 0.5, 0.9, 0.999, 1.0])
def test_calibrate_threshold_hits_target_on_continuous_data(target):
    a = torch.randn(97, 103, generator=torch.Generator().manual_seed(1))
    tau = calibrate_threshold(a, target)
    got = float(sparsity(threshold_mask(a, tau)).mean())
    assert abs(got - target) <= 1.0 / a.numel()


def test_calibrate_threshold_bf16_is_representable_and_never_overshoots():
    a = torch.randn(64, 200, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for target in (0.25, 0.5, 0.8, 1.0):
        tau = calibrate_threshold(a, target)
        assert float(torch.tensor(tau).to(torch.bfloat16)) == tau
        got = float(sparsity(threshold_mask(a, tau)).mean())
        # bf16 has many ties; they are kept, so sparsity can only fall short.
        assert got <= target + 1.0 / a.numel()
    assert float(sparsity(threshold_mask(a, calibrate_threshold(a, 1.0))).mean()) == 1.0


def test_calibrate_threshold_rejects_bad_input():
    with pytest.raises(ActsparseError):
        calibrate_threshold(torch.randn(10), 1.5)
    with pytest.raises(ActsparseError):
        calibrate_threshold(torch.empty(0), 0.5)
    with pytest.raises(ActsparseError):
        calibrate_threshold(torch.tensor([1.0, math.nan]), 0.5)


# ----------------------------------------------------------------------------- dispatch


def test_rule_mask_dispatches():
    a = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(rule_mask("top-p", a, 0.7, power=2.0), topp_mask(a, 0.7, power=2.0))
    assert torch.equal(rule_mask("top-k", a, 0.3), topk_mask(a, 0.3))
    assert torch.equal(rule_mask("max-p", a, 0.3), maxp_mask(a, 0.3))
    assert torch.equal(rule_mask("threshold", a, 0.3), threshold_mask(a, 0.3))
    assert RULES == ("top-p", "top-k", "max-p", "threshold", "wina-top-k", "wina-top-p", "cett")


def test_default_grid_is_the_papers():
    assert len(DEFAULT_TOPP_GRID) == 26
    assert DEFAULT_TOPP_GRID[0] == 1.0 and DEFAULT_TOPP_GRID[-1] == 0.0
    assert list(DEFAULT_TOPP_GRID) == sorted(DEFAULT_TOPP_GRID, reverse=True)


@pytest.mark.parametrize(
    ("rule", "value", "power", "needle"),
    [
        ("top-q", 0.5, 1.0, "unknown sparsification rule"),
        ("top-p", 1.5, 1.0, "[0, 1]"),
        ("top-p", -0.1, 1.0, "[0, 1]"),
        ("top-p", math.nan, 1.0, "[0, 1]"),
        ("max-p", 2.0, 1.0, "[0, 1]"),
        ("top-k", 0.0, 1.0, "(0, 1]"),
        ("threshold", -1.0, 1.0, ">= 0"),
        ("threshold", math.inf, 1.0, ">= 0"),
        ("top-p", 0.5, 0.5, "power"),
        ("top-k", 0.5, 2.0, "only to the top-p"),
        ("top-p", "x", 1.0, "numbers"),
    ],
)
def test_rule_mask_errors_are_one_line(rule, value, power, needle):
    with pytest.raises(ActsparseError) as info:
        rule_mask(rule, torch.ones(2, 3), value, power=power)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_rejects_non_float_and_empty_blocks():
    with pytest.raises(ActsparseError):
        topp_mask(torch.ones(2, 3, dtype=torch.int64), 0.5)
    with pytest.raises(ActsparseError):
        topp_mask(torch.ones(2, 0), 0.5)
