"""Resolve the mixture-of-experts FFNs of a transformers 5 model by structure.

transformers 5 fuses the experts of a MoE block into one module (``Qwen2MoeExperts``, ``Qwen3MoeExperts``,
``OlmoeExperts``, ``MixtralExperts``) holding ``gate_up_proj`` [n_experts, 2·d_moe, d_model] and ``down_proj``
[n_experts, d_model, d_moe], and dispatches its forward through ``transformers.integrations.moe``
(``ExpertsInterface``; default ``grouped_mm``), so no module hook can split it per expert (docs/pitfalls.md
P2). :func:`resolve_moe` finds those blocks, checks that they have the one layout whose eager math
``pipeline.experts.routed_forward`` redoes, and describes the layout for the manifest
(``actsparse.core.format.MoELayout``).

Routing is the block's own: the router (``mlp.gate``) always sees the dense FFN input, takes the softmax over
its logits and the top-k; Mixtral always renormalises the k weights to sum 1 (in float32, also in bf16),
Qwen2-MoE / Qwen3-MoE / OLMoE only with ``norm_topk_prob`` (``*TopKRouter.forward``). Qwen2-MoE adds a dense
GLU ``shared_expert`` scaled by ``sigmoid(shared_expert_gate(x))`` (``Qwen2MoeSparseMoeBlock.forward``).
Qwen2-MoE / Qwen3-MoE may keep dense GLU FFNs in some layers (``mlp_only_layers``, ``decoder_sparse_step``);
they are resolved as :class:`DenseLayer`.

Refused (``ActsparseError``, one line naming the class and the layout): experts not dispatched through the
experts interface; any layout other than concatenated [gate; up], untransposed, bias-free, with the default
gate (GPT-OSS has an interleaved, transposed, biased, clamped gate and its own ``_apply_gate``); MoE block
classes whose combination of routed and shared experts is not verified (:data:`SUPPORTED_BLOCKS`, e.g.
DeepSeek-V3's group routing); dense FFNs that are not bias-free GLUs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.sites import activation_name, layer_lists


@dataclass(frozen=True)
class _BlockSpec:
    shared_gate: str | None  # how the shared expert's output is scaled ("sigmoid"); None: no shared expert
    renormalizes: str  # "always" or "norm_topk_prob": when the router renormalises its top-k weights


SUPPORTED_BLOCKS: Mapping[str, _BlockSpec] = {
    # Each block's forward read in transformers 5.24 (modeling_<m>.py) and tested against its own output.
    "Qwen2MoeSparseMoeBlock": _BlockSpec("sigmoid", "norm_topk_prob"),
    "Qwen3MoeSparseMoeBlock": _BlockSpec(None, "norm_topk_prob"),
    "OlmoeSparseMoeBlock": _BlockSpec(None, "norm_topk_prob"),
    "MixtralSparseMoeBlock": _BlockSpec(None, "always"),
}
# use_experts_implementation's flags for the one layout the eager math of pipeline.experts covers.
_LAYOUT = {"has_gate": True, "is_concatenated": True, "is_transposed": False, "has_bias": False,
           "has_post_expert_norm": False}


@dataclass(frozen=True)
class MoELayer:
    """One MoE block: ``block`` (at ``path``), its fused ``experts``, ``router`` and optional shared expert."""

    index: int
    path: str
    block: nn.Module
    experts: nn.Module
    router: nn.Module
    shared: nn.Module | None
    shared_gate: nn.Module | None


@dataclass(frozen=True)
class DenseLayer:
    """A dense GLU FFN (``gate_proj``/``up_proj``/``down_proj``/``act_fn``) in a model with MoE layers."""

    index: int
    path: str
    mlp: nn.Module


@dataclass(frozen=True)
class MoEArchitecture:
    """Every decoder layer's FFN of a MoE model, as found by :func:`resolve_moe`: one :class:`MoELayer` or
    :class:`DenseLayer` per decoder layer in ``layers``, and the layout they share (``layout``)."""

    layout: fmt.MoELayout
    layers: tuple[MoELayer | DenseLayer, ...]

    @property
    def moe_layers(self) -> tuple[MoELayer, ...]:
        return tuple(la for la in self.layers if isinstance(la, MoELayer))

    @property
    def dense_layers(self) -> tuple[DenseLayer, ...]:
        return tuple(la for la in self.layers if isinstance(la, DenseLayer))

    @property
    def model_class(self) -> str:
        return self.layout.model_class

    @property
    def activation(self) -> str:
        return self.layout.activation

    @property
    def n_experts(self) -> int:
        return self.layout.n_experts

    @property
    def top_k(self) -> int:
        return self.layout.top_k

    @property
    def d_model(self) -> int:
        return self.layout.d_model

    @property
    def d_moe(self) -> int:
        return self.layout.d_moe

    @property
    def d_shared(self) -> int | None:
        return self.layout.d_shared

    @property
    def d_ff_dense(self) -> int | None:
        return self.layout.d_ff_dense

    def describe(self) -> dict:
        """The layout as the manifest's ``moe`` record (``MoELayout.to_dict``)."""
        return self.layout.to_dict()

    def ffn_info(self) -> fmt.FFNInfo:
        """The manifest's ``model.ffn`` of a MoE run: pattern ``moe``, ``d_ff`` = d_moe, every decoder layer."""
        first = self.moe_layers[0]
        return fmt.FFNInfo(pattern="moe", activation=self.activation, d_model=self.d_model, d_ff=self.d_moe,
                           n_layers=len(self.layers), layers_path=self.layout.layers_path,
                           layer0_modules={"experts": f"{first.path}.experts", "router": f"{first.path}.gate"})


