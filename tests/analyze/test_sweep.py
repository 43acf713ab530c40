"""analyze.sweep against the mask functions of analyze.rules and a float64 brute force.

Kept counts must equal ``rule_mask(...).sum(-1)`` exactly (same thresholds, same ties,
bf16 included). Linear-target errors must match one dense float64 matmul per grid value
within the float32 tolerance documented in ``linear_target_errors``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.analyze.linear_errors import linear_target_errors
from actsparse.analyze.rules import DEFAULT_TOPP_GRID, rule_mask, topp_mask
from actsparse.analyze.sweep import kept_counts, kept_l1, sort_block, sort_order, topp_histogram, topp_kept_counts
from actsparse.core.errors import ActsparseError

DTYPES = (torch.float32, torch.bfloat16)
# Ties, zeros, huge and tiny magnitudes, and values that collapse to ties in bf16.
POOL = [0.0, 0.5, 1.0, 1.0, 2.0, 3.0, 0.001, 1e-30, 65504.0, 3e38, 1.00390625, 1.0078125]


@st.composite
def blocks(draw, max_tokens=6, max_width=24):
    tokens = draw(st.integers(1, max_tokens))
    width = draw(st.integers(1, max_width))
    n = tokens * width
    floats = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    mags = draw(st.lists(st.one_of(st.sampled_from(POOL), floats), min_size=n, max_size=n))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n, max_size=n))
    vals = torch.tensor([m * s for m, s in zip(mags, signs)], dtype=torch.float64).reshape(tokens, width)
    return vals.to(draw(st.sampled_from(DTYPES)))


def heavy_block(tokens, width, dtype, seed):
    """Heavy-tailed random activations with an all-zero token and exact ties mixed in."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(tokens, width, generator=g) * torch.rand(tokens, width, generator=g) ** 4
    a[0] = 0.0
    a[1, : width // 2] = 0.25
    a[2, 3] = 1e4
    return a.to(dtype)


def mask_counts(rule, a, values, power=1.0):
    return torch.stack([rule_mask(rule, a, v, power=power).sum(-1) for v in values], dim=1)


# ----------------------------------------------------------------------------- histogram path


@settings(max_examples=150, deadline=None)
@given(a=blocks(), extra=st.lists(st.floats(0.0, 1.0), max_size=4))
def test_topp_histogram_equals_the_sorted_sweep(a, extra):
    """bf16 blocks (and float32 holding bf16 values) give the sort path's counts and kept L1 exactly."""
    grid = list(DEFAULT_TOPP_GRID) + extra
    for block in (a.to(torch.bfloat16), a.to(torch.bfloat16).float()):
        got = topp_histogram(block, grid)
        assert got is not None
        sb = sort_block(block)
        counts = topp_kept_counts(sb, grid)
        assert torch.equal(got[0], counts)
        # kept mass: summed by groups of equal-exponent values, so equal up to float64 rounding
        torch.testing.assert_close(got[1], kept_l1(sb, counts), rtol=1e-12, atol=0)
        assert torch.equal(got[0], mask_counts("top-p", block, grid))
        counts, _, order = topp_histogram(block, grid, with_order=True)
        assert torch.equal(counts, got[0]) and order.dtype == torch.int32
        assert_segment_order(order, counts, [topp_mask(block, p) for p in grid])


def assert_segment_order(order, counts, keep_masks):
    """``order`` is a permutation per token whose top counts[t, j] entries are exactly grid value j's kept set."""
    n_tok, width = order.shape
    assert torch.equal(order.long().sort(dim=1).values, torch.arange(width).expand(n_tok, width))
    ranks = torch.empty_like(order, dtype=torch.int64).scatter_(1, order.long(), torch.arange(width).expand(n_tok, width))
    for j, keep in enumerate(keep_masks):
        assert torch.equal(ranks >= width - counts[:, j : j + 1], keep)


def test_topp_histogram_on_heavy_blocks_and_float16():
    for dtype in (torch.bfloat16, torch.float16):
        a = heavy_block(64, 1536, dtype, seed=3)
        got = topp_histogram(a, DEFAULT_TOPP_GRID)
        sb = sort_block(a)
        assert torch.equal(got[0], topp_kept_counts(sb, DEFAULT_TOPP_GRID))
        torch.testing.assert_close(got[1], kept_l1(sb, got[0]), rtol=1e-12, atol=0)
        _, _, order = topp_histogram(a, DEFAULT_TOPP_GRID, with_order=True)
        assert_segment_order(order, got[0], [topp_mask(a, p) for p in DEFAULT_TOPP_GRID])
    assert topp_histogram(torch.randn(4, 8), [0.5]) is None  # float32 that is not bf16: needs the sort
    with pytest.raises(ActsparseError, match="NaN"):
        topp_histogram(torch.tensor([[1.0, math.nan]], dtype=torch.bfloat16), [0.5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sort_order_is_a_descending_permutation(dtype):
    a = heavy_block(16, 300, dtype, seed=4).abs()
    for block in (a, a.to(torch.bfloat16).float()):  # the second takes the radix path
        order = sort_order(block)
        assert torch.equal(order.sort(dim=1).values, torch.arange(300).expand(16, 300))
        ranked = block.gather(1, order)
        assert (ranked[:, :-1] >= ranked[:, 1:]).all()
        ascending = block.gather(1, sort_order(block, descending=False))
        assert torch.equal(ascending, ranked.flip(-1))


# ----------------------------------------------------------------------------- kept counts


@settings(max_examples=150, deadline=None)
@given(a=blocks(), power=st.sampled_from([1.0, 2.0]), extra=st.lists(st.floats(0.0, 1.0), max_size=4))
def test_topp_counts_equal_masks(a, power, extra):
    grid = list(DEFAULT_TOPP_GRID) + extra
    sb = sort_block(a, power)
    got = topp_kept_counts(sb, grid)
    assert got.dtype == torch.int64 and got.shape == (a.shape[0], len(grid))
    assert torch.equal(got, mask_counts("top-p", a, grid, power))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("power", [1.0, 1.5, 3.0])
def test_topp_counts_equal_masks_on_random_block(dtype, power):
    a = heavy_block(64, 300, dtype, seed=4)
    got = topp_kept_counts(sort_block(a, power), DEFAULT_TOPP_GRID)
    assert torch.equal(got, mask_counts("top-p", a, DEFAULT_TOPP_GRID, power))


@settings(max_examples=150, deadline=None)
@given(
    a=blocks(),
    fractions=st.lists(st.one_of(st.sampled_from([1.0, 0.5, 0.29, 1e-9]), st.floats(1e-6, 1.0)), min_size=1, max_size=5),
    ps=st.lists(st.one_of(st.sampled_from([0.0, 1.0, 0.3]), st.floats(0.0, 1.0)), min_size=1, max_size=5),
    taus=st.lists(st.one_of(st.sampled_from(POOL + [0.2995]), st.floats(0.0, 1e4)), min_size=1, max_size=5),
)
def test_other_rule_counts_equal_masks(a, fractions, ps, taus):
    sb = sort_block(a)
    for rule, grid in (("top-k", fractions), ("max-p", ps), ("threshold", taus)):
        assert torch.equal(kept_counts(rule, sb, grid), mask_counts(rule, a, grid)), rule


@pytest.mark.parametrize("dtype", DTYPES)
def test_counts_with_infinite_entries(dtype):
    a = torch.tensor([[math.inf, 1.0, -math.inf, 2.0], [1.0, 2.0, 3.0, 0.0]], dtype=dtype)
    sb = sort_block(a)
    for rule, grid in (("top-p", DEFAULT_TOPP_GRID), ("top-k", [0.25, 1.0]), ("max-p", [0.0, 0.5]), ("threshold", [0.0, 1.5])):
        assert torch.equal(kept_counts(rule, sb, grid), mask_counts(rule, a, grid)), rule


def test_sort_block_rejects_nan():
    with pytest.raises(ActsparseError, match="NaN"):
        sort_block(torch.tensor([[1.0, math.nan], [1.0, 2.0]]))


def test_kept_counts_errors():
    sb2 = sort_block(torch.randn(3, 5), power=2.0)
    with pytest.raises(ActsparseError, match="power 1"):
        kept_counts("top-k", sb2, [0.5])
    with pytest.raises(ActsparseError, match="unknown"):
        kept_counts("bottom-k", sort_block(torch.randn(3, 5)), [0.5])
    with pytest.raises(ActsparseError, match=r"\[0, 1\]"):
        topp_kept_counts(sb2, [0.5, 1.2])


# ----------------------------------------------------------------------------- kept L1


@pytest.mark.parametrize("power", [1.0, 2.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kept_l1_equals_masked_l1(power, dtype):
    a = heavy_block(16, 50, dtype, seed=5)
    sb = sort_block(a, power)
    got = kept_l1(sb, topp_kept_counts(sb, DEFAULT_TOPP_GRID))
    mag = a.abs().double()
    for j, p in enumerate(DEFAULT_TOPP_GRID):
        kept = (mag * topp_mask(a, p, power)).sum(-1)
        total = mag.sum(-1)
        ref = torch.where(total > 0, kept / torch.where(total > 0, total, 1.0), 1.0)
        torch.testing.assert_close(got[:, j], ref, rtol=1e-12, atol=1e-12)
    assert (got[0] == 1.0).all()  # the all-zero token


# ----------------------------------------------------------------------------- linear targets


def brute_force(h, keep_masks, w_down, y=None):
    """One float64 dense matmul per grid value; conventions as linear_target_errors."""
    hd, wd = h.double(), w_down.double()
    y = hd @ wd.T if y is None else y.double()
    y_norm = y.norm(dim=-1)
    out = {"rel_err": [], "cos": [], "dropped_norm": [], "y_norm": []}
    for keep in keep_masks:
        d = (hd * ~keep) @ wd.T
        d_norm = d.norm(dim=-1)
        k_norm = (y - d).norm(dim=-1)
        rel = torch.where(y_norm > 0, d_norm / y_norm.clamp_min(1e-300), torch.where(d_norm > 0, math.inf, 0.0))
        cos = torch.where(y_norm * k_norm > 0, (y * (y - d)).sum(-1) / (y_norm * k_norm).clamp_min(1e-300), 0.0)
        cos = torch.where((y_norm == 0) & (k_norm == 0), 1.0, cos)
        for key, val in (("rel_err", rel), ("cos", cos), ("dropped_norm", d_norm), ("y_norm", y_norm)):
            out[key].append(val)
    return {key: torch.stack(vals, dim=1) for key, vals in out.items()}


def assert_errors_close(got, ref, tol=1e-4):
    y_norm = ref["y_norm"]
    assert set(got) == {"rel_err", "cos", "dropped_norm", "y_norm"}
    for key in got:
        assert got[key].dtype == torch.float64 and got[key].shape == ref[key].shape, key
    # Norms: relative to ||y|| (float32 accumulation), and relative to themselves, so
    # that tiny dropped parts at p near 1 are checked too.
    torch.testing.assert_close(got["y_norm"], y_norm, rtol=tol, atol=0.0)
    torch.testing.assert_close(got["dropped_norm"], ref["dropped_norm"], rtol=tol, atol=tol * 1e-2 * float(y_norm.max()))
    finite = torch.isfinite(ref["rel_err"])
    assert torch.equal(finite, torch.isfinite(got["rel_err"]))
    torch.testing.assert_close(got["rel_err"][finite], ref["rel_err"][finite], rtol=tol, atol=tol * 1e-2)
    torch.testing.assert_close(got["cos"], ref["cos"], rtol=0.0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_intermediate_target_errors_match_brute_force(dtype):
    h = heavy_block(40, 96, dtype, seed=6)
    w_down = (torch.randn(24, 96, generator=torch.Generator().manual_seed(7)) / 10).to(dtype)
    sb = sort_block(h)
    counts = topp_kept_counts(sb, DEFAULT_TOPP_GRID)
    got = linear_target_errors(h, sb.order.flip(-1), counts, w_down)
    ref = brute_force(h, [topp_mask(h, p) for p in DEFAULT_TOPP_GRID], w_down)
    assert_errors_close(got, ref)
    assert (got["rel_err"][0] == 0).all() and (got["cos"][0] == 1).all()  # all-zero token


def test_errors_on_the_histogram_order_match_brute_force():
    """The counting partition of topp_histogram (int32, any order within a segment) serves the errors."""
    h = heavy_block(40, 96, torch.bfloat16, seed=12)
    w_down = torch.randn(24, 96, generator=torch.Generator().manual_seed(13)) / 10
    counts, _, order = topp_histogram(h, DEFAULT_TOPP_GRID, with_order=True)
    got = linear_target_errors(h, order, counts, w_down)
    assert_errors_close(got, brute_force(h, [topp_mask(h, p) for p in DEFAULT_TOPP_GRID], w_down))


def test_gate_target_ranks_by_another_tensor():
    gen = torch.Generator().manual_seed(8)
    g = torch.nn.functional.silu(torch.randn(32, 80, generator=gen) * 2).to(torch.bfloat16)
    u = torch.randn(32, 80, generator=gen).to(torch.bfloat16)
    h = u * g
    w_down = torch.randn(20, 80, generator=gen) / 9
    grid = [0.99, 0.5, 0.9, 0.0, 1.0]  # unsorted on purpose
    sb = sort_block(g)
    got = linear_target_errors(h, sb.order.flip(-1), topp_kept_counts(sb, grid), w_down)
    assert_errors_close(got, brute_force(h, [topp_mask(g, p) for p in grid], w_down))


def prefix_masks(sb, counts):
    """Keep masks straight from the definition: the first counts[:, j] entries of sb's order."""
    n_tok, width = sb.order.shape
    ranks = torch.arange(width).expand(n_tok, width)
    return [
        torch.zeros(n_tok, width, dtype=torch.bool).scatter_(1, sb.order, ranks < counts[:, j : j + 1])
        for j in range(counts.shape[1])
    ]


def test_arbitrary_counts_including_nothing_and_everything_kept():
    gen = torch.Generator().manual_seed(9)
    h = torch.randn(12, 40, generator=gen)
    w_down = torch.randn(16, 40, generator=gen)
    sb = sort_block(h)
    counts = torch.stack([torch.zeros(12, dtype=torch.int64), torch.full((12,), 40), torch.randint(0, 41, (12,), generator=gen)], dim=1)
    got = linear_target_errors(h, sb.order.flip(-1), counts, w_down)
    assert_errors_close(got, brute_force(h, prefix_masks(sb, counts), w_down))
    assert torch.equal(got["rel_err"][:, 1], torch.zeros(12, dtype=torch.float64))  # nothing dropped
    assert torch.equal(got["cos"][:, 0], torch.zeros(12, dtype=torch.float64))  # everything dropped
    torch.testing.assert_close(got["rel_err"][:, 0], torch.ones(12, dtype=torch.float64))


def test_given_y_is_the_reference_output():
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(12, 40, generator=gen)
    w_down = torch.randn(16, 40, generator=gen)
    sb = sort_block(h)
    # Keep at least one entry: with a given y the kept output is y - D, so when
    # everything is dropped it is only the rounding difference between y and W_down @ h.
    counts = torch.stack([torch.full((12,), 40), torch.randint(1, 41, (12,), generator=gen), torch.ones(12, dtype=torch.int64)], dim=1)
    y = h.double() @ w_down.double().T
    got = linear_target_errors(h, sb.order.flip(-1), counts, w_down, y=y)
    assert_errors_close(got, brute_force(h, prefix_masks(sb, counts), w_down, y=y))
    # A y that is not W_down @ h shows up in ||y|| and in cos, not in ||D||.
    off = linear_target_errors(h, sb.order.flip(-1), counts, w_down, y=2 * y)
    torch.testing.assert_close(off["dropped_norm"], got["dropped_norm"])
    torch.testing.assert_close(off["y_norm"], 2 * got["y_norm"])


def test_zero_output_conventions():
    # Columns 0 and 1 cancel, so h = e0 + e1 gives y = 0 while dropping one of them does not.
    w_down = torch.randn(4, 3, generator=torch.Generator().manual_seed(10))
    w_down[:, 1] = -w_down[:, 0]
    h = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    sb = sort_block(h)
    counts = torch.tensor([[1, 3], [1, 3]])
    got = linear_target_errors(h, sb.order.flip(-1), counts, w_down)
    assert got["rel_err"].tolist() == [[math.inf, 0.0], [0.0, 0.0]]
    assert got["cos"].tolist() == [[0.0, 1.0], [1.0, 1.0]]


def test_linear_target_errors_rejects_bad_shapes():
    h = torch.randn(4, 6)
    sb = sort_block(h)
    counts = topp_kept_counts(sb, [0.5])
    with pytest.raises(ActsparseError):
        linear_target_errors(h, sb.order.flip(-1), counts, torch.randn(3, 5))
    with pytest.raises(ActsparseError):
        linear_target_errors(h[:3], sb.order.flip(-1), counts, torch.randn(3, 6))
    with pytest.raises(ActsparseError):
        linear_target_errors(h, sb.order.flip(-1), counts + 7, torch.randn(3, 6))
    with pytest.raises(ActsparseError):
        linear_target_errors(h, sb.order.flip(-1), counts, torch.randn(3, 6), y=torch.randn(4, 2))
    with pytest.raises(ActsparseError, match=r"indices in \[0, 6\)"):
        linear_target_errors(h, sb.order.flip(-1) + 1, counts, torch.randn(3, 6))
