"""Offline analysis of mixture-of-experts runs (``analyze.moe``): the block-output error equals an in-model hooked
expert FFN, the one-pass linear sweep equals per-value recomputation, the authors' counting on hand-made examples,
and the curves, expert rows and named query of stored runs."""

from __future__ import annotations

import functools
import shutil

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from actsparse.analyze.curves import compute_curves
from actsparse.analyze.curves.config import CurveConfig
from actsparse.analyze.moe import expert_curves
from actsparse.analyze.moe.blocks import MoEBlock
from actsparse.analyze.moe.counting import (
    authors_sparsity,
    expert_tallies,
    merge_tallies,
    sparsity_by,
    token_tally,
)
from actsparse.analyze.moe.grid import target_block
from actsparse.analyze.moe.targets import target_error
from actsparse.analyze.moe_sparsifier import MoESparsifier
from actsparse.analyze.rules import rule_mask, topp_mask
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import TARGETS
from actsparse.pipeline.reader import StoreReader
from tests.helpers import MOE_KINDS


def keep_p(p: float):
    return functools.partial(topp_mask, p=p)


def block_of(moe_store, kind: str, layer: int | None = None, stop: int = 64):
    """A block of the first tokens of a MoE layer (default: the last) of the float32 run of ``kind``."""
    path, ids = moe_store
    run = StoreReader(str(path)).run(ids[kind])
    layer = run.moe.moe_layers[-1] if layer is None else layer
    return run, MoEBlock(run, layer, 0, stop, None, run.expert_weights(layer))


def offline(target: str, blk: MoEBlock, rule: str, values) -> tuple[dict, dict]:
    """The block's per-token layer results and per-row unit results of ``analyze.moe.grid.target_block``."""
    layer, units = {}, {}
    cfg = CurveConfig((target,), (rule,), {rule: tuple(values)})
    target_block(target, blk, cfg, {}, lambda key, *a: layer.setdefault(key, a),
                 lambda key, unit, *a: units.setdefault(unit, a))
    return next(iter(layer.values())), units


def expert_ffn(target: str, keep, x, wg, wu, wd):
    """One expert on one token's row, sparsified as a per-expert module hook would (the authors' hooks)."""
    if target in ("input", "all-inputs"):
        x = x * keep(x)
    a, u = F.silu(x @ wg.T), x @ wu.T
    if target == "gate":
        a = a * keep(a)
    if target == "up":
        u = u * keep(u)
    h = a * u
    if target in ("intermediate", "all-inputs"):
        h = h * keep(h)
    return h @ wd.T