def check_layout(stored: fmt.MoELayout | None, arch: MoEArchitecture, what: str = "the stored run") -> None:
    """Refuse a model whose MoE layout differs from ``stored`` (a run's manifest ``moe``).

    Raises:
        ActsparseError: naming every differing field, e.g. ``top_k: stored 2, model 4``; also when the run is
            not a mixture-of-experts run at all.
    """
    if stored is None:
        raise ActsparseError(f"{arch.model_class} is a mixture-of-experts model, {what} is not")
    diffs = stored.differences(arch.layout)
    if diffs:
        raise ActsparseError(f"the MoE layout of {arch.model_class} differs from {what} ({'; '.join(diffs)}); "
                             "routing changed since collection")


def has_experts(model: nn.Module) -> bool:
    """Whether any module of ``model`` has an ``experts`` child module (a mixture-of-experts block)."""
    return any(isinstance(getattr(m, "experts", None), nn.Module) for m in model.modules())


# ---------------------------------------------------------------- structure


def _blocks_in(layer: nn.Module) -> list[str]:
    """Relative names of the modules in ``layer`` that have an ``experts`` child."""
    return [n for n, m in layer.named_modules() if isinstance(getattr(m, "experts", None), nn.Module)]


def _is_glu(module: nn.Module) -> bool:
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(isinstance(p, nn.Linear) and p.bias is None for p in parts) and isinstance(
        getattr(module, "act_fn", None), nn.Module)


def _check_experts(model_name: str, path: str, experts: nn.Module) -> None:
    from transformers.integrations.moe import _default_apply_gate

    cls = type(experts).__name__
    if not all(hasattr(experts, flag) for flag in _LAYOUT):
        raise ActsparseError(f"unsupported MoE layout in {model_name}: {path}.experts ({cls}) is not dispatched "
                             "through transformers' experts interface (use_experts_implementation)")
    layout = {flag: getattr(experts, flag) for flag in _LAYOUT}
    custom_gate = getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate
    if layout != _LAYOUT or custom_gate:
        shown = ", ".join(f"{k}={v}" for k, v in layout.items()) + (", custom _apply_gate" if custom_gate else "")
        raise ActsparseError(f"unsupported MoE layout in {model_name}: {cls} at {path}.experts has {shown}; "
                             "supported: concatenated [gate; up] gate_up_proj [E, 2*d_moe, d_model], "
                             "down_proj [E, d_model, d_moe], no bias, default gate")
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    ok = (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.ndim == 3 and down.ndim == 3
          and gu.shape[1] % 2 == 0 and down.shape == (gu.shape[0], gu.shape[2], gu.shape[1] // 2))
    if not ok:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in (gu, down)]
        raise ActsparseError(f"unsupported MoE layout in {model_name}: {cls} at {path}.experts has gate_up_proj "
                             f"{shapes[0]} and down_proj {shapes[1]}; expected [E, 2*d_moe, d_model] and "
                             "[E, d_model, d_moe]")


def _moe_layer(model_name: str, index: int, path: str, block: nn.Module) -> MoELayer:
    experts = block.experts
    _check_experts(model_name, path, experts)
    spec = SUPPORTED_BLOCKS.get(type(block).__name__)
    if spec is None:
        raise ActsparseError(f"unsupported MoE layout in {model_name}: {path} is a {type(block).__name__}, whose "
                             f"combination of experts is not verified (supported: {', '.join(SUPPORTED_BLOCKS)})")
    router = getattr(block, "gate", None)
    n_experts, d_model = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[2]
    weight = getattr(router, "weight", None)
    if not (isinstance(getattr(router, "top_k", None), int) and isinstance(weight, torch.Tensor)
            and tuple(weight.shape) == (n_experts, d_model)):
        raise ActsparseError(f"unsupported MoE layout in {model_name}: {path}.gate is not a top-k router with "
                             f"weight [{n_experts}, {d_model}]")
    shared, shared_gate = getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None)
    if spec.shared_gate is not None:
        if not (shared is not None and _is_glu(shared) and isinstance(shared_gate, nn.Linear)
                and tuple(shared_gate.weight.shape) == (1, d_model) and shared_gate.bias is None):
            raise ActsparseError(f"unsupported MoE layout in {model_name}: {path} lacks a bias-free GLU "
                                 "shared_expert with a Linear(d_model, 1) shared_expert_gate")
    elif shared is not None or shared_gate is not None:
        raise ActsparseError(f"unsupported MoE layout in {model_name}: {path} has an unexpected shared expert")
    return MoELayer(index, path, block, experts, router, shared, shared_gate)


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList, str]:
    """(layers path, layer list, block name relative to a layer) of the best list holding MoE blocks."""
    model_name = type(model).__name__
    for path, layers in layer_lists(model):
        names = {tuple(_blocks_in(layer)) for layer in layers} - {()}
        if not names:
            continue
        if len(names) > 1 or len(next(iter(names))) != 1:
            raise ActsparseError(f"unsupported MoE layout in {model_name}: the layers of {path} hold MoE blocks at "
                                 f"{sorted(names)}; expected one block at the same path in every MoE layer")
        return path, layers, next(iter(names))[0]
    raise ActsparseError(f"no mixture-of-experts FFN in {model_name} (no module with an 'experts' child in its "
                         "layer lists); dense models are resolved by pipeline.sites.resolve_ffn")


