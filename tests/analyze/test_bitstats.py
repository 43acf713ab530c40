"""The histogram statistics of analyze.bitstats against the plain rules, on random and adversarial rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actsparse.analyze.bitstats import bit_stats, topp_sweep
from actsparse.analyze.rules import topp_mask
from actsparse.analyze.token_stats import THRESHOLDS, TOPP_VALUES

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _blocks(dtype: torch.dtype):
    """Rows spanning many binades, subnormals, ties, huge and tiny entries, width 1 and 2."""
    g = torch.Generator().manual_seed(1)
    tiny = 1e-30 if dtype == torch.bfloat16 else 1e-7  # subnormal in both formats
    yield "lognormal", torch.exp(torch.randn(64, 333, generator=g) * 4) * torch.sign(torch.randn(64, 333, generator=g))
    yield "gaussian", torch.randn(64, 1536, generator=g)
    yield "ties", (torch.randn(64, 96, generator=g) * 3).round() / 4
    mixed = torch.randn(32, 200, generator=g)
    mixed[:, :50] *= tiny
    mixed[:, 50] = 300.0
    yield "huge-and-tiny", mixed
    yield "width-1", torch.randn(16, 1, generator=g)
    yield "width-2", torch.tensor([[1.0, 1.0], [0.0, 0.0], [-2.0, 0.5], [tiny, -tiny]])


@pytest.mark.parametrize("name", list(DTYPES))
def test_bit_stats_equal_the_rules(name):
    dtype = DTYPES[name]
    for label, rows in _blocks(dtype):
        a = rows.to(dtype)
        out = bit_stats(a.view(torch.int16).numpy(), name, THRESHOLDS, TOPP_VALUES)
        f = a.float()
        np.testing.assert_allclose(out[:, 0], f.abs().double().sum(1).numpy(), rtol=1e-12, err_msg=label)
        np.testing.assert_allclose(out[:, 1], f.double().norm(dim=1).numpy(), rtol=1e-12, err_msg=label)
        np.testing.assert_array_equal(out[:, 2], f.abs().amax(1).double().numpy(), err_msg=label)
        for i, t in enumerate(THRESHOLDS):
            kept = (f.abs() >= t).sum(1).double().numpy()
            np.testing.assert_array_equal(out[:, 4 + i], 1.0 - kept / a.shape[1], err_msg=f"{label} t={t}")
        for i, p in enumerate(TOPP_VALUES):
            kept = topp_mask(a, p).sum(1).double().numpy()
            np.testing.assert_array_equal(out[:, 4 + len(THRESHOLDS) + i], 1.0 - kept / a.shape[1], err_msg=f"{label} p={p}")


def test_bit_stats_at_p_0_and_1_and_special_values():
    a = torch.tensor([[3.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [math.inf, 1.0, -math.inf, 2.0],
                      [1.0, math.nan, 2.0, 3.0]], dtype=torch.bfloat16)
    out = bit_stats(a.view(torch.int16).numpy(), "bfloat16", [1.5], [0.0, 0.8, 1.0])
    # row 0: p=0 keeps the maximum; p=0.8 needs 3 + 1 of 5.5 -> ties at 1 kept -> 3 kept; p=1 keeps all
    np.testing.assert_array_equal(out[0, 5:], [0.75, 0.25, 0.0])
    assert out[0, 0] == 5.5 and out[0, 3] == 3.0 / 5.5 and out[0, 4] == 0.75
    assert np.isnan(out[1, 3]) and list(out[1, 5:]) == [0.0, 0.0, 0.0]  # all-zero row keeps everything
    assert out[2, 0] == math.inf and np.isnan(out[2, 3]) and list(out[2, 5:]) == [0.5, 0.5, 0.5]  # the infinities
    assert np.isnan(out[3]).all()
    for p, col in zip([0.0, 0.8, 1.0], out[:3, 5:].T):
        np.testing.assert_array_equal(col, 1.0 - topp_mask(a[:3], p).sum(1).double().numpy() / 4)


def test_bit_stats_reject_bad_arguments():
    with pytest.raises(ValueError, match="bfloat16, float16"):
        bit_stats(np.zeros((2, 2), np.uint16), "float32", [0.1], [0.5])
    with pytest.raises(ValueError, match="ascending"):
        bit_stats(np.zeros((2, 2), np.uint16), "bfloat16", [0.1], [0.9, 0.5])
    with pytest.raises(ValueError, match="widths up to 8388607"):  # the packed group counts hold 23 bits
        bit_stats(np.zeros((1, 1 << 23), np.uint16), "bfloat16", [0.1], [0.5])
    with pytest.raises(ValueError, match="fewer than 32767 grid values"):
        topp_sweep(np.zeros((1, 2), np.uint16), "bfloat16", np.linspace(0, 1, 0x7FFF), with_order=True)
