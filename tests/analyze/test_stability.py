"""Mask stability across steps (``actsparse.analyze.stability``): hand-made examples for every metric, the rules
per step, and the in-loop tracker equal to the offline computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actsparse.analyze.flat_topp import flat_topp_mask
from actsparse.analyze.rules import rule_mask
from actsparse.analyze.stability import (
    DELTAS,
    STABILITY_COLUMNS,
    StepMaskTracker,
    mask_stability,
    pair_counts,
    sparsity_per_step,
    stability_by_layer,
    step_masks,
    summarize,
)
from actsparse.core.errors import ActsparseError


def bits(*rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r] for r in rows])


# steps x tokens x width: the worked example of the tests below
MASKS = torch.stack([bits("1100", "1000"), bits("1010", "1000"), bits("0011", "0100")])


def by_key(table) -> dict[tuple[str, int, int], dict]:
    return {(k, int(d), int(s)): {c: table[c][i] for c in STABILITY_COLUMNS}
            for i, (k, d, s) in enumerate(zip(table["kind"], table["delta"], table["step"], strict=True))}


def test_step_masks_per_token_rules_match_analyze_rules():
    acts = torch.randn(3, 2, 5, 16, generator=torch.Generator().manual_seed(1))
    for rule, value in (("top-p", 0.7), ("top-k", 0.25), ("max-p", 0.3), ("threshold", 0.5)):
        assert torch.equal(step_masks(acts, rule, value), rule_mask(rule, acts, value))
    flat = step_masks(acts, "top-p-flat", 0.7)
    assert torch.equal(flat[1, 0], flat_topp_mask(acts[1, 0], 0.7))
    with pytest.raises(ActsparseError, match="unknown rule"):
        step_masks(acts, "top-q", 0.5)
    with pytest.raises(ActsparseError, match=r"\[steps, rows, tokens, width\]"):
        step_masks(acts[0], "top-p", 0.5)


def test_sparsity_per_step():
    masks = torch.stack([bits("1100", "1000"), bits("1110", "0000")])
    assert sparsity_per_step(masks).tolist() == [5 / 8, 5 / 8]
    assert sparsity_per_step(masks, torch.tensor([True, False])).tolist() == [2 / 4, 1 / 4]
    assert sparsity_per_step(masks, torch.tensor([False, True])).tolist() == [3 / 4, 4 / 4]
    with pytest.raises(ActsparseError, match="no tokens selected"):
        sparsity_per_step(masks, torch.tensor([False, False]))


def test_jaccard_worked_example():
    rows = by_key(mask_stability(MASKS, deltas=(2,)))
    c1, c2 = rows[("consecutive", 1, 1)], rows[("consecutive", 1, 2)]
    # step 1 vs 0: token 0 {0,1} vs {0,2}: 1/3; token 1 {0} vs {0}: 1
    assert (c1["n_intersection"], c1["n_union"]) == (2, 4)
    assert c1["global_jaccard"] == 0.5 and math.isclose(c1["token_jaccard"], (1 / 3 + 1) / 2)
    # step 2 vs 1: token 0 {0,2} vs {2,3}: 1/3; token 1 {0} vs {1}: 0
    assert (c2["n_intersection"], c2["n_union"]) == (1, 5)
    assert math.isclose(c2["global_jaccard"], 1 / 5) and math.isclose(c2["token_jaccard"], 1 / 6)
    d2 = rows[("drift", 2, 2)]
    assert (d2["n_intersection"], d2["n_union"], d2["token_jaccard"]) == (0, 6, 0.0)
    assert rows[("drift", 1, 1)]["n_union"] == c1["n_union"]  # drift at step 1 is the consecutive pair
    assert {k: v for k, v in rows[("interval", 2, 2)].items() if k not in ("kind", "delta")} == \
        {k: v for k, v in d2.items() if k not in ("kind", "delta")}
    assert len(rows) == 5  # 2 consecutive, 2 drift, 1 interval (Δ=2 fits once in 3 steps)


def test_summary_pools_steps():
    s = summarize(mask_stability(MASKS, deltas=()))
    assert math.isclose(s[("consecutive", 1)][0], 3 / 9)
    assert math.isclose(s[("consecutive", 1)][1], ((1 / 3 + 1) + (1 / 3 + 0)) / 4)
    assert math.isclose(s[("drift", 0)][0], 2 / 10)


def test_token_selection_and_empty_tokens():
    masks = torch.stack([bits("0000", "1100"), bits("0000", "0110")])
    both = mask_stability(masks, deltas=())
    row = by_key(both)[("consecutive", 1, 1)]
    assert row["token_jaccard"] == (0 + 1 / 3) / 2  # the empty token scores 0, as the in-loop hook
    row = by_key(mask_stability(masks, deltas=(), empty=1.0))[("consecutive", 1, 1)]
    assert row["token_jaccard"] == (1 + 1 / 3) / 2  # analyze_diff_steps.py's convention
    only_second = by_key(mask_stability(masks, tokens=torch.tensor([False, True]), deltas=()))
    assert only_second[("consecutive", 1, 1)]["token_jaccard"] == 1 / 3
    empty = by_key(mask_stability(torch.zeros(2, 1, 3, dtype=torch.bool), deltas=()))
    assert math.isnan(empty[("consecutive", 1, 1)]["global_jaccard"])


def test_pair_counts_broadcasts_the_reference():
    c = pair_counts(MASKS[1:], MASKS[:1])
    assert c.intersection.tolist() == [2, 0] and c.union.tolist() == [4, 6] and c.n_tokens == 2


def test_bad_masks_are_refused():
    with pytest.raises(ActsparseError, match="must be bool"):
        mask_stability(MASKS.float())
    with pytest.raises(ActsparseError, match="token selection has shape"):
        mask_stability(MASKS, tokens=torch.tensor([True]))
    with pytest.raises(ActsparseError, match="intervals must be >= 1"):
        mask_stability(MASKS, deltas=(0,))
    with pytest.raises(ActsparseError, match="2 step ids for 3 steps"):
        mask_stability(MASKS, step_ids=[0, 1])


def sorted_table(t):
    order = np.lexsort((t["step"], t["delta"], t["kind"].astype(str)))
    return {c: t[c][order] for c in STABILITY_COLUMNS}


def assert_tables_equal(a, b):
    a, b = sorted_table(a), sorted_table(b)
    assert len(a["step"]) == len(b["step"]) > 0
    for c in STABILITY_COLUMNS:
        if a[c].dtype == object:
            assert a[c].tolist() == b[c].tolist()
        else:
            np.testing.assert_array_equal(a[c], b[c], err_msg=c)


def test_in_loop_tracker_equals_offline_on_random_masks():
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(40, 3, 5, 32, generator=g) > 0.6
    tokens = torch.rand(3, 5, generator=g) > 0.3
    tracker = StepMaskTracker(tokens=tokens)
    for s in range(40):
        tracker.update(100 + s, masks[s])
    offline = mask_stability(masks, tokens=tokens, step_ids=range(100, 140))
    assert_tables_equal(tracker.table(), offline)
    assert set(offline["delta"][offline["kind"] == "interval"].tolist()) == set(DELTAS)


def test_stability_by_layer_adds_layers_and_sparsity():
    g = torch.Generator().manual_seed(4)
    acts = {layer: torch.randn(6, 2, 4, 16, generator=g) for layer in (0, 1)}
    table, sparsity = stability_by_layer(acts.items(), "top-p", 0.8, deltas=(2,))
    assert sorted(set(table["layer"].tolist())) == [0, 1]
    one = mask_stability(step_masks(acts[1], "top-p", 0.8), deltas=(2,))
    assert_tables_equal({c: table[c][table["layer"] == 1] for c in STABILITY_COLUMNS}, one)
    assert sparsity[0].shape == (6,) and ((sparsity[0] > 0) & (sparsity[0] < 1)).all()