def _uniform(model_name: str, what: str, values: Mapping[int, object]) -> object:
    if len(set(values.values())) != 1:
        raise ActsparseError(f"unsupported MoE layout in {model_name}: non-uniform {what} per layer {dict(values)}")
    return next(iter(values.values()))


def resolve_moe(model: nn.Module) -> MoEArchitecture:
    """Find the MoE (and dense) FFN of every decoder layer of ``model`` by structure.

    The layer list is the best ``nn.ModuleList`` of same-class layers (``pipeline.sites.layer_lists``)
    holding a module with an ``experts`` child; that module's name (``mlp``) is the FFN root of every layer.
    MoE roots must be a :data:`SUPPORTED_BLOCKS` class with fused experts in the eager layout (module
    docstring); the other layers' roots must be bias-free dense GLUs.

    Raises:
        ActsparseError: one line naming the class and layout for any unsupported MoE layout; no MoE layer at
            all; non-uniform widths, experts, top-k or activations across layers; modules shared between
            layers; an activation no ACT2FN entry reproduces.
    """
    model_name = type(model).__name__
    layers_path, layers, block_name = _find_layers(model)
    resolved: list[MoELayer | DenseLayer] = []
    for i, layer in enumerate(layers):
        root = layer.get_submodule(block_name)
        path = f"{layers_path}.{i}.{block_name}"
        if isinstance(getattr(root, "experts", None), nn.Module):
            resolved.append(_moe_layer(model_name, i, path, root))
        elif _is_glu(root):
            resolved.append(DenseLayer(i, path, root))
        else:
            raise ActsparseError(f"unsupported MoE layout in {model_name}: {path} ({type(root).__name__}) is "
                                 "neither a MoE block nor a bias-free dense GLU FFN")
    moe = [la for la in resolved if isinstance(la, MoELayer)]
    dense = [la for la in resolved if isinstance(la, DenseLayer)]
    for role, modules in (("experts", [la.experts for la in moe]), ("router", [la.router for la in moe]),
                          ("ffn", [la.mlp for la in dense])):
        if len({id(m) for m in modules}) != len(modules):
            raise ActsparseError(f"unsupported MoE layout in {model_name}: a {role} module is shared between layers")

    block_class = _uniform(model_name, "MoE block classes", {la.index: type(la.block).__name__ for la in moe})
    spec = SUPPORTED_BLOCKS[block_class]
    shapes = _uniform(model_name, "expert shapes [E, 2*d_moe, d_model]",
                      {la.index: tuple(la.experts.gate_up_proj.shape) for la in moe})
    top_k = _uniform(model_name, "top-k", {la.index: la.router.top_k for la in moe})
    d_shared = _uniform(model_name, "shared expert widths",
                        {la.index: la.shared.gate_proj.out_features if la.shared is not None else None for la in moe})
    d_ff_dense = (_uniform(model_name, "dense FFN widths", {la.index: la.mlp.gate_proj.out_features for la in dense})
                  if dense else None)
    acts = [(f"{la.path}.experts.act_fn", la.experts.act_fn) for la in moe]
    acts += [(f"{la.path}.shared_expert.act_fn", la.shared.act_fn) for la in moe if la.shared is not None]
    acts += [(f"{la.path}.act_fn", la.mlp.act_fn) for la in dense]
    activation = _uniform(model_name, "activations", {w: activation_name(model, a, w) for w, a in acts})
    first = moe[0]
    renormalized = spec.renormalizes == "always" or bool(getattr(first.router, "norm_topk_prob", False))
    layout = fmt.MoELayout(
        model_class=model_name, block_class=block_class, experts_class=type(first.experts).__name__,
        activation=activation, n_layers=len(resolved), moe_layers=tuple(la.index for la in moe),
        dense_layers=tuple(la.index for la in dense), n_experts=shapes[0], top_k=top_k, d_model=shapes[2],
        d_moe=shapes[1] // 2, d_shared=d_shared, shared_gate=spec.shared_gate, d_ff_dense=d_ff_dense,
        renormalized=renormalized, layers_path=layers_path, block_name=block_name)
    return MoEArchitecture(layout, tuple(resolved))
