"""Mixture-of-experts models: resolution (``pipeline.moe``), the experts implementation (``pipeline.experts``), the
recorder (``pipeline.moe_recorder``) and the expert weights (``pipeline.moe_weights``), on tiny random-init models of
four families (``tests.helpers.MOE_KINDS``): Qwen2-MoE (shared expert), Qwen3-MoE (dense first layer), OLMoE, Mixtral.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.expert_ffn import block_output, grouped_linear, routed_sites, shared_sites
from actsparse.pipeline.experts import _HANDLERS, IMPLEMENTATION
from actsparse.pipeline.moe import DenseLayer, check_layout, resolve_moe
from actsparse.pipeline.moe_recorder import MoERecorder
from actsparse.pipeline.moe_weights import moe_weights
from tests.helpers import MOE_KINDS, moe_config

VOCAB = 96
IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
ALL = ("input", "gate", "act", "up", "intermediate", "output")


@functools.cache
def model(kind: str, top_k: int = 2):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = moe_config(kind, VOCAB, top_k, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def capture(kind: str, sites=ALL):
    m = model(kind)
    arch = resolve_moe(m)
    got: dict[tuple[str, int], torch.Tensor] = {}
    with torch.no_grad(), MoERecorder(arch, sites, lambda n, i, t: got.__setitem__((n, i), t.clone())) as rec:
        logits = m(IDS).logits
        rec.check_fired()
    return arch, got, logits


def of_layer(got: dict, layer: int) -> dict[str, torch.Tensor]:
    return {n: t for (n, i), t in got.items() if i == layer}


EXPECTED = {  # moe layers, dense layers, d_shared, renormalized
    "qwen2moe": ((0, 1, 2), (), 24, False),
    "qwen3moe": ((1, 2), (0,), None, True),
    "olmoe": ((0, 1, 2), (), None, False),
    "mixtral": ((0, 1, 2), (), None, True),
}


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_resolve_describes_the_layout(kind):
    layout = resolve_moe(model(kind)).layout
    moe_layers, dense_layers, d_shared, renormalized = EXPECTED[kind]
    assert (layout.moe_layers, layout.dense_layers, layout.d_shared, layout.renormalized) == (
        moe_layers, dense_layers, d_shared, renormalized)
    assert (layout.n_experts, layout.top_k, layout.d_model, layout.d_moe, layout.activation) == (4, 2, 32, 16, "silu")
    assert layout.d_ff_dense == (48 if dense_layers else None)
    assert layout.shared_gate == ("sigmoid" if d_shared else None)
    assert fmt.MoELayout.from_dict(layout.to_dict(), "x") == layout  # the manifest record round-trips


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_captured_logits_equal_the_default_path_which_is_restored(kind):
    m = model(kind)
    with torch.no_grad():
        ref = m(IDS).logits
    _, _, logits = capture(kind)
    assert float((logits - ref).abs().max()) <= 1e-5 * float(ref.abs().max())  # float32: 0.0 on these models
    assert m.get_experts_implementation() == {"": "grouped_mm"} and not _HANDLERS
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, ref)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_captured_sites_are_the_experts_own(kind):
    arch, got, _ = capture(kind)
    T, k, d = IDS.numel(), arch.top_k, arch.d_moe
    for la in arch.layers:
        s = of_layer(got, la.index)
        assert s["input"].shape == s["output"].shape == (T, arch.d_model)
        if isinstance(la, DenseLayer):
            assert set(s) == {"input", "output", *(f"dense/{x}" for x in fmt.EXPERT_SITES)}
            assert s["dense/gate"].shape == (T, arch.d_ff_dense)
            torch.testing.assert_close(s["output"], s["dense/intermediate"] @ la.mlp.down_proj.weight.T.detach())
            continue
        ids, w = s["routed/expert_id"], s["routed/weight"]
        assert ids.shape == w.shape == (T, k) and ids.dtype == torch.int64
        for site in fmt.EXPERT_SITES:
            assert s[f"routed/{site}"].shape == (T, k, d)
        torch.testing.assert_close(s["routed/act"], F.silu(s["routed/gate"]))
        torch.testing.assert_close(s["routed/intermediate"], s["routed/act"] * s["routed/up"])
        # the router saw the dense input: its top-k are the captured ids and weights
        _, weights, top = la.router(s["input"])
        assert torch.equal(top, ids)
        torch.testing.assert_close(weights.to(w.dtype), w)
        # one routed row against its expert's weights directly
        mw = moe_weights(arch, la.index)
        e = int(ids[5, 1])
        torch.testing.assert_close(s["routed/gate"][5, 1], mw["gate"][e] @ s["input"][5])
        torch.testing.assert_close(s["routed/up"][5, 1], mw["up"][e] @ s["input"][5])
        # the block output recomputed from the captured tensors and the weights, shared expert included
        shared = None
        if la.shared is not None:
            shared = {"shared_intermediate": s["shared/intermediate"], "shared_weight": s["shared/weight"]}
            for name, t in shared_sites(s["input"], mw, arch.activation).items():
                torch.testing.assert_close(t, s[name.replace("shared_", "shared/")], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(block_output(s["routed/intermediate"], ids, w, mw, shared), s["output"],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(routed_sites(s["input"], ids, mw, arch.activation)["intermediate"],
                                   s["routed/intermediate"], rtol=1e-5, atol=1e-6)


def test_grouped_linear_is_a_per_row_matmul():
    g = torch.Generator().manual_seed(3)
    a, w = torch.randn(5, 3, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    ids = torch.randint(0, 4, (5, 3), generator=g)
    want = torch.stack([torch.stack([w[ids[t, j]] @ a[t, j] for j in range(3)]) for t in range(5)])
    torch.testing.assert_close(grouped_linear(a, ids, w), want)


def test_capture_of_a_site_subset_and_the_fire_check():
    arch = resolve_moe(model("qwen2moe"))
    seen = []
    with torch.no_grad(), MoERecorder(arch, ("intermediate",), lambda n, i, t: seen.append(n)) as rec:
        model("qwen2moe")(IDS)
        model("qwen2moe")(IDS)
        with pytest.raises(ActsparseError, match="did not fire 1 time"):
            rec.check_fired()
        rec.check_fired(2)
    assert set(seen) == {"routed/expert_id", "routed/weight", "routed/intermediate", "shared/intermediate",
                         "shared/weight"}
    with pytest.raises(ActsparseError, match="unknown or no capture sites"):
        MoERecorder(arch, ("down",), lambda *a: None)


def test_bf16_capture_is_close_to_the_default_path():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(moe_config("mixtral", VOCAB, bos_token_id=1, eos_token_id=2,
                                                    pad_token_id=0)).eval().to(torch.bfloat16)
    dtypes = {}
    with torch.no_grad():
        ref = m(IDS).logits.float()
        with MoERecorder(resolve_moe(m), ALL, lambda n, i, t: dtypes.__setitem__(n, t.dtype)):
            got = m(IDS).logits.float()
    assert dtypes["routed/gate"] == torch.bfloat16 and dtypes["routed/weight"] == torch.float32  # Mixtral: fp32
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0.02)


def test_the_default_path_is_restored_after_an_error_and_outside_a_capture():
    m = model("olmoe")
    arch = resolve_moe(m)
    with pytest.raises(RuntimeError, match="boom"), MoERecorder(arch, ALL, lambda *a: None):
        raise RuntimeError("boom")
    assert m.config._experts_implementation == "grouped_mm" and not _HANDLERS
    m.config._experts_implementation_internal = IMPLEMENTATION
    try:
        with pytest.raises(ActsparseError, match="outside an actsparse capture"), torch.no_grad():
            m(IDS)
    finally:
        m.config._experts_implementation_internal = "grouped_mm"
    with MoERecorder(arch, ALL, lambda *a: None), pytest.raises(ActsparseError, match="already active"), \
            MoERecorder(arch, ALL, lambda *a: None):
        pass


def test_expert_weights_layout_and_copies():
    arch = resolve_moe(model("qwen2moe"))
    la = arch.layers[1]
    w = moe_weights(arch, 1)
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "gate": (4, 16, 32), "up": (4, 16, 32), "down": (4, 32, 16), "router": (4, 32),
        "shared_gate": (24, 32), "shared_up": (24, 32), "shared_down": (32, 24), "shared_expert_gate": (1, 32)}
    # gate first in gate_up_proj (transformers' _default_apply_gate chunks [gate; up])
    assert torch.equal(w["gate"], la.experts.gate_up_proj[:, :16].detach())
    assert torch.equal(w["up"], la.experts.gate_up_proj[:, 16:].detach())
    w["gate"].zero_()
    assert la.experts.gate_up_proj.abs().sum() > 0
    dense = moe_weights(resolve_moe(model("qwen3moe")), 0)
    assert {k: tuple(v.shape) for k, v in dense.items()} == {"gate": (48, 32), "up": (48, 32), "down": (32, 48)}
    with pytest.raises(ActsparseError, match="out of range"):
        moe_weights(arch, 3)


# ---------------------------------------------------------------- refusals


def test_an_unsupported_layout_is_refused_naming_it():
    from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig

    gpt_oss = AutoModelForCausalLM.from_config(moe_config("gptoss", VOCAB))
    with pytest.raises(ActsparseError, match=r"GptOssExperts at model\.layers\.0\.mlp\.experts has .*"
                                             r"is_concatenated=False, is_transposed=True, has_bias=True"):
        resolve_moe(gpt_oss)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    deepseek = DeepseekV3Config(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4,
                                num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
                                kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **common)
    with pytest.raises(ActsparseError, match=r"model\.layers\.1\.mlp is a DeepseekV3MoE, whose combination"):
        resolve_moe(AutoModelForCausalLM.from_config(deepseek))
    with pytest.raises(ActsparseError, match="no mixture-of-experts FFN in LlamaForCausalLM"):
        resolve_moe(AutoModelForCausalLM.from_config(LlamaConfig(intermediate_size=48, **common)))


def test_a_changed_top_k_is_named():
    stored = resolve_moe(model("olmoe")).layout
    with pytest.raises(ActsparseError, match="top_k: stored 2, model 3"):
        check_layout(stored, resolve_moe(model("olmoe", top_k=3)))
    check_layout(stored, resolve_moe(model("olmoe")))
    with pytest.raises(ActsparseError, match="is a mixture-of-experts model, the stored run is not"):
        check_layout(None, resolve_moe(model("olmoe")))


def test_top_k_changed_after_resolve_fails_inside_the_forward():
    m = model("mixtral", top_k=3)
    arch = resolve_moe(m)
    for la in arch.moe_layers:
        la.router.top_k = 2
    try:
        with pytest.raises(ActsparseError, match="top_k=3"), torch.no_grad(), MoERecorder(arch, ALL, lambda *a: None):
            m(IDS)
    finally:
        for la in arch.moe_layers:
            la.router.top_k = 3
