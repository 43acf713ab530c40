"""pipeline.sites: structural FFN resolution, site hooks and recomputation, on tiny random models."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    Gemma2Config,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    SiglipVisionConfig,
)

from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import SITES
from actsparse.pipeline.ffn import ffn_recompute, ffn_weights
from actsparse.pipeline.recorder import SiteRecorder
from actsparse.pipeline.sites import resolve_ffn

D_MODEL, D_FF, N_LAYERS, VOCAB = 32, 64, 2, 128
TINY = dict(
    hidden_size=D_MODEL,
    intermediate_size=D_FF,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
)


def _causal(config) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _base(config) -> nn.Module:
    torch.manual_seed(0)
    return AutoModel.from_config(config).eval()


# id -> (model factory, expected pattern, activation, layers_path, has biases)
ARCHS: dict[str, tuple[Callable[[], nn.Module], str, str, str, bool]] = {
    "llama": (lambda: _causal(LlamaConfig(**TINY)), "glu", "silu", "model.layers", False),
    "llama-relu-bias": (
        lambda: _causal(LlamaConfig(**TINY, hidden_act="relu", mlp_bias=True)),
        "glu",
        "relu",
        "model.layers",
        True,
    ),
    "mistral": (lambda: _causal(MistralConfig(**TINY)), "glu", "silu", "model.layers", False),
    "qwen2": (lambda: _causal(Qwen2Config(**TINY)), "glu", "silu", "model.layers", False),
    "qwen3": (lambda: _causal(Qwen3Config(**TINY, head_dim=8)), "glu", "silu", "model.layers", False),
    # Gemma 1 reads config.hidden_act, Gemma 2/3 config.hidden_activation.
    "gemma": (lambda: _causal(GemmaConfig(**TINY, head_dim=8)), "glu", "gelu_pytorch_tanh", "model.layers", False),
    "gemma2": (lambda: _causal(Gemma2Config(**TINY, head_dim=8)), "glu", "gelu_pytorch_tanh", "model.layers", False),
    "gemma3": (
        lambda: _causal(Gemma3TextConfig(**TINY, head_dim=8)),
        "glu",
        "gelu_pytorch_tanh",
        "model.layers",
        False,
    ),
    # guards P12: fused gate_up_proj chunked as (gate, up), activation_fn instead of act_fn
    "phi3": (lambda: _causal(Phi3Config(**TINY, pad_token_id=0)), "glu-fused", "silu", "model.layers", False),
    "gpt2": (
        lambda: _causal(
            GPT2Config(n_embd=D_MODEL, n_inner=D_FF, n_layer=N_LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64)
        ),
        "mlp",
        "gelu_new",
        "transformer.h",
        True,
    ),
    "gpt_neox": (
        lambda: _causal(GPTNeoXConfig(**{k: v for k, v in TINY.items() if k != "num_key_value_heads"})),
        "mlp",
        "gelu",
        "gpt_neox.layers",
        True,
    ),
    # The FFN root is the decoder layer itself, and OPT flattens tokens to [tokens, d_model] before fc1.
    "opt": (
        lambda: _causal(
            OPTConfig(
                hidden_size=D_MODEL,
                ffn_dim=D_FF,
                num_hidden_layers=N_LAYERS,
                num_attention_heads=4,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                word_embed_proj_dim=D_MODEL,
            )
        ),
        "mlp",
        "relu",
        "model.decoder.layers",
        True,
    ),
    "bert": (
        lambda: _base(
            BertConfig(**{k: v for k, v in TINY.items() if k != "num_key_value_heads"}, max_position_embeddings=64)
        ),
        "mlp",
        "gelu",
        "encoder.layer",
        True,
    ),
}


def _record(model: nn.Module, arch, sites=None) -> tuple[dict[tuple[str, int], torch.Tensor], SiteRecorder]:
    captured: dict[tuple[str, int], torch.Tensor] = {}
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with SiteRecorder(arch, sites or arch.sites, lambda s, i, t: captured.__setitem__((s, i), t)) as recorder:
        with torch.no_grad():
            model(input_ids=ids)
        recorder.check_fired()  # guards P11: every hook fired exactly once for the batch
    return captured, recorder


def _hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", list(ARCHS))
def test_sites_reproduce_the_model(name: str) -> None:
    factory, pattern, activation, layers_path, biased = ARCHS[name]
    model = factory()
    arch = resolve_ffn(model)  # guards P1: found by structure, the path is only checked here
    assert (arch.pattern, arch.activation, arch.layers_path) == (pattern, activation, layers_path)
    assert (arch.d_model, arch.d_ff, len(arch.layers)) == (D_MODEL, D_FF, N_LAYERS)
    assert arch.sites == (SITES if arch.glu else tuple(s for s in SITES if s != "up"))
    described = json.loads(json.dumps(arch.describe()))
    assert described["n_layers"] == N_LAYERS
    assert described["layer0_modules"]["gate"].startswith(f"{layers_path}.0")

    captured, _ = _record(model, arch)
    assert {site for site, _ in captured} == set(arch.sites)
    widths = {"input": D_MODEL, "output": D_MODEL}
    for (site, _), tensor in captured.items():
        assert tensor.shape[-1] == widths.get(site, D_FF)
    for layer in range(N_LAYERS):
        got = {site: captured[(site, layer)].reshape(-1, widths.get(site, D_FF)) for site in arch.sites}
        weights = ffn_weights(arch, layer)
        assert weights["gate"].shape == (D_FF, D_MODEL)
        assert weights["down"].shape == (D_MODEL, D_FF)
        assert ("up" in weights) == arch.glu
        assert ("down_bias" in weights) == biased

        expected = ffn_recompute(weights, arch.activation, got["input"])
        assert set(expected) == set(arch.sites)
        for site in arch.sites:
            torch.testing.assert_close(expected[site], got[site], rtol=1e-5, atol=1e-6, msg=f"{name} {site}@{layer}")
        # The stored intermediate alone rebuilds the FFN output: what offline analysis relies on (P12).
        rebuilt = got["intermediate"] @ weights["down"].T + weights.get("down_bias", 0)
        torch.testing.assert_close(rebuilt, got["output"], rtol=1e-5, atol=1e-6)


def test_phi3_fused_halves_are_gate_then_up() -> None:
    # guards P12: a model that chunks (up, gate) would swap these; pin Phi-3's order on the weights.
    model = ARCHS["phi3"][0]()
    arch = resolve_ffn(model)
    fused = arch.layers[0].gate.weight
    weights = ffn_weights(arch, 0)
    assert torch.equal(weights["gate"], fused[:D_FF]) and torch.equal(weights["up"], fused[D_FF:])
    assert arch.layers[0].up is None


def test_gpt2_conv1d_weights_are_transposed() -> None:
    model = ARCHS["gpt2"][0]()
    arch = resolve_ffn(model)
    assert torch.equal(ffn_weights(arch, 1)["gate"], arch.layers[1].gate.weight.T)


def test_multimodal_gemma3_picks_the_text_decoder() -> None:
    # guards P1: the vision tower (3 layers of fc1/fc2 MLPs, more than the 2 text layers) must not win.
    torch.manual_seed(0)
    config = Gemma3Config(
        text_config=Gemma3TextConfig(**{**TINY, "vocab_size": 300}, head_dim=8),
        vision_config=SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        mm_tokens_per_image=4,
        boi_token_index=297,
        eoi_token_index=298,
        image_token_index=299,
    )
    arch = resolve_ffn(Gemma3ForConditionalGeneration(config))
    assert (arch.layers_path, arch.pattern, len(arch.layers)) == ("model.language_model.layers", "glu", N_LAYERS)


def test_moe_is_refused() -> None:
    # guards P2: Qwen2-MoE's shared_expert matches the GLU pattern, but hooking it alone would be wrong.
    config = Qwen2MoeConfig(
        **TINY, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2
    )
    with pytest.raises(ActsparseError, match=r"mlp\.experts is a mixture-of-experts"):
        resolve_ffn(_causal(config))


class FooBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.w1, self.w2 = nn.Linear(8, 16), nn.Linear(16, 8)


class FooForCausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(FooBlock() for _ in range(2))


def test_unsupported_architecture_names_what_it_found() -> None:
    with pytest.raises(ActsparseError) as info:
        resolve_ffn(FooForCausalLM())
    message = str(info.value)
    assert "\n" not in message
    assert "FooForCausalLM" in message and "FooBlock" in message
    assert "[q, k, v, o, w1, w2]" in message and "gate_proj/up_proj/down_proj" in message


class BareMLP(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class BareBlock(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.ffn = BareMLP(act)


class BareNet(nn.Module):
    def __init__(self, shared_act: bool = False) -> None:
        super().__init__()
        act = nn.ReLU()
        self.layers = nn.ModuleList(BareBlock(act if shared_act else nn.ReLU()) for _ in range(3))


def test_structural_match_without_config_names_activation_by_class() -> None:
    arch = resolve_ffn(BareNet())
    assert (arch.pattern, arch.activation, arch.layers_path) == ("glu", "relu", "layers")
    assert [layer.path for layer in arch.layers] == ["layers.0.ffn", "layers.1.ffn", "layers.2.ffn"]


def test_shared_activation_module_is_refused() -> None:
    # A shared module would fire once per layer from one hook and mislabel the layers.
    with pytest.raises(ActsparseError, match="act module act_fn is shared"):
        resolve_ffn(BareNet(shared_act=True))


def test_invalid_sites_raise() -> None:
    llama = resolve_ffn(ARCHS["llama"][0]())
    with pytest.raises(ActsparseError, match="unknown site 'pre'"):
        SiteRecorder(llama, ["pre"], lambda *a: None)
    with pytest.raises(ActsparseError, match="no sites"):
        SiteRecorder(llama, [], lambda *a: None)
    gpt2 = resolve_ffn(ARCHS["gpt2"][0]())
    with pytest.raises(ActsparseError, match="'up' does not exist for a non-GLU FFN"):
        SiteRecorder(gpt2, ["gate", "up"], lambda *a: None)
    with pytest.raises(ActsparseError, match="out of range"):
        ffn_weights(gpt2, N_LAYERS)


def test_check_fired_counts_per_batch() -> None:
    # guards P11: a hook that fires more or fewer times than expected is reported.
    model = ARCHS["llama"][0]()
    arch = resolve_ffn(model)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with SiteRecorder(arch, ["act", "output"], lambda *a: None) as recorder, torch.no_grad():
        with pytest.raises(ActsparseError, match="did not fire 1 time"):
            recorder.check_fired()
        model(input_ids=ids)
        model(input_ids=ids)
        recorder.check_fired(expected=2)
        with pytest.raises(ActsparseError, match="4 of 4 hooks"):
            recorder.check_fired()
        recorder.reset_counts()
        model(input_ids=ids)
        recorder.check_fired()
        assert set(recorder.counts.values()) == {1}


def test_hooks_are_removed_on_exit_and_on_error() -> None:
    model = ARCHS["opt"][0]()
    arch = resolve_ffn(model)
    before = _hook_counts(model)
    calls: list[str] = []
    with SiteRecorder(arch, arch.sites, lambda s, i, t: calls.append(s)):
        assert _hook_counts(model) == before + len(arch.sites) * N_LAYERS
    assert _hook_counts(model) == before

    with pytest.raises(RuntimeError, match="boom"), SiteRecorder(arch, arch.sites, lambda s, i, t: calls.append(s)):
        raise RuntimeError("boom")
    assert _hook_counts(model) == before
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))
    assert calls == []


def test_sink_gets_detached_tensors_in_model_dtype() -> None:
    model = ARCHS["llama"][0]().to(torch.bfloat16)
    arch = resolve_ffn(model)
    captured, _ = _record(model, arch, ["input", "intermediate"])
    assert all(t.dtype == torch.bfloat16 and not t.requires_grad for t in captured.values())
