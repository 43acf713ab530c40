"""Closed-loop evaluation of mixture-of-experts models (``analyze.moe_sparsifier``, ``analyze.evaluate``): p = 1
equals the dense model, the realized counts follow the authors' counting, an evaluation attached to a run, and a
top-k changed since collection refused."""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest
import torch

from actsparse.analyze.evaluate import EvalConfig, evaluate
from actsparse.analyze.moe.counting import authors_sparsity, expert_tallies, sparsity_by, token_tally
from actsparse.analyze.moe.targets import target_error
from actsparse.analyze.moe_sparsifier import MoESparsifier
from actsparse.analyze.rules import topp_mask
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import TARGETS
from actsparse.pipeline.moe import resolve_moe
from actsparse.pipeline.moe_weights import moe_weights
from tests.helpers import MOE_KINDS
from tests.pipeline.test_moe_capture import IDS, capture, model


def counted(arch, sp, counts: torch.Tensor) -> list:
    """The sparsifier's points as hook tallies over the batch."""
    from actsparse.analyze.moe.counting import HookTally

    return [HookTally(p.layer, p.unit, p.expert, p.site, p.width, int(sp.rows[k].sum()), int(counts[k].sum()))
            for k, p in enumerate(sp.points)]


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("target", TARGETS)
def test_p1_equals_the_dense_model(kind, target):
    arch, _, dense_logits = capture(kind, sites=("intermediate",))
    valid = torch.ones_like(IDS, dtype=torch.bool)
    valid[0, :3] = False
    with torch.no_grad(), MoESparsifier(arch, target, "top-p", 1.0) as sp:
        sp.begin_batch(valid)
        logits = model(kind)(IDS).logits
        counts = sp.end_batch()
    # top-p at p = 1 drops exact zeros only (none here) and t * True == t: the capture path's bits
    assert torch.equal(logits, dense_logits)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(kind)(IDS).logits, rtol=1e-5, atol=1e-5)
    assert int(counts.sum()) == 0
    n_valid = valid.sum(dim=1)
    for k, p in enumerate(sp.points):
        if p.unit != "expert":
            assert torch.equal(sp.rows[k], n_valid)  # the shared expert and dense FFNs see every token
    for la in arch.moe_layers:
        for site in {p.site for p in sp.points}:
            rows = sum(sp.rows[k] for k, p in enumerate(sp.points) if (p.layer, p.unit, p.site) ==
                       (la.index, "expert", site))
            assert torch.equal(rows, n_valid * arch.top_k)  # each valid token is seen by k experts


@pytest.mark.parametrize("kind", ("qwen2moe", "olmoe", "mixtral"))
@pytest.mark.parametrize("target", ("input", "gate", "intermediate", "all-inputs"))
def test_first_layer_counts_equal_the_offline_tallies(kind, target):
    """Layer 0 sees the same dense input in closed loop as in the capture, so its realized counts per expert and
    for the shared expert equal the offline ones."""
    arch, got, dense_logits = capture(kind)
    s = {n.replace("/", "_").removeprefix("routed_"): t for (n, i), t in got.items() if i == 0}
    valid = torch.ones_like(IDS, dtype=torch.bool)
    valid[1, -2:] = False
    with torch.no_grad(), MoESparsifier(arch, target, "top-p", 0.6) as sp:
        sp.begin_batch(valid)
        logits = model(kind)(IDS).logits
        counts = sp.end_batch()
    assert not torch.allclose(logits, dense_logits)
    r = target_error(target, lambda a: topp_mask(a, 0.6), s["input"], s["expert_id"], s["weight"],
                     moe_weights(arch, 0), arch.activation, s)
    v = valid.reshape(-1)
    offline = [t for site, z in r.zeroed.items()
               for t in expert_tallies(0, site, z, s["expert_id"], arch.n_experts, r.widths[site], v)]
    offline += [token_tally(0, "shared", site, z, r.shared_widths[site], v) for site, z in r.shared_zeroed.items()]
    closed = [t for t in counted(arch, sp, counts) if t.layer == 0]
    assert sorted(offline, key=str) == sorted(closed, key=str)
    assert 0.2 < authors_sparsity(counted(arch, sp, counts)) < 0.9