def naive_block(target: str, keep, x, ids, routing, w):
    """The MoE block output token by token and slot by slot, shared expert included."""
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        row = x[t:t + 1]
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            y[t] += routing[t, j] * expert_ffn(target, keep, row, w["gate"][e], w["up"][e], w["down"][e])[0]
        if "shared_gate" in w:
            s = torch.sigmoid(row @ w["shared_expert_gate"].T)[0, 0]
            y[t] += s * expert_ffn(target, keep, row, w["shared_gate"], w["shared_up"], w["shared_down"])[0]
    return y


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("target", TARGETS)
def test_offline_error_equals_an_in_model_hooked_expert_ffn(kind, target, moe_store, moe_checkpoints):
    from transformers import AutoModelForCausalLM

    from actsparse.pipeline.moe import resolve_moe

    run, blk = block_of(moe_store, kind)
    (counts, kept_l1, errs, _), units = offline(target, blk, "top-p", (1.0, 0.7))
    x, ids, w = blk.input(), blk.expert_ids, blk.weights
    y = naive_block("intermediate", lambda a: torch.ones_like(a, dtype=torch.bool), x, ids, blk.routing, w)
    y_naive = naive_block(target, keep_p(0.7), x, ids, blk.routing, w)
    arch = resolve_moe(AutoModelForCausalLM.from_pretrained(moe_checkpoints[kind]).eval())
    la = arch.layers[blk.layer]
    with torch.no_grad(), MoESparsifier(arch, target, "top-p", 0.7) as sp:
        sp.begin_batch(None)
        y_model = la.block(x[None])[0]
    torch.testing.assert_close(y_model, y_naive, rtol=1e-4, atol=1e-5)
    rel = (y - y_model).double().norm(dim=-1) / y.double().norm(dim=-1)
    torch.testing.assert_close(errs["rel_err"][:, 1], rel, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(errs["cos"][:, 1], F.cosine_similarity(y.double(), y_model.double(), dim=-1),
                               rtol=1e-5, atol=1e-6)
    assert float(errs["rel_err"][:, 1].mean()) > 1e-3  # p = 0.7 changes the output
    assert float(errs["rel_err"][:, 0].max()) < 1e-6 and bool((counts[:, 0] > 0).all())  # p = 1 keeps it


@pytest.mark.parametrize("kind", ("qwen2moe", "olmoe"))
def test_offline_gate_error_equals_hooks_on_the_eager_experts_act_fn(kind, moe_store, moe_checkpoints):
    """Under transformers' eager experts implementation a hook on experts.act_fn fires once per hit expert with
    its routed rows, as the authors' experts.E.act_fn hooks did: sparsifying there gives the offline result."""
    from transformers import AutoModelForCausalLM

    from actsparse.pipeline.moe import resolve_moe

    run, blk = block_of(moe_store, kind, layer=0)
    (_, _, errs, _), _ = offline("gate", blk, "top-p", (0.6,))
    model = AutoModelForCausalLM.from_pretrained(moe_checkpoints[kind]).eval()
    la = resolve_moe(model).layers[0]
    x = blk.input()
    fires = []

    def hook(module, args, out):
        fires.append(out.shape[0])
        return out * topp_mask(out, 0.6)

    acts = [la.experts.act_fn] + ([la.shared.act_fn] if la.shared is not None else [])
    handles = [a.register_forward_hook(hook) for a in acts]
    model.set_experts_implementation("eager")
    try:
        with torch.no_grad():
            y_eager = la.block(x[None])[0]
            model.set_experts_implementation("grouped_mm")
            for h in handles:
                h.remove()
            y = la.block(x[None])[0]
    finally:
        model.set_experts_implementation("grouped_mm")
    hit = int((torch.bincount(blk.expert_ids.reshape(-1), minlength=4) > 0).sum())
    assert len(fires) == hit + (la.shared is not None)
    rel = (y - y_eager).double().norm(dim=-1) / y.double().norm(dim=-1)
    torch.testing.assert_close(errs["rel_err"][:, 0], rel, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ("qwen2moe", "qwen3moe"))
@pytest.mark.parametrize("target", ("intermediate", "gate", "up"))
@pytest.mark.parametrize("rule, grid", [("top-p", (1.0, 0.9, 0.6, 0.2)), ("top-k", (1.0, 0.5, 0.25)),
                                        ("max-p", (0.0, 0.05, 0.3))])
def test_the_one_pass_linear_sweep_equals_recomputing_every_value(kind, target, rule, grid, moe_store):
    run, blk = block_of(moe_store, kind, layer=0 if kind == "qwen3moe" else None)  # qwen3moe: its dense layer
    (counts, _, errs, _), units = offline(target, blk, rule, grid)
    dense = {s: blk.routed(s) for s in ("act", "up", "intermediate")}
    if blk.has_shared:
        dense |= {f"shared_{s}": blk.shared(s) for s in ("act", "up", "intermediate", "weight")}
    for j, v in enumerate(grid):
        r = target_error(target, lambda a, v=v: rule_mask(rule, a, v), blk.input(), blk.expert_ids, blk.routing,
                         blk.weights, run.moe.activation, dense)
        for name in ("rel_err", "cos", "dropped_norm"):
            torch.testing.assert_close(errs[name][:, j], getattr(r, name), rtol=1e-4, atol=1e-6)
        unit, shared = units[blk.unit], units.get("shared")
        assert torch.equal(unit[1][:, j], sum(r.zeroed.values()).reshape(-1))
        torch.testing.assert_close(unit[2][:, j], r.slot_rel_err.reshape(-1), rtol=1e-4, atol=1e-6)
        if shared is not None:
            assert torch.equal(shared[1][:, j], sum(r.shared_zeroed.values()))
            torch.testing.assert_close(shared[2][:, j], r.shared_rel_err, rtol=1e-4, atol=1e-6)
        width = blk.expert_ids.shape[1] * blk.weights["down"].shape[2] + (run.moe.d_shared if blk.has_shared else 0)
        zeroed = sum(z.sum(dim=1) for z in r.zeroed.values()) + sum(r.shared_zeroed.values(), 0)
        assert torch.equal(counts[:, j], width - zeroed)


# ---------------------------------------------------------------- the authors' counting


def test_authors_counting_hand_made():
    # 3 tokens, top-1, 2 experts of width 4, a shared expert of width 6, a dense layer of width 5
    ids, zeroed = torch.tensor([[0], [0], [1]]), torch.tensor([[1], [3], [4]])
    experts = expert_tallies(0, "intermediate", zeroed, ids, 2, 4)
    assert [(t.expert, t.rows, t.zeroed, t.sparsity) for t in experts] == [(0, 2, 4, 0.5), (1, 1, 4, 1.0)]
    shared = token_tally(0, "shared", "intermediate", torch.tensor([0, 3, 3]), 6)
    assert shared.sparsity == pytest.approx(6 / 18)
    layer0 = [*experts, shared]
    # hooks weigh by rows x width: (4 + 4 + 6) / (8 + 4 + 18), not the mean of the hooks' sparsities
    assert authors_sparsity(layer0) == pytest.approx(14 / 30)
    assert authors_sparsity(experts) == pytest.approx(8 / 12) != pytest.approx((0.5 + 1.0) / 2)
    dense = token_tally(1, "dense", "intermediate", torch.tensor([5, 0, 1]), 5)
    assert authors_sparsity([*layer0, dense]) == pytest.approx(20 / 45)
    assert sparsity_by([*layer0, dense], lambda t: t.layer) == pytest.approx({0: 14 / 30, 1: 6 / 15})
    # invalid tokens are not counted (token 1 dropped)
    valid = torch.tensor([True, False, True])
    masked = [*expert_tallies(0, "intermediate", zeroed, ids, 2, 4, valid),
              token_tally(0, "shared", "intermediate", torch.tensor([0, 3, 3]), 6, valid)]
    assert [t.sparsity for t in masked] == [0.25, 1.0, 0.25] and authors_sparsity(masked) == pytest.approx(8 / 20)
    # top-2: a token counts once per slot, at the expert it was routed to
    two = expert_tallies(0, "gate", torch.tensor([[0, 2], [4, 2]]), torch.tensor([[0, 1], [1, 0]]), 2, 4)
    assert [(t.rows, t.zeroed) for t in two] == [(2, 2), (2, 6)] and authors_sparsity(two) == pytest.approx(0.5)
    assert [(t.rows, t.zeroed) for t in merge_tallies(experts + experts)] == [(4, 8), (2, 8)]
    with pytest.raises(ActsparseError, match="widths 4 and 5"):
        merge_tallies([*experts, expert_tallies(0, "intermediate", zeroed, ids, 2, 5)[0]])


def test_authors_counting_through_the_input_target():
    """A hand-made 2-expert layer: the input target zeroes the same entries in each slot of a token, and every
    routed row is counted at its expert (d_model 4, rule |x| >= 1)."""
    x = torch.tensor([[2.0, 0.5, 0.0, 3.0], [0.1, 0.2, 5.0, 0.3], [1.0, 1.0, 1.0, 1.0]])
    ids, routing = torch.tensor([[0, 1], [1, 0], [1, 0]]), torch.full((3, 2), 0.5)
    g = torch.Generator().manual_seed(0)
    w = {"gate": torch.randn(2, 3, 4, generator=g), "up": torch.randn(2, 3, 4, generator=g),
         "down": torch.randn(2, 4, 3, generator=g)}
    keep = lambda a: a.abs() >= 1.0  # noqa: E731
    r = target_error("input", keep, x, ids, routing, w, "silu")
    assert r.zeroed["input"].tolist() == [[2, 2], [3, 3], [0, 0]]
    tallies = expert_tallies(0, "input", r.zeroed["input"], ids, 2, 4)
    assert [(t.expert, t.rows, t.zeroed) for t in tallies] == [(0, 3, 5), (1, 3, 5)]
    assert authors_sparsity(tallies) == pytest.approx(10 / 24)
    full = naive_block("intermediate", lambda a: torch.ones_like(a, dtype=torch.bool), x, ids, routing, w)
    sparse = naive_block("input", keep, x, ids, routing, w)
    torch.testing.assert_close(r.rel_err, (full - sparse).double().norm(dim=-1) / full.double().norm(dim=-1),
                               rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- curves of stored runs


@pytest.fixture(scope="module")
def store_copy(moe_store, tmp_path_factory):
    path, ids = moe_store
    return shutil.copytree(path, tmp_path_factory.mktemp("moe-curves") / "S"), ids


def test_curves_count_as_the_authors_at_layer_and_model_level(store_copy):
    path, ids = store_copy
    grid = (1.0, 0.9, 0.5)
    curves = compute_curves(path, ids["qwen3moe"], targets=("intermediate",), grids={"top-p": grid})
    experts = expert_curves(path, ids["qwen3moe"], targets=("intermediate",), grids={"top-p": grid})
    run = StoreReader(str(path)).run(ids["qwen3moe"])
    assert set(curves["layer"].to_list()) == {-1, 0, 1, 2}
    layers = curves.filter(pl.col("layer") >= 0)
    assert layers.filter(pl.col("layer") == 0)["width"][0] == 48  # the dense layer: one FFN of d_ff 48
    assert layers.filter(pl.col("layer") == 1)["width"][0] == 2 * 16  # a MoE layer: k rows of d_moe
    n_tokens = layers["n_tokens"][0]
    for value in grid:
        at = experts.filter(pl.col("value") == value)
        for layer in (0, 1, 2):
            mine = at.filter(pl.col("layer") == layer)
            row = layers.filter((pl.col("layer") == layer) & (pl.col("value") == value)).row(0, named=True)
            # a layer's sparsity is its hooks' zeroed entries over their rows x widths
            zeroed = (mine["sparsity"] * mine["rows"] * mine["width"]).sum()
            assert row["sparsity_mean"] == pytest.approx(zeroed / (mine["rows"] * mine["width"]).sum())
            assert mine["load"].sum() == pytest.approx(1.0 if layer == 0 else 2.0)  # loads sum to k
        model = curves.filter((pl.col("layer") == -1) & (pl.col("value") == value)).row(0, named=True)
        entries = layers.filter(pl.col("value") == value).with_columns(e=pl.col("width") * pl.col("n_tokens"))
        assert model["sparsity_mean"] == pytest.approx((entries["sparsity_mean"] * entries["e"]).sum()
                                                       / entries["e"].sum())
    top = curves.filter((pl.col("layer") == -1) & (pl.col("value") == 1.0)).row(0, named=True)
    assert top["sparsity_mean"] == 0.0 and top["rel_err_mean"] == 0.0
    assert n_tokens == int((~run.special_mask()).sum())
    # cached: the result files are in the store, read back by a second call
    names = {p.name.split("-")[0] for p in (path / "runs" / ids["qwen3moe"] / "analysis").iterdir()}
    assert {"curves", "expert_curves", "critical"} <= names
    assert compute_curves(path, ids["qwen3moe"], targets=("intermediate",), grids={"top-p": grid}).equals(curves)


def test_every_rule_and_target_of_a_shared_expert_run(store_copy):
    path, ids = store_copy
    grids = {"top-p": (1.0, 0.8), "top-k": (1.0, 0.5), "max-p": (0.0, 0.2), "threshold": (0.0, 0.5)}
    curves = compute_curves(path, ids["qwen2moe"], targets=TARGETS, rules=tuple(grids), grids=grids,
                            use_cache=False)
    model = curves.filter(pl.col("layer") == -1)
    assert model.height == len(TARGETS) * 8
    half = model.filter((pl.col("rule") == "threshold") & (pl.col("value") == 0.5))
    for row in half.iter_rows(named=True):  # tau calibrated per layer and unit on other windows
        assert row["sparsity_mean"] == pytest.approx(0.5, abs=0.12), row["target"]
    assert (model.filter(pl.col("value") == 1.0).filter(pl.col("rule") == "top-p")["rel_err_mean"] < 1e-6).all()


def test_the_expert_profile_query(store_copy):
    from actsparse.queries.engine import Store

    path, ids = store_copy
    compute_curves(path, ids["qwen2moe"], targets=("intermediate",), grids={"top-p": (1.0, 0.9)})
    with Store(path) as st:
        df = st.query("expert_profile", run=ids["qwen2moe"], value=0.9)
    assert df.height == 3 * 5  # 3 layers x (4 experts + the shared one)
    assert set(df["unit"].to_list()) == {"expert", "shared"}
    assert df.filter(pl.col("unit") == "shared")["load"].to_list() == [1.0, 1.0, 1.0]
    assert df.group_by("layer").agg(pl.col("load").filter(pl.col("unit") == "expert").sum())["load"].to_list() \
        == pytest.approx([2.0, 2.0, 2.0])
    assert ((df["sparsity"] > 0) & (df["sparsity"] < 1) & (df["rel_err_mean"] > 0)).all()


def test_bad_input_is_refused(moe_checkpoints, text_corpus, two_model_store, tmp_path):
    from actsparse import CollectConfig, collect

    res = collect(CollectConfig(model=str(moe_checkpoints["olmoe"]), corpus=str(text_corpus), max_tokens=100,
                                seq_len=32, sites=("intermediate",)), tmp_path / "S", progress=False,
                  log=lambda m: None)
    with pytest.raises(ActsparseError, match=r"target 'gate' needs site\(s\) gate \(or 'input'"):
        compute_curves(tmp_path / "S", res.run_id, targets=("gate",))
    dense, llama, _ = two_model_store
    with pytest.raises(ActsparseError, match="is not a mixture-of-experts run"):
        expert_curves(dense, llama)