def test_a_dense_layer_is_one_hook_over_every_token():
    arch = resolve_moe(model("qwen3moe"))
    with torch.no_grad(), MoESparsifier(arch, "intermediate", "top-p", 0.5) as sp:
        sp.begin_batch(torch.ones_like(IDS, dtype=torch.bool))
        model("qwen3moe")(IDS)
        tallies = counted(arch, sp, sp.end_batch())
    dense = [t for t in tallies if t.unit == "dense"]
    assert [(t.layer, t.site, t.width, t.rows) for t in dense] == [(0, "intermediate", 48, IDS.numel())]
    by_layer = sparsity_by(tallies, lambda t: t.layer)
    assert set(by_layer) == {0, 1, 2} and all(0 < v < 1 for v in by_layer.values())


def test_every_point_must_fire_once_per_batch():
    arch = resolve_moe(model("olmoe"))
    with torch.no_grad(), MoESparsifier(arch, "up", "top-p", 0.9) as sp:
        sp.begin_batch(None)
        with pytest.raises(ActsparseError, match="did not fire exactly once"):
            sp.end_batch()
        model("olmoe")(IDS)
        assert sp.end_batch() is None
    with pytest.raises(ActsparseError, match="not supported here"):
        MoESparsifier(arch, "up", "threshold", 0.1)


# ---------------------------------------------------------------- evaluations attached to a run


@pytest.fixture(scope="module")
def evaluated(moe_store, tmp_path_factory):
    path, ids = moe_store
    store = shutil.copytree(path, tmp_path_factory.mktemp("moe-eval") / "S")
    cfg = EvalConfig(target="intermediate", grid=(1.0, 0.8), max_tokens=256, seq_len=64, batch_size=4)
    return store, ids, evaluate(cfg, store, run=ids["qwen2moe"], n_boot=20, log=lambda m: None)


def test_an_evaluation_of_a_moe_run(evaluated):
    store, ids, res = evaluated
    summary = res.summary.sort("value", descending=True)
    assert summary["sparsity"][0] == 0.0 and summary["dnll"][0] == pytest.approx(0.0, abs=1e-6)
    assert 0.1 < summary["sparsity"][1] < 0.9
    experts = res.experts.filter(pl.col("value") == 0.8)
    assert experts.height == 3 * 5  # 3 layers x (4 experts + the shared one), one hook site
    loads = experts.filter(pl.col("unit") == "expert").group_by("layer").agg(pl.col("load").sum())
    assert loads["load"].to_list() == pytest.approx([2.0] * 3)
    # the model-level sparsity is the authors' count over every hook
    rows = experts["rows"] * experts["width"]
    assert summary["sparsity"][1] == pytest.approx(float((experts["sparsity"] * rows).sum() / rows.sum()))
    layers = res.layers.filter((pl.col("value") == 0.8) & (pl.col("layer") >= 0))
    assert layers.height == 3 and (layers["width"] == 2 * 16 + 24).all()
    analysis = store / fmt.run_path(ids["qwen2moe"], fmt.ANALYSIS)
    assert (analysis / fmt.result_file(fmt.EVALUATION_EXPERTS, res.eval_id)).is_file()
    config = json.loads((analysis / fmt.evaluation_parts(res.eval_id) / fmt.EVALUATION_CONFIG).read_text())
    assert config["hooks"][0] == {"layer": 0, "unit": "expert", "expert": 0, "site": "intermediate", "width": 16}


def test_a_top_k_changed_since_collection_is_refused(evaluated, moe_checkpoints, tmp_path):
    store, ids, _ = evaluated
    edited = shutil.copytree(moe_checkpoints["qwen2moe"], tmp_path / "model")
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(config | {"num_experts_per_tok": 3}))
    cfg = EvalConfig(model=str(edited), target="intermediate", grid=(0.9,), max_tokens=256, seq_len=64, batch_size=4)
    with pytest.raises(ActsparseError, match=r"differs from run \w+ \(top_k: stored 2, model 3\)"):
        evaluate(cfg, store, run=ids["qwen2moe"], n_boot=10, log=lambda m: None)
